"""Stable partition of a packed token stream in Triton: the compaction plan of a stage end.

Why: at a stage end the engine lists the kept tokens first (each image's in order), then the rest,
relabels the rest as the phantom image and derives the new segment offsets and a few statistics.
In PyTorch that is ~25 kernels on a few thousand elements each (running counts, scatters, gathers,
reductions) — each a few microseconds of launch and tail, a real share of a batch-1 forward. Here
a running count of kept tokens places every token: in one program for a short stream, over a grid
of chunks (count, place, offsets) for a long one.

Same results as :func:`dtop.ops.partition.partition_reference` (tests compare them under Triton's
interpreter); import this module only where Triton exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 4096  # streams up to this long take one program; longer ones a grid of chunks
GRID_BLOCK = 1024  # tokens per program of the grid


@triton.jit
def _chunk(flag_ptr, batch_ptr, pos_ptr, c, T, n_img, BLOCK: tl.constexpr):
    """Chunk ``c`` of the stream: offsets, in-range mask, kept flags, images and positions."""
    offs = c * BLOCK + tl.arange(0, BLOCK)
    m = offs < T
    b = tl.load(batch_ptr + offs, mask=m, other=0)
    k = (tl.load(flag_ptr + offs, mask=m, other=0) != 0) & (b < n_img) & m
    return offs, m, k, b, tl.load(pos_ptr + offs, mask=m, other=0)


@triton.jit
def _count_chunk(flag_ptr, batch_ptr, pos_ptr, run_ptr, c, T, n_img, BLOCK: tl.constexpr):
    """Inclusive running count of kept tokens within chunk ``c`` (into run); (kept, kept non-patch) in it."""
    offs, m, k, b, p = _chunk(flag_ptr, batch_ptr, pos_ptr, c, T, n_img, BLOCK)
    ki = k.to(tl.int32)
    tl.store(run_ptr + offs, tl.cumsum(ki, 0), mask=m)
    return tl.sum(ki, 0), tl.sum((k & (p < 0)).to(tl.int32), 0)


@triton.jit
def _place_chunk(
    flag_ptr,
    batch_ptr,
    pos_ptr,
    run_ptr,
    order_ptr,
    batch_out_ptr,
    pos_out_ptr,
    c,
    before,
    kept,
    T,
    n_img,
    rest_batch,
    num_patches,
    BLOCK: tl.constexpr,
):
    """Kept tokens of chunk ``c`` to their running-count place, the others after all ``kept`` ones, in order.

    ``before``: kept tokens in earlier chunks; the running counts in run become stream-wide.
    """
    offs, m, k, b, p = _chunk(flag_ptr, batch_ptr, pos_ptr, c, T, n_img, BLOCK)
    run = tl.load(run_ptr + offs, mask=m, other=0) + before
    tl.store(run_ptr + offs, run, mask=m)
    dest = tl.where(k, run - 1, kept + offs - run)
    tl.store(order_ptr + dest, offs.to(tl.int64), mask=m)
    tl.store(batch_out_ptr + dest, tl.where(k, b, rest_batch), mask=m)
    tl.store(pos_out_ptr + dest, tl.where(k, p, (dest % num_patches).to(tl.int64)), mask=m)


@triton.jit
def _offsets(cu_ptr, run_ptr, cu_out_ptr, stats_ptr, kept, special, T, n_img, ABSORB: tl.constexpr, NB: tl.constexpr):
    """Segment offsets (kept tokens before each image's first token) and the stats, from the stream-wide run."""
    i = tl.arange(0, NB)
    lo = tl.load(cu_ptr + i, mask=i <= n_img, other=0)
    before = tl.load(run_ptr + lo - 1, mask=(i <= n_img) & (lo > 0), other=0)
    hi = tl.load(cu_ptr + i + 1, mask=i < n_img, other=0)
    count = tl.load(run_ptr + hi - 1, mask=(i < n_img) & (hi > 0), other=0) - before
    cu = before
    if ABSORB:
        cu = tl.where(i == n_img, T, before)
    tl.store(cu_out_ptr + i, cu, mask=i <= n_img)
    tl.store(stats_ptr, kept.to(tl.int64))
    tl.store(stats_ptr + 1, tl.max(tl.where(i < n_img, count, -1), 0).to(tl.int64))
    tl.store(stats_ptr + 2, tl.min(tl.where(i < n_img, count, 2147483647), 0).to(tl.int64))
    tl.store(stats_ptr + 3, special.to(tl.int64))


_SIZES = ["T", "n_img", "rest_batch", "num_patches"]  # stream sizes vary every batch: no recompiles


@triton.jit(do_not_specialize=_SIZES)
def _partition(
    flag_ptr,
    batch_ptr,
    pos_ptr,
    cu_ptr,
    run_ptr,
    order_ptr,
    batch_out_ptr,
    pos_out_ptr,
    cu_out_ptr,
    stats_ptr,
    T,
    n_img,
    rest_batch,
    num_patches,
    ABSORB: tl.constexpr,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
):
    """A stream of one chunk, in one program: count, place, offsets."""
    kept, special = _count_chunk(flag_ptr, batch_ptr, pos_ptr, run_ptr, 0, T, n_img, BLOCK)
    tl.debug_barrier()
    _place_chunk(
        flag_ptr,
        batch_ptr,
        pos_ptr,
        run_ptr,
        order_ptr,
        batch_out_ptr,
        pos_out_ptr,
        0,
        0,
        kept,
        T,
        n_img,
        rest_batch,
        num_patches,
        BLOCK,
    )
    tl.debug_barrier()
    _offsets(cu_ptr, run_ptr, cu_out_ptr, stats_ptr, kept, special, T, n_img, ABSORB, NB)


@triton.jit(do_not_specialize=["T", "n_img", "chunks"])
def _count(flag_ptr, batch_ptr, pos_ptr, run_ptr, counts_ptr, T, n_img, chunks, BLOCK: tl.constexpr):
    """Grid step 1: each program counts its chunk (counts: kept per chunk, then kept non-patch per chunk)."""
    c = tl.program_id(0)
    kept, special = _count_chunk(flag_ptr, batch_ptr, pos_ptr, run_ptr, c, T, n_img, BLOCK)
    tl.store(counts_ptr + c, kept)
    tl.store(counts_ptr + chunks + c, special)


@triton.jit(do_not_specialize=_SIZES + ["chunks"])
def _place(
    flag_ptr,
    batch_ptr,
    pos_ptr,
    run_ptr,
    counts_ptr,
    order_ptr,
    batch_out_ptr,
    pos_out_ptr,
    T,
    n_img,
    rest_batch,
    num_patches,
    chunks,
    BLOCK: tl.constexpr,
    CP: tl.constexpr,
):
    """Grid step 2: each program places its chunk, after the kept tokens of the chunks before it."""
    c = tl.program_id(0)
    j = tl.arange(0, CP)
    counts = tl.load(counts_ptr + j, mask=j < chunks, other=0)
    _place_chunk(
        flag_ptr,
        batch_ptr,
        pos_ptr,
        run_ptr,
        order_ptr,
        batch_out_ptr,
        pos_out_ptr,
        c,
        tl.sum(tl.where(j < c, counts, 0), 0),
        tl.sum(counts, 0),
        T,
        n_img,
        rest_batch,
        num_patches,
        BLOCK,
    )


@triton.jit(do_not_specialize=["T", "n_img", "chunks"])
def _finish(
    cu_ptr,
    run_ptr,
    counts_ptr,
    cu_out_ptr,
    stats_ptr,
    T,
    n_img,
    chunks,
    ABSORB: tl.constexpr,
    CP: tl.constexpr,
    NB: tl.constexpr,
):
    """Grid step 3 (one program): offsets and stats."""
    j = tl.arange(0, CP)
    kept = tl.sum(tl.load(counts_ptr + j, mask=j < chunks, other=0), 0)
    special = tl.sum(tl.load(counts_ptr + chunks + j, mask=j < chunks, other=0), 0)
    _offsets(cu_ptr, run_ptr, cu_out_ptr, stats_ptr, kept, special, T, n_img, ABSORB, NB)


def partition(
    flag: Tensor,
    batch: Tensor,
    pos: Tensor,
    cu_seqlens: Tensor,
    n_img: int,
    rest_batch: int,
    num_patches: int,
    absorb: bool,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(order, batch, pos, cu_seqlens, stats): see :func:`dtop.ops.partition.partition_reference`.

    ``out``: contiguous (batch, pos, cu_seqlens, stats) tensors to write into (the kernel writes the
    first T, n_img + 1 and 4 elements), sparing the copies into CUDA-graph buffers.

    A stream of up to ``MAX_BLOCK`` tokens takes one program (one launch: batch-1 streams are
    latency-bound). A longer one takes three launches over a grid of chunks — one program walking
    thousands of tokens is a serial floor the grid removes (docs/performance.md).
    """
    T = flag.shape[0]
    dev = flag.device
    run = torch.empty(T, dtype=torch.int32, device=dev)
    order = torch.empty(T, dtype=torch.long, device=dev)
    if out is None:
        out = (
            torch.empty_like(batch),
            torch.empty_like(pos),
            torch.empty(n_img + 1, dtype=torch.int32, device=dev),
            torch.empty(4, dtype=torch.long, device=dev),
        )
    batch_out, pos_out, cu, stats = out
    nb = triton.next_power_of_2(n_img + 2)
    if T <= MAX_BLOCK:
        block = max(128, triton.next_power_of_2(max(T, 1)))
        _partition[(1,)](
            flag,
            batch,
            pos,
            cu_seqlens,
            run,
            order,
            batch_out,
            pos_out,
            cu,
            stats,
            T,
            n_img,
            rest_batch,
            num_patches,
            ABSORB=absorb,
            BLOCK=block,
            NB=nb,
            num_warps=4 if block <= 1024 else 8,
        )
    else:
        block = min(GRID_BLOCK, MAX_BLOCK)
        chunks = triton.cdiv(T, block)
        cp = triton.next_power_of_2(chunks)
        counts = torch.empty(2 * chunks, dtype=torch.int32, device=dev)
        _count[(chunks,)](flag, batch, pos, run, counts, T, n_img, chunks, BLOCK=block, num_warps=4)
        _place[(chunks,)](
            flag,
            batch,
            pos,
            run,
            counts,
            order,
            batch_out,
            pos_out,
            T,
            n_img,
            rest_batch,
            num_patches,
            chunks,
            BLOCK=block,
            CP=cp,
            num_warps=4,
        )
        _finish[(1,)](cu_seqlens, run, counts, cu, stats, T, n_img, chunks, ABSORB=absorb, CP=cp, NB=nb, num_warps=4)
    return order, batch_out[:T], pos_out[:T], cu[: n_img + 1], stats
