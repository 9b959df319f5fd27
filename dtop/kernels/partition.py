"""Stable partition of a packed token stream as one Triton kernel: the compaction plan of a stage end.

Why: at a stage end the engine lists the kept tokens first (each image's in order), then the rest,
relabels the rest as the phantom image and derives the new segment offsets and a few statistics.
In PyTorch that is ~25 kernels on a few thousand elements each (running counts, scatters, gathers,
reductions) — each a few microseconds of launch and tail, a real share of a batch-1 forward. One
program walks the stream in chunks twice (running count, then placement) and does it all.

Same results as :func:`dtop.models.packed.partition_reference` (tests compare them under Triton's
interpreter); import this module only where Triton exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 4096  # tokens per chunk; larger streams loop over chunks


@triton.jit
def _chunk(flag_ptr, batch_ptr, pos_ptr, c, T, n_img, BLOCK: tl.constexpr):
    """Chunk ``c`` of the stream: offsets, in-range mask, kept flags, images and positions."""
    offs = c * BLOCK + tl.arange(0, BLOCK)
    m = offs < T
    b = tl.load(batch_ptr + offs, mask=m, other=0)
    k = (tl.load(flag_ptr + offs, mask=m, other=0) != 0) & (b < n_img) & m
    return offs, m, k, b, tl.load(pos_ptr + offs, mask=m, other=0)


@triton.jit(do_not_specialize=["T", "n_img", "rest_batch", "num_patches"])  # stream sizes vary: no recompiles
def _partition(flag_ptr, batch_ptr, pos_ptr, cu_ptr, run_ptr, order_ptr, batch_out_ptr, pos_out_ptr, cu_out_ptr,
               stats_ptr, T, n_img, rest_batch, num_patches, ABSORB: tl.constexpr, CHUNKS: tl.constexpr,
               BLOCK: tl.constexpr, NB: tl.constexpr):
    # pass 1: inclusive running count of kept tokens (into run), kept total and kept non-patch tokens
    kept = tl.full([], 0, tl.int32)
    special = tl.full([], 0, tl.int32)
    for c in range(CHUNKS):
        offs, m, k, b, p = _chunk(flag_ptr, batch_ptr, pos_ptr, c, T, n_img, BLOCK)
        ki = k.to(tl.int32)
        tl.store(run_ptr + offs, tl.cumsum(ki, 0) + kept, mask=m)
        special += tl.sum((k & (p < 0)).to(tl.int32), 0)
        kept += tl.sum(ki, 0)
    tl.debug_barrier()
    # pass 2: kept tokens to their running-count place, the others after all kept ones, in order
    for c in range(CHUNKS):
        offs, m, k, b, p = _chunk(flag_ptr, batch_ptr, pos_ptr, c, T, n_img, BLOCK)
        run = tl.load(run_ptr + offs, mask=m, other=0)
        dest = tl.where(k, run - 1, kept + offs - run)
        tl.store(order_ptr + dest, offs.to(tl.int64), mask=m)
        tl.store(batch_out_ptr + dest, tl.where(k, b, rest_batch), mask=m)
        tl.store(pos_out_ptr + dest, tl.where(k, p, (dest % num_patches).to(tl.int64)), mask=m)
    # segment offsets: kept tokens before each image's first token
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


def partition(flag: Tensor, batch: Tensor, pos: Tensor, cu_seqlens: Tensor, n_img: int, rest_batch: int,
              num_patches: int, absorb: bool, out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(order, batch, pos, cu_seqlens, stats): see :func:`dtop.models.packed.partition_reference`.

    ``out``: contiguous (batch, pos, cu_seqlens, stats) tensors to write into (the kernel writes the
    first T, n_img + 1 and 4 elements), sparing the copies into CUDA-graph buffers.
    """
    T = flag.shape[0]
    block = min(MAX_BLOCK, max(128, triton.next_power_of_2(max(T, 1))))
    chunks = triton.next_power_of_2(max(1, triton.cdiv(T, block)))  # a power of two: few compilations
    dev = flag.device
    run = torch.empty(T, dtype=torch.int32, device=dev)
    order = torch.empty(T, dtype=torch.long, device=dev)
    if out is None:
        out = (torch.empty_like(batch), torch.empty_like(pos), torch.empty(n_img + 1, dtype=torch.int32, device=dev),
               torch.empty(4, dtype=torch.long, device=dev))
    batch_out, pos_out, cu, stats = out
    _partition[(1,)](flag, batch, pos, cu_seqlens, run, order, batch_out, pos_out, cu, stats, T, n_img, rest_batch,
                     num_patches, ABSORB=absorb, CHUNKS=chunks, BLOCK=block, NB=triton.next_power_of_2(n_img + 2),
                     num_warps=4 if block <= 1024 else 8)
    return order, batch_out[:T], pos_out[:T], cu[: n_img + 1], stats
