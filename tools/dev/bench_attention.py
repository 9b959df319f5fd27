"""Varlen attention on packed streams: ATen flash (FA2) vs the Triton kernel, with a tile sweep.

python tools/dev/bench_attention.py [--sweep]
Shapes: pruned ViT-B / ViT-L streams (12 / 16 heads of 64) with random per-image lengths; µs per call
(CUDA events over 50 calls, median of 5), bf16; also the max error of the Triton kernel against FA2.
"""

from __future__ import annotations

import itertools
import statistics
import sys

import torch

import dtop.kernels.attention as kernel
from dtop.ops.attention import _flash_forward

CASES = [  # name, heads, per-image lengths
    ("ViT-B b8 ~0.7", 12, [int(1025 * r) for r in (0.55, 0.7, 0.85, 0.6, 0.75, 0.9, 0.5, 0.65)]),
    ("ViT-B b8 ~0.5", 12, [int(1025 * r) for r in (0.35, 0.5, 0.65, 0.4, 0.55, 0.7, 0.3, 0.45)]),
    ("ViT-B b32 ~0.5", 12, [int(1025 * (0.3 + 0.4 * i / 31)) for i in range(32)]),
    ("ViT-L b8 ~0.5", 16, [int(1025 * r) for r in (0.35, 0.5, 0.65, 0.4, 0.55, 0.7, 0.3, 0.45)]),
    ("ViT-L 1024x2048 b1 ~0.6", 16, [4900]),
    ("ViT-L 1024x2048 b2 ~0.6", 16, [4100, 5700]),
]


def timed(fn, reps: int = 50) -> float:
    fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


def main() -> None:
    defaults = kernel.SHORT, kernel.LONG
    configs = [None]  # the kernel's own choice (SHORT or LONG by max_len)
    if "--sweep" in sys.argv:
        configs = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
    for name, H, lengths in CASES:
        T, L = sum(lengths), max(lengths)
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        qkv = torch.randn(T, 3, H, 64, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(1)
        flops = sum(4 * n * n * 64 * H for n in lengths)
        fa2 = timed(lambda: _flash_forward(q, k, v, cu, L))
        ref = _flash_forward(q, k, v, cu, L)[0]
        rows = []
        for config in configs:
            if config is not None:
                kernel.SHORT = kernel.LONG = config
            bm, bn, w, st = config or (kernel.SHORT if L <= kernel.LONG_FROM else kernel.LONG)
            try:
                got = kernel.varlen_attention(q, k, v, cu, L)
                t = timed(lambda: kernel.varlen_attention(q, k, v, cu, L))
            except Exception as e:  # a tile that does not fit shared memory
                rows.append((float("inf"), f"{bm}x{bn} w{w} s{st}: {type(e).__name__}"))
                continue
            err = float((got.float() - ref.float()).abs().max())
            rows.append((t, f"{bm}x{bn} w{w} s{st}: {t:.1f} µs ({flops / t / 1e6:.0f} TFLOP/s) err {err:.1e}"))
        kernel.SHORT, kernel.LONG = defaults
        rows.sort()
        print(
            f"{name}: T={T}, FA2 {fa2:.1f} µs ({flops / fa2 / 1e6:.0f} TFLOP/s); Triton "
            + "; ".join(r for _, r in rows[:4]),
            flush=True,
        )


if __name__ == "__main__":
    main()
