"""Where `dtop-eval`'s time goes on a short evaluation: several test passes in one process, per-batch times.

PASSES=3 python tools/dev/eval_passes.py ckpt_path=... trainer=gpu [any dtop-eval override]

Runs `dtop-eval` with its test loop repeated ``PASSES`` times (the graphs are dropped and captured again
each pass, as in separate runs) and prints one JSON line per pass: the loop's seconds, `images_per_s`,
`images_per_s_wall`, graphs captured and the eval step's milliseconds per batch (first six, median, sum;
the device synchronised around each step). A first pass much slower than the second means first-call
costs (Triton compilation, library initialisation) set a short evaluation's wall clock, not the model.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

import dtop.cli.common as common
from dtop.lit.module import SegModule

_times: list[float] = []
_eval_step = SegModule._eval_step
_evaluate = common.evaluate


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_step(self: SegModule, batch: dict[str, Any], metrics: Any) -> None:
    _sync()
    start = time.perf_counter()
    _eval_step(self, batch, metrics)
    _sync()
    _times.append(round((time.perf_counter() - start) * 1e3, 2))


def _passes(trainer: Any, module: SegModule, dm: Any) -> Any:
    for index in range(int(os.environ.get("PASSES", 3))):
        _times.clear()
        start = time.perf_counter()
        metrics, table = _evaluate(trainer, module, dm)
        ordered = sorted(_times)
        row = {
            "pass": index,
            "loop_s": round(time.perf_counter() - start, 3),
            **{k: metrics.get(k) for k in ("images_per_s", "images_per_s_wall", "graphs_captured", "mIoU", "gmacs")},
            "batches": len(_times),
            "first_ms": _times[:6],
            "median_ms": ordered[len(ordered) // 2] if ordered else None,
            "sum_ms": round(sum(_times), 1),
        }
        print("PASS", json.dumps(row), flush=True)
    return metrics, table


if __name__ == "__main__":
    SegModule._eval_step = _timed_step
    common.evaluate = _passes
    from dtop.cli.evaluate import main

    main()
