"""DToP's top-k-per-class context (:func:`dtop.ops.context.topk_context_reference`) as one Triton kernel.

Each program takes a tile of tokens and gives every easy one its rank in its (image, class) group by
counting, over its image's segment, the easy tokens of the same class that beat it (more confident, or
as confident and earlier). A token whose rank reaches ``k`` exits: its exit stage is written and its
bit of the stream's keep mask cleared. The work is quadratic in an image's active tokens, but it is a few compares per
pair in registers (8192 tokens, a 1024×2048 ViT image, are 67 M pairs: tens of microseconds), where
the sorting reference is ~20 launches per stage. Tiles without an easy token, and blocks of the segment
without one, are skipped.

Same results as the reference (tests compare them under Triton's interpreter); import this module only
where Triton exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (tokens ranked per program, segment tokens compared per step, warps). A program's loop runs over its
# image's whole segment, so the step count sets its latency: wide steps keep a 700-token image at 3
# steps, and 8 rows give a batch-1 stream enough programs to fill the GPU. H100, µs per call
# (tools/dev/probe_context_tiles.py; 1×1024, 8×700, 32×700, 1×8192, 2×6000 tokens): 6.7, 10.4, 27.6,
# 95.4, 86.5 against 19.0, 26.2, 42.6, 155.0, 213.5 for 32 rows × 64 columns.
TILES = (8, 256, 4)


@triton.jit(do_not_specialize=["T", "k", "num_patches", "trash", "stage"])
def _topk_context(
    conf_ptr,
    cls_ptr,
    easy_ptr,
    batch_ptr,
    pos_ptr,
    cu_ptr,
    exit_ptr,
    idx_ptr,
    stream_pos_ptr,
    keep_ptr,
    T,
    k,
    num_patches,
    trash,
    stage,
    INDEXED: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_t = i < T
    easy_i = tl.load(easy_ptr + i, mask=in_t, other=0) != 0
    exits = tl.zeros([ROWS], dtype=tl.int1)
    if tl.max(easy_i.to(tl.int32), 0) > 0:
        b_i = tl.load(batch_ptr + i, mask=in_t, other=0)
        conf_i = tl.load(conf_ptr + i, mask=in_t, other=0.0)
        cls_i = tl.load(cls_ptr + i, mask=in_t, other=-1)
        lo = tl.min(tl.load(cu_ptr + b_i, mask=in_t, other=2147483647), 0)
        hi = tl.max(tl.load(cu_ptr + b_i + 1, mask=in_t, other=0), 0)
        rank = tl.zeros([ROWS], dtype=tl.int32)
        for start in range(lo, hi, COLS):
            j = start + tl.arange(0, COLS)
            in_j = j < hi
            easy_j = tl.load(easy_ptr + j, mask=in_j, other=0) != 0
            if tl.max(easy_j.to(tl.int32), 0) > 0:
                b_j = tl.load(batch_ptr + j, mask=in_j, other=-1)
                conf_j = tl.load(conf_ptr + j, mask=in_j, other=0.0)
                cls_j = tl.load(cls_ptr + j, mask=in_j, other=-2)
                same = easy_j[None, :] & (b_j[None, :] == b_i[:, None]) & (cls_j[None, :] == cls_i[:, None])
                better = (conf_j[None, :] > conf_i[:, None]) | (
                    (conf_j[None, :] == conf_i[:, None]) & (j[None, :] < i[:, None])
                )
                rank += tl.sum((same & better).to(tl.int32), 1)
        exits = easy_i & (rank >= k) & in_t
        p = tl.load(pos_ptr + i, mask=exits, other=-1)
        row = tl.where(p >= 0, b_i * num_patches + p, trash)
        tl.store(exit_ptr + row, tl.full([ROWS], 0, tl.int64) + stage, mask=exits)
    if INDEXED:  # the graded tokens are the stream's tokens idx
        s = tl.load(idx_ptr + i, mask=in_t, other=0)
    else:
        s = i
    special = tl.load(stream_pos_ptr + s, mask=in_t, other=0) < 0
    tl.store(keep_ptr + s, (~exits | special).to(tl.int8), mask=in_t)


def topk_context(
    conf: Tensor,
    cls: Tensor,
    easy: Tensor,
    batch: Tensor,
    pos: Tensor,
    cu_seqlens: Tensor,
    k: int,
    num_patches: int,
    exit_stage: Tensor,
    stage: int,
    idx: Tensor | None,
    stream_pos: Tensor,
    tiles: tuple[int, int, int] = TILES,
) -> Tensor:
    """The keep mask over the stream: see :func:`dtop.ops.context.topk_context_reference`; ``tiles``:
    (rows, cols, warps), powers of two (the probe compares them)."""
    T = conf.shape[0]
    dev = conf.device
    # tokens outside idx (the stream's non-patch tokens) stay
    keep = torch.empty(stream_pos.shape[0], dtype=torch.bool, device=dev)
    if idx is not None:
        keep.fill_(True)
    if T:
        rows, cols, warps = tiles
        _topk_context[(triton.cdiv(T, rows),)](
            conf.contiguous(),
            cls.contiguous(),
            easy.contiguous().view(torch.int8),
            batch.contiguous(),
            pos.contiguous(),
            cu_seqlens.contiguous(),
            exit_stage,
            idx.contiguous() if idx is not None else batch,
            stream_pos.contiguous(),
            keep.view(torch.int8),
            T,
            int(k),
            int(num_patches),
            exit_stage.shape[0] - 1,
            int(stage),
            INDEXED=idx is not None,
            ROWS=rows,
            COLS=cols,
            num_warps=warps,
        )
    return keep
