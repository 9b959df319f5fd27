"""Optional kernel fusion of the per-stage bookkeeping, for CUDA-graph inference.

A stage end is dozens of tiny elementwise/indexing kernels (counts, cumulative sums, scatters); on a
GPU each costs a launch slot whether or not it is captured in a graph. Functions marked
:func:`fusable` are plain PyTorch; inside :func:`fusing` (which :class:`~dtop.models.graphs.StageGraphs`
turns on for CUDA inputs) they run through ``torch.compile``, which fuses each into a few Triton
kernels — the same code, compiled once with dynamic shapes. Everywhere else they run eagerly.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_active = False


@contextmanager
def fusing(on: bool = True) -> Iterator[None]:
    """Run :func:`fusable` functions compiled while inside (only meaningful for CUDA tensors)."""
    global _active
    before, _active = _active, on
    try:
        yield
    finally:
        _active = before


@torch.library.custom_op("dtop::running_count", mutates_args=())
def running_count(flag: torch.Tensor) -> torch.Tensor:
    """[0, cumsum(flag)] as int64: how many flagged positions precede each position (and the total).

    An opaque op so that compiled code keeps the library's scan (CUB on CUDA, ~3 µs for 32k
    elements); Inductor's own scan of one long row runs in a single thread block, ~20× slower.
    """
    return torch.nn.functional.pad(flag.long().cumsum(0), (1, 0))


@running_count.register_fake
def _(flag: torch.Tensor) -> torch.Tensor:
    return flag.new_empty(flag.shape[0] + 1, dtype=torch.long)


def fusable(fn: F) -> F:
    """Mark a pure tensor function (no host syncs, no Python side effects) for compiled fusion."""
    compiled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if not _active:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    return run  # type: ignore[return-value]
