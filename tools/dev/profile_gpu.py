"""Where pruned inference or a training step spends its time on a GPU: kernel vs wall time, top ops.

[KEEP=0.55,0.4] python tools/dev/profile_gpu.py [vit_base_patch16_224] [batch] [size] [infer|train] [gaps]

``gaps``: also trace one step with Python stacks and charge every idle stretch of the GPU (> 5 µs) to
the innermost ``dtop`` function that launched the kernel ending it: where the host falls behind.
"""

from __future__ import annotations

import bisect
import collections
import json
import os
import sys
import tempfile
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from dtop.losses import cross_entropy
from dtop.models.build import build_segmentor
from dtop.models.heads.fcn import FCNHead
from dtop.models.policies import RecordedDecisions, random_keep_masks
from dtop.models.vit import ViTBackbone

name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
B = int(sys.argv[2]) if len(sys.argv) > 2 else 8
S = int(sys.argv[3]) if len(sys.argv) > 3 else 512
mode = sys.argv[4] if len(sys.argv) > 4 else "infer"
gaps = len(sys.argv) > 5 and sys.argv[5] == "gaps"
layers = [6, 8] if "base" in name else [8, 16]
keep = (
    [float(k) for k in os.environ["KEEP"].split(",")]
    if "KEEP" in os.environ
    else ([0.7, 0.5] if mode == "infer" else [0.4, 0.25])
)
model = build_segmentor(
    ViTBackbone(name, img_size=(S, S)), partial(FCNHead), 150, partial(FCNHead), layers, RecordedDecisions([])
).cuda()
model.train(mode == "train")
N = (S // 16) ** 2
model.pruning.keep = [m.cuda() for m in random_keep_masks(B, N, keep, 0.1, torch.Generator().manual_seed(0))]
x = torch.randn(B, 3, S, S, device="cuda")
y = torch.randint(0, 150, (B, S, S), device="cuda")
opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as dtop-train


def run(dense: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
        if dense:
            with model.dense_mode():
                out = model(x)
        else:
            out = model(x)
        if mode == "train":
            loss = sum(cross_entropy(model.upsampled(m, out), y) for m in [out.logits, *out.stage_logits])
    if mode == "train":
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def idle_report(prof: profile, top: int = 15) -> None:
    """Sum GPU idle gaps by the dtop function that launched the next kernel."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    xs = [e for e in events if e.get("ph") == "X"]
    kernels = sorted((e for e in xs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launch = {
        e["args"]["correlation"]: e for e in xs if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    py: dict[int, list] = collections.defaultdict(list)
    ops: dict[int, list] = collections.defaultdict(list)
    for e in xs:
        if e.get("cat") in ("python_function", "cpu_op"):
            (py if e["cat"] == "python_function" else ops)[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    for v in (*py.values(), *ops.values()):
        v.sort()
    starts = {tid: [a for a, _, _ in v] for tid, v in py.items()}
    op_starts = {tid: [a for a, _, _ in v] for tid, v in ops.items()}

    def enclosing(table: dict, index: dict, tid: int, ts: float) -> list[str]:
        frames = table.get(tid, [])
        i = bisect.bisect_right(index.get(tid, []), ts)
        return [name for a, b, name in frames[max(0, i - 400) : i] if b >= ts]

    def ours(frames: list[str]) -> list[str]:
        return [n for n in frames if "dtop" in n and "profile_gpu" not in n]

    syncs: collections.Counter = collections.Counter()
    for e in xs:
        if e.get("cat") == "cuda_runtime" and "Synchronize" in e["name"]:
            where = ours(enclosing(py, starts, e["tid"], e["ts"]))
            syncs[where[-1] if where else "outside dtop"] += 1
    print(f"host syncs: {dict(syncs)}")
    charged: collections.Counter = collections.Counter()
    total = 0.0
    for prev, nxt in zip(kernels, kernels[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap <= 5:
            continue
        total += gap
        ev = launch.get(nxt.get("args", {}).get("correlation"))
        label = "no launch record"
        if ev is not None:
            frames = enclosing(py, starts, ev["tid"], ev["ts"])
            mine = ours(frames)
            if mine:
                label = f"{mine[-1]}  ← {frames[-1]}"
            elif frames:
                label = f"outside dtop: {frames[-1]}"
            else:
                names = enclosing(ops, op_starts, ev["tid"], ev["ts"])
                label = f"no Python (autograd engine): {' ← '.join(names[:1] + names[-1:])}"
        charged[label] += gap
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    print(
        f"{len(kernels)} kernels; GPU idle {total / 1e3:.2f} ms of a {span / 1e3:.2f} ms span, "
        "charged to the launching function:"
    )
    for label, us in charged.most_common(top):
        print(f"  {us / 1e3:8.2f} ms  {label}")


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
    if gaps:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=True) as traced:
            run(dense)
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / 3
    print(
        f"\n=== {mode} {'dense' if dense else 'pruned'} {name} b{B} {S}²: "
        f"wall {wall:.2f} ms, kernels {kernel_ms:.2f} ms"
    )
    print(events.table(sort_by="device_time_total", row_limit=22, max_name_column_width=70))
    if gaps:
        idle_report(traced)
