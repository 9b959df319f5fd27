"""Kernel-level view of CUDA-graph pruned inference, plus the per-kernel costs it is made of.

python tools/dev/profile_graphs.py [vit_base_patch16_224] [batches, e.g. 1,8] [size] [pure|mixed]
    [--policy recorded|dtop|dovit]
Prints dense/pruned replay times (CUDA events, medians), the kernels of one pruned replay grouped by
name, the same program run eagerly grouped by aten op, and microbenchmarks of sorts and tiny kernels
replayed in a graph (``--micro``) and of one block's latency against its token count (``--blocks``);
``--diff`` lists the kernels whose count differs between a dense and a pruned run. ``pure``: bf16
weights; ``mixed``: fp32 weights under bf16 autocast. ``--policy``: recorded keep masks (default), or the
real DToP (top-k context) / DoViT policy on synthetic grades that give the same keep schedule.
"""

from __future__ import annotations

import collections
import statistics
import sys
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from dtop.cli.bench import graph_ms
from dtop.models.blocks import blocks_forward
from dtop.models.build import build_segmentor
from dtop.models.graphs import GraphedSegmentor, StageGraphs
from dtop.models.heads.fcn import FCNHead
from dtop.models.packed import TokenStream
from dtop.models.policies import DoViT, DToP, RecordedDecisions, random_keep_masks
from dtop.models.policies.synthetic import SyntheticGrades
from dtop.models.vit import ViTBackbone

name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,8").split(",")]
S = int(sys.argv[3]) if len(sys.argv) > 3 else 512
precision = sys.argv[4] if len(sys.argv) > 4 else "pure"
policy = sys.argv[sys.argv.index("--policy") + 1] if "--policy" in sys.argv else "recorded"
layers = [6, 8] if "base" in name or "small" in name else [8, 16]
keep = [0.7, 0.5]
if policy == "dovit":
    layers, keep = (
        ([2, 5, 8], [0.8, 0.6, 0.45]) if "base" in name or "small" in name else ([5, 11, 17], [0.8, 0.6, 0.45])
    )


def graph_time(fn) -> float:
    """µs per call of ``fn`` captured 50 times in a CUDA graph (one timed replay)."""
    return 1e3 * graph_ms(fn, reps=50, rounds=1)


def micro() -> None:
    for n in (1024, 8192, 32768):
        row = []
        for dt in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32):
            t = (torch.rand(n, device="cuda") * 100).to(dt)
            row.append(f"{str(dt)[6:]} {graph_time(lambda: torch.argsort(t, stable=True)):.1f}")
        x = torch.randn(n, device="cuda")
        row.append(f"add {graph_time(lambda: x + 1):.1f}")
        row.append(f"cumsum {graph_time(lambda: x.cumsum(0)):.1f}")
        row.append(f"sum {graph_time(lambda: x.sum()):.1f}")
        print(f"n={n}: µs per op in a graph: " + ", ".join(row))


def block_latency(model: torch.nn.Module) -> None:
    """µs per block replayed in a graph, one image of T tokens (the batch-1 graph path)."""
    block = model.backbone.blocks[0]
    row = []
    for T in (1025, 769, 513, 321):
        x = torch.randn(T, block.norm1.normalized_shape[0], device="cuda", dtype=next(block.parameters()).dtype)
        zero = torch.zeros(T, dtype=torch.long, device="cuda")
        stream = TokenStream(
            x, zero, zero, torch.tensor([0, T, T], dtype=torch.int32, device="cuda"), T, 2, 0, False, True
        )
        with torch.no_grad():
            row.append(f"{T} tokens {graph_time(lambda: blocks_forward([block], stream)):.1f}")
    print("one block, batch 1, µs per replay: " + ", ".join(row))


if "--micro" in sys.argv:
    micro()
model = (
    build_segmentor(
        ViTBackbone(name, img_size=(S, S)),
        partial(FCNHead),
        150,
        partial(FCNHead),
        layers,
        {"recorded": RecordedDecisions([]), "dtop": DToP(0.95, k=5), "dovit": DoViT(0.95)}[policy],
    )
    .cuda()
    .eval()
)
if "--blocks" in sys.argv:
    block_latency(model.to(torch.bfloat16))
