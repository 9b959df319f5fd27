"""DToP's context rule (Sec. 3.4): of the easy tokens, the ``k`` most confident of each (image, class) stay.

Reference: two stable sorts rank every easy token within its group, a few PyTorch ops mark the exits.
Fast path (CUDA, a plain ``k``): one Triton kernel, :mod:`dtop.kernels.context`, that ranks each easy
token by counting the easy tokens of its image and class that beat it, marks the exits and writes the
keep mask — the sorts, gathers and scatters were ~20 kernels per stage, as much time as the pruned
layers saved at small batches.

A token beats another when it is more confident, or equally confident and earlier in the stream (the
order a stable descending sort gives), so both paths keep the very same tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dtop.kernels import load
from dtop.ops.grade import flat_rows, mark_exits


def _sort_key(key: Tensor, bound: int) -> Tensor:
    """``key`` (values in [0, bound]) in the narrowest integer dtype that holds it.

    GPU radix sorts make one pass per key byte, so a narrow key sorts in fewer passes.
    """
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max:
            return key.to(dtype)
    return key


def topk_per_group(group: Tensor, score: Tensor, k: int | Tensor, num_groups: int) -> Tensor:
    """Mark the ``k`` highest-scoring members of every group, vectorised over all groups.

    ``group`` holds ids in [0, num_groups], where ``num_groups`` means "in no group"; ``k`` is one
    number or one per group id ([num_groups + 1]). Equal scores rank in stream order.
    """
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(_sort_key(group[order], num_groups), stable=True)]
    g = group[order]
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=group.device).index_add_(0, g, torch.ones_like(g))
    starts = counts.cumsum(0) - counts
    rank = torch.arange(g.numel(), device=g.device) - starts[g]
    limit = k[g] if isinstance(k, Tensor) else k
    chosen = (rank < limit) & (g < num_groups)
    return torch.zeros_like(chosen).index_put((order,), chosen)


def topk_context_reference(
    conf: Tensor,
    cls: Tensor,
    easy: Tensor,
    batch: Tensor,
    pos: Tensor,
    num_images: int,
    num_classes: int,
    k: int,
    exit_stage: Tensor,
    stage: int,
    idx: Tensor | None,
    stream_pos: Tensor,
) -> Tensor:
    """The keep mask over the stream once the easy graded tokens left, except the ``k`` most confident of
    each (image ``batch``, class ``cls``).

    The graded tokens are the stream's tokens ``idx`` (None: the whole stream), at grid positions ``pos``;
    a leaving token's exit stage (``exit_stage`` [B·N + 1], flat over (image, patch)) becomes ``stage``.
    Tokens that are not patches in the stream (``stream_pos`` < 0) always stay.
    """
    G = num_images * num_classes
    group = torch.where(easy, batch * num_classes + cls, torch.full_like(cls, G))
    exits = easy & ~topk_per_group(group, conf, k, G)
    num_patches = (exit_stage.shape[0] - 1) // num_images
    mark_exits(exit_stage, flat_rows(batch, pos, num_patches, exit_stage.shape[0] - 1), exits, stage)
    return keep_over_stream(~exits, idx, stream_pos)


def keep_over_stream(kept: Tensor, idx: Tensor | None, stream_pos: Tensor) -> Tensor:
    """The keep mask over the whole stream from the one over the graded tokens (the stream's tokens ``idx``;
    None: the stream itself). Tokens that are not patches (``stream_pos`` < 0) never leave."""
    if idx is None:
        return kept
    keep = torch.ones(stream_pos.shape[0], dtype=torch.bool, device=kept.device).index_put((idx,), kept)
    return keep | (stream_pos < 0)


def topk_context(
    conf: Tensor,
    cls: Tensor,
    easy: Tensor,
    batch: Tensor,
    pos: Tensor,
    cu_seqlens: Tensor,
    num_classes: int,
    k: int,
    exit_stage: Tensor,
    stage: int,
    idx: Tensor | None,
    stream_pos: Tensor,
) -> Tensor:
    """:func:`topk_context_reference`, as one kernel on CUDA. The graded tokens are in image segments
    (``cu_seqlens`` [B + 1], ``batch`` non-decreasing), as a :class:`~dtop.models.packed.TokenStream` keeps them."""
    B = cu_seqlens.shape[0] - 1
    kernel = load("context") if conf.is_cuda else None
    if kernel is None:
        return topk_context_reference(
            conf, cls, easy, batch, pos, B, num_classes, k, exit_stage, stage, idx, stream_pos
        )
    num_patches = (exit_stage.shape[0] - 1) // B
    return kernel.topk_context(
        conf, cls, easy, batch, pos, cu_seqlens, k, num_patches, exit_stage, stage, idx, stream_pos
    )
