"""The training loss alone: upsample a token-grid logit map to the labels and take pixel CE, fwd + bwd.

python scripts/bench_loss.py [batch=8] [classes=150] [size=512] [grid=32]
Compares the stock path (``F.cross_entropy`` on an fp32 copy) with dtop's fused Triton kernels, both
after the same matmul upsampling under bf16 autocast. CUDA events, median of 20 after 5 warm-ups.
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from dtop.losses import cross_entropy
from dtop.models.resize import resize_bilinear

B, K, S, h = [int(a) for a in sys.argv[1:5]] + [8, 150, 512, 32][len(sys.argv[1:5]):]
low = torch.randn(B, K, h, h, device="cuda", requires_grad=True)
target = torch.randint(0, K, (B, S, S), device="cuda")


def stock() -> torch.Tensor:
    up = resize_bilinear(low, (S, S))
    return F.cross_entropy(up.float(), target, ignore_index=255)


def fused() -> torch.Tensor:
    return cross_entropy(resize_bilinear(low, (S, S)), target)


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
    diff = abs(float(stock()) - float(fused()))
for name, fn in (("stock", stock), ("fused", fused)):
    ms, mib = timed(fn)
    print(f"{name}: {ms:.3f} ms fwd+bwd, peak {mib:.0f} MiB  ({torch.cuda.get_device_name()}, B={B} K={K} {S}² from {h}²)")
print(f"|loss difference| = {diff:.2e}")