graphed = GraphedSegmentor(model, 64)
dtype = torch.bfloat16 if precision == "pure" else torch.float32
model.to(dtype)
N = (S // 16) ** 2
for B in batches:
    masks = [[m.cuda() for m in random_keep_masks(B, N, keep, 0.2, torch.Generator().manual_seed(i))] for i in range(8)]
    xs = [torch.randn(B, 3, S, S, device="cuda", dtype=dtype) for _ in range(4)]
    grades = None if policy == "recorded" else SyntheticGrades(model.aux_heads, masks[0], 150).to(torch.device("cuda"))
    decider = model.pruning if grades is None else grades
    decider.set_keep(masks[0])

    def run(i: int, dense: bool, fn=None) -> None:  # the masks are set outside (their copies are not timed)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "mixed"):
            if dense:
                with model.dense_mode():
                    graphed(xs[i % 4])
            elif fn is not None:
                fn(model, xs[i % 4])
            else:
                graphed(xs[i % 4])

    for dense in (True, False):
        for i in range(30):
            decider.set_keep(masks[i % 8])
            run(i, dense)
        times = []
        for i in range(40):
            decider.set_keep(masks[i % 8])
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run(i, dense)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        print(f"\n=== {name} b{B} {S}² {'dense' if dense else 'pruned'}: median {statistics.median(times):.3f} ms")
    replay, marks, runs = StageGraphs._replay, [], []

    def timed_replay(self, key, program, ctx):  # events around each group's replay, no profiler
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = replay(self, key, program, ctx)
        b.record()
        marks.append((a, b))
        return out

    StageGraphs._replay = timed_replay
    for i in range(40):
        decider.set_keep(masks[i % 8])
        marks.clear()
        run(i, False)
        torch.cuda.synchronize()
        runs.append(list(marks))
    StageGraphs._replay = replay
    n = len(runs[0])
    spans = [statistics.median(r[g][0].elapsed_time(r[g][1]) * 1e3 for r in runs) for g in range(n)]
    waits = [statistics.median(r[g - 1][1].elapsed_time(r[g][0]) * 1e3 for r in runs) for g in range(1, n)]
    print(
        "group replays (µs, event to event): "
        + ", ".join(f"{t:.1f}" for t in spans)
        + "; GPU idle between groups (µs): "
        + ", ".join(f"{t:.1f}" for t in waits)
    )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(4):
            run(i, True)
        torch.cuda.synchronize()
    dense_k = [e.device_time_total for e in prof.events() if e.device_type.name == "CUDA"]
    dense_names = collections.Counter(e.name[:90] for e in prof.events() if e.device_type.name == "CUDA")
    print(f"kernels per dense run: {len(dense_k) / 4:.0f}, kernel time {sum(dense_k) / 4e3:.3f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(4):
            run(i, False)
        torch.cuda.synchronize()
    k = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            k[e.name[:90]][0] += 1
            k[e.name[:90]][1] += e.device_time_total
    total = sum(v[1] for v in k.values()) / 4
    print(f"kernels per pruned run: {sum(v[0] for v in k.values()) / 4:.0f}, kernel time {total / 1e3:.3f} ms")
    for nm, (c, t) in sorted(k.items(), key=lambda kv: -kv[1][1])[:45]:
        print(f"{c / 4:6.1f} {t / 4:9.1f} µs  {nm}")
    if "--diff" in sys.argv:
        print("kernels whose count differs, per run (dense → pruned, pruned µs):")
        for nm in sorted(set(k) | set(dense_names), key=lambda n: -k[n][1] if n in k else 0):
            if dense_names[nm] != (k[nm][0] if nm in k else 0):
                c, t = k[nm] if nm in k else (0, 0.0)
                print(f"{dense_names[nm] / 4:6.1f} → {c / 4:6.1f} {t / 4:9.1f} µs  {nm}")
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name[:60]) for e in prof.events() if e.device_type.name == "CUDA"
    )
    gaps = [(b[0] - a[1], a[2], b[2]) for a, b in zip(spans, spans[1:])]
    idle = sum(g for g, _, _ in gaps if g < 1000) / 4  # the 4 runs' own gaps, not the host time between runs
    print(f"GPU idle between kernels per pruned run: {idle:.1f} µs; gaps of 10 µs or more (per run):")
    big = collections.defaultdict(lambda: [0, 0.0])
    for g, a, b in gaps:
        if 10 <= g < 1000:
            big[f"{a} → {b}"][0] += 1
            big[f"{a} → {b}"][1] += g
    for nm, (c, t) in sorted(big.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"{c / 4:6.1f} {t / 4:9.1f} µs  {nm}")
    eager = StageGraphs(64, capture=False)
    for i in range(3):
        run(i, False, eager.run)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(4):
            run(i, False, eager.run)
        torch.cuda.synchronize()
    print("same program, eager, by aten op (CUDA µs per run, calls per run):")
    rows = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.device_time_total > 0]
    for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:40]:
        print(f"{e.count / 4:6.1f} {e.self_device_time_total / 4:9.1f} µs  {e.key}")
