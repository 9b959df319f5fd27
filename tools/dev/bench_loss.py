"""The training loss alone: upsample a token-grid logit map to the labels and take pixel CE, fwd + bwd.

python tools/dev/bench_loss.py [batch=8] [classes=150] [size=512] [grid=32]
Compares the stock path (``F.cross_entropy`` on an fp32 copy of the matmul-upsampled map), dtop's plain
fused kernels on that map, and the upsampling kernels on the factored map (what ``dtop-train`` runs),
all under bf16 autocast. CUDA events, median of 20 after 5 warm-ups.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from dtop.losses import cross_entropy
from dtop.ops.resize import Upsampled, resize_bilinear, resize_operator

B, K, S, h = [int(a) for a in sys.argv[1:5]] + [8, 150, 512, 32][len(sys.argv[1:5]) :]
low = torch.randn(B, K, h, h, device="cuda", requires_grad=True)
target = torch.randint(0, K, (B, S, S), device="cuda")


def stock() -> torch.Tensor:
    up = resize_bilinear(low, (S, S))
    return F.cross_entropy(up.float(), target, ignore_index=255)


def fused() -> torch.Tensor:
    return cross_entropy(resize_bilinear(low, (S, S)), target)


op = resize_operator(h, S, S, None, low.device)


def upsampling() -> torch.Tensor:
    return cross_entropy(Upsampled(low, op, op), target)


def timed(fn) -> tuple[float, float]:
    times = []
    for i in range(25):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        b.record()
        b.synchronize()
        low.grad = None
        if i >= 5:
            times.append(a.elapsed_time(b))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    ref = float(stock())
    diffs = {name: abs(float(fn()) - ref) for name, fn in (("fused", fused), ("upsampling", upsampling))}
for name, fn in (("stock", stock), ("fused", fused), ("upsampling", upsampling)):
    ms, mib = timed(fn)
    print(
        f"{name}: {ms:.3f} ms fwd+bwd, peak {mib:.0f} MiB  ({torch.cuda.get_device_name()}, B={B} K={K} {S}² from {h}²)"
    )
print("|loss - stock loss|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
