"""GPU idle between CUDA-graph group replays: ``event.synchronize()`` (the engine's way) vs polling
``event.query()`` from Python, with the host time of each replay call.

python tools/dev/probe_graph_wait.py [vit_base_patch16_224] [batch]
Two rounds of each, 60 timed forwards after 20 warm-up ones, then the dense forward; bf16 weights,
random keep masks [0.7, 0.5] ± 0.2 after layers 6/8 (ViT-B) or 8/16 (ViT-L).
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import torch

from dtop.models import graphs
from dtop.models.build import build_segmentor
from dtop.models.graphs import GraphedSegmentor
from dtop.models.heads.fcn import FCNHead
from dtop.models.policies import RecordedDecisions, random_keep_masks
from dtop.models.vit import ViTBackbone

name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
B = int(sys.argv[2]) if len(sys.argv) > 2 else 1
S, N = 512, (512 // 16) ** 2
model = (
    build_segmentor(
        ViTBackbone(name, img_size=(S, S)),
        partial(FCNHead),
        150,
        partial(FCNHead),
        [6, 8] if "base" in name else [8, 16],
        RecordedDecisions([]),
    )
    .cuda()
    .eval()
    .to(torch.bfloat16)
)
graphed = GraphedSegmentor(model, 64)
masks = [
    [m.cuda() for m in random_keep_masks(B, N, [0.7, 0.5], 0.2, torch.Generator().manual_seed(i))] for i in range(4)
]
xs = [torch.randn(B, 3, S, S, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
model.pruning.set_keep(masks[0])


def poll(event: torch.cuda.Event) -> None:
    while not event.query():
        pass


waits = {"poll": poll, "synchronize": torch.cuda.Event.synchronize}
replay, marks = graphs.StageGraphs._replay, []


def timed_replay(self, key, program, ctx):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    out = replay(self, key, program, ctx)
    b.record()
    marks.append((a, b, (time.perf_counter() - t0) * 1e6))
    return out


def forward(i: int, dense: bool = False) -> float:
    model.pruning.set_keep(masks[i % 4])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        start.record()
        if dense:
            with model.dense_mode():
                graphed(xs[i % 4])
        else:
            graphed(xs[i % 4])
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


graphs.StageGraphs._replay = timed_replay
for mode in ("synchronize", "poll") * 2:
    torch.cuda.Event.synchronize = waits[mode]
    for i in range(20):
        forward(i)
    runs, total = [], []
    for i in range(60):
        marks.clear()
        total.append(forward(i))
        runs.append(list(marks))
    idle = [statistics.median(r[g - 1][1].elapsed_time(r[g][0]) * 1e3 for r in runs) for g in range(1, len(runs[0]))]
    host = [statistics.median(r[g][2] for r in runs) for g in range(len(runs[0]))]
    print(
        f"{name} b{B} {mode}: total {statistics.median(total):.3f} ms; GPU idle between groups (µs) "
        + ", ".join(f"{w:.1f}" for w in idle)
        + "; host µs per replay call "
        + ", ".join(f"{h:.1f}" for h in host)
    )
torch.cuda.Event.synchronize, graphs.StageGraphs._replay = waits["synchronize"], replay
for i in range(20):
    forward(i, True)
print(f"{name} b{B} dense {statistics.median(forward(i, True) for i in range(60)):.3f} ms")
