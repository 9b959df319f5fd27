"""Per-pixel labels from token-grid logits: upsampled class maps + argmax vs the fused label kernel.

python tools/dev/bench_labels.py [--sweep]
Cases: 150 classes at 512² (grid 32²) for batch 1, 8 and 32, and 19 classes at 1024×2048 (grid 64×128)
for batch 1 and 2; fp32 maps as the engine assembles them, channels-last. Each path runs 20 times
in one CUDA graph and is timed with CUDA events (``graph_ms``: median of 7 replays); also checks
that the labels agree.
``--sweep`` also times the kernel with 2, 4 and 8 warps per program.
"""

from __future__ import annotations

import sys

import torch

from dtop.cli.bench import graph_ms
from dtop.kernels import labels
from dtop.kernels.labels import upsampled_argmax
from dtop.ops.resize import RUN, Upsampled, resize_operator, resize_taps

dev = torch.device("cuda")
for B, K, (H, W) in (
    (1, 150, (512, 512)),
    (8, 150, (512, 512)),
    (32, 150, (512, 512)),
    (1, 19, (1024, 2048)),
    (2, 19, (1024, 2048)),
):
    h, w = H // 16, W // 16
    logits = torch.randn(B, h, w, K, device=dev).permute(0, 3, 1, 2)  # the engine's channels-last map
    ops = [resize_operator(n, s, s, None, dev) for n, s in ((h, H), (w, W))]
    rows, cols = (resize_taps(n, s, s, None, dev) for n, s in ((h, H), (w, W)))
    taps = (rows.runs, rows.weights, cols.runs, cols.weights, RUN)
    ref = Upsampled(logits, *ops).dense().argmax(1)
    got = upsampled_argmax(logits, None, False, *taps)
    same = float((ref == got).float().mean())
    t_ref = graph_ms(lambda: Upsampled(logits, *ops).dense().argmax(1))
    t_kernel = graph_ms(lambda: upsampled_argmax(logits, None, False, *taps))
    print(
        f"B={B:2d} K={K:3d} {H}×{W}: upsample + argmax {t_ref:.3f} ms, label kernel {t_kernel:.3f} ms "
        f"(×{t_ref / t_kernel:.1f}); labels equal on {100 * same:.4f} % of pixels"
    )
    if "--sweep" in sys.argv:
        default, row = labels.WARPS, []
        for warps in (2, 4, 8):
            labels.WARPS = (warps, warps)
            row.append(f"{warps} {graph_ms(lambda: upsampled_argmax(logits, None, False, *taps)):.3f}")
        labels.WARPS = default
        print("    warps: ms  " + ", ".join(row))
