"""Tile sweep of the upsampling CE kernels: forward and backward ms per (pixels, classes, warps) tile.

python tools/dev/sweep_ce_tiles.py
Batch 8 and 32, 150 classes, 32² → 512², bf16; CUDA events, median of 15 after 3 warm-ups. The
winners are ``UP_FORWARD`` / ``UP_BACKWARD`` in ``dtop/kernels/cross_entropy.py``.
"""

from __future__ import annotations

import itertools
import statistics

import torch

from dtop.kernels import cross_entropy as kc
from dtop.ops.resize import resize_operator


def ms(fn, n: int = 15) -> float:
    times = []
    for i in range(n + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


for B in (8, 32):
    low = torch.randn(B, 150, 32, 32, device="cuda")
    op = resize_operator(32, 512, 512, None, low.device)
    a = torch.matmul(op.bfloat16(), low.bfloat16()).contiguous().requires_grad_()
    t = torch.randint(0, 150, (B, 512, 512), device="cuda")
    res = []
    for cfg in itertools.product((64, 128, 256), (16, 32, 64), (2, 4, 8)):
        kc.UP_FORWARD = kc.UP_BACKWARD = cfg
        fwd = ms(lambda: kc.upsampled_cross_entropy_sum(a, op, t))
        both = ms(lambda: torch.autograd.grad(kc.upsampled_cross_entropy_sum(a, op, t), a))
        res.append((cfg, fwd, both - fwd))
    print(f"B={B}: fastest forward tiles (tile, fwd ms, bwd ms):", sorted(res, key=lambda r: r[1])[:4])
    print(f"B={B}: fastest backward tiles (tile, fwd ms, bwd ms):", sorted(res, key=lambda r: r[2])[:4])
