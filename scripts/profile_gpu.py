"""Where pruned inference spends its time on a GPU: kernel time vs wall time, top kernels.

python scripts/profile_gpu.py [vit_base_patch16_224] [batch] [size]
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from dtop.models.build import build_segmentor
from dtop.models.heads.fcn import FCNHead
from dtop.models.policies import RecordedDecisions, random_keep_masks
from dtop.models.vit import ViTBackbone

name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
B = int(sys.argv[2]) if len(sys.argv) > 2 else 8
S = int(sys.argv[3]) if len(sys.argv) > 3 else 512
layers = [6, 8] if "base" in name else [8, 16]
model = build_segmentor(ViTBackbone(name, img_size=(S, S)), partial(FCNHead), 150, partial(FCNHead), layers,
                        RecordedDecisions([])).cuda().eval()
N = (S // 16) ** 2
model.policy.keep = [m.cuda() for m in random_keep_masks(B, N, [0.7, 0.5], 0.2, torch.Generator().manual_seed(0))]
x = torch.randn(B, 3, S, S, device="cuda")


def run(dense: bool) -> None:
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        if dense:
            with model.dense_mode():
                model(x)
        else:
            model(x)


for dense in (True, False):
    for _ in range(5):
        run(dense)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        run(dense)
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 10
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run(dense)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / 3
    print(f"\n=== {'dense' if dense else 'pruned'} {name} b{B} {S}²: wall {wall:.2f} ms, kernels {kernel_ms:.2f} ms")
    print(events.table(sort_by="device_time_total", row_limit=14, max_name_column_width=60))
