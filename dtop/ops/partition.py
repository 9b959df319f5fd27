"""The compaction plan of a packed token stream: which tokens stay, in which order, at which offsets.

Reference: a running count of kept tokens gives each kept token its place (segments are contiguous
and in image order, so no sort is needed). Fast path (CUDA): one Triton kernel,
:mod:`dtop.kernels.partition`, that also writes straight into CUDA-graph buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dtop.kernels import load


def running_count(flag: Tensor) -> Tensor:
    """[0, cumsum(flag)]: how many flagged positions precede each position (and, last, the total)."""
    return F.pad(flag.long().cumsum(0), (1, 0))


def _stable_partition(flag: Tensor, before: Tensor) -> Tensor:
    """The permutation listing flagged positions first, then the others, each in their order.

    ``before`` = [0, cumsum(flag)]: the number of flagged positions before each position.
    """
    ar = torch.arange(flag.shape[0], device=flag.device)
    dest = torch.where(flag, before[1:] - 1, before[-1] + ar - before[1:])
    return torch.empty_like(ar).scatter_(0, dest, ar)


def _relabel(
    order: Tensor, batch: Tensor, pos: Tensor, n_keep: Tensor, rest_batch: int, num_patches: int
) -> tuple[Tensor, Tensor]:
    """Batch and pos in ``order``; past the first ``n_keep``: image ``rest_batch``, positions cycling over the grid."""
    ar = torch.arange(order.shape[0], device=order.device)
    first = ar < n_keep
    return torch.where(first, batch[order], rest_batch), torch.where(first, pos[order], ar % num_patches)


def _kept_before(keep: Tensor, batch: Tensor, cu_seqlens: Tensor, n_img: int) -> tuple[Tensor, Tensor, Tensor]:
    """(keep restricted to the first ``n_img`` images, kept tokens before each position, ... before each image)."""
    keep = keep & (batch < n_img)
    kept = running_count(keep)
    return keep, kept, kept[cu_seqlens[: n_img + 1].long()]


def _place(out: Sequence[Tensor] | None, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` copied into the leading elements of the ``out`` buffers (as they are without buffers)."""
    if out is None:
        return list(tensors)
    return [dst[: t.shape[0]].copy_(t) for dst, t in zip(out, tensors)]


def partition_reference(
    flag: Tensor,
    batch: Tensor,
    pos: Tensor,
    cu_seqlens: Tensor,
    n_img: int,
    rest_batch: int,
    num_patches: int,
    absorb: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kept tokens (``flag`` set and image < ``n_img``) first, each image's in order, then the rest, in order.

    Returns ``order`` (the permutation), ``batch`` and ``pos`` in that order (the rest relabelled as
    image ``rest_batch`` at positions cycling over ``num_patches``), the kept tokens' ``cu_seqlens``
    over the first ``n_img`` images (int32; with ``absorb`` the last offset is T, so the last image
    takes the rest) and ``stats`` = [kept, longest and shortest kept segment, kept tokens with pos < 0].

    No sort: segments are contiguous and in image order, so a running count of kept tokens gives every
    kept token its place. On CUDA one Triton kernel (:mod:`dtop.kernels.partition`) does all of this.
    """
    keep, kept, before = _kept_before(flag, batch, cu_seqlens, n_img)
    order = _stable_partition(keep, kept)
    out_batch, out_pos = _relabel(order, batch, pos, kept[-1], rest_batch, num_patches)
    counts = before[1:] - before[:-1]
    stats = torch.stack([kept[-1], counts.max(), counts.min(), (keep & (pos < 0)).sum()])
    cu = before.to(torch.int32)
    if absorb:
        cu[-1:].fill_(flag.shape[0])
    return order, out_batch, out_pos, cu, stats


def partition(
    flag: Tensor,
    batch: Tensor,
    pos: Tensor,
    cu_seqlens: Tensor,
    n_img: int,
    rest_batch: int,
    num_patches: int,
    absorb: bool,
    out: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`partition_reference`, as one Triton kernel on CUDA; ``out`` (batch, pos, cu_seqlens, stats): buffers
    to place the results in (their leading elements: the kernel writes there directly)."""
    kernel = load("partition") if flag.is_cuda else None
    if kernel is not None:
        return kernel.partition(flag, batch, pos, cu_seqlens, n_img, rest_batch, num_patches, absorb, out)
    order, *result = partition_reference(flag, batch, pos, cu_seqlens, n_img, rest_batch, num_patches, absorb)
    return order, *_place(out, result)


def partition_with_extra(
    keep: Tensor,
    batch: Tensor,
    pos: Tensor,
    cu_seqlens: Tensor,
    n_img: int,
    extra_batch: Tensor,
    extra_keep: Tensor,
    num_patches: int,
    out: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`partition_reference` over the stream's tokens followed by extra tokens (non-patch, image
    ``extra_batch`` in non-decreasing order, kept where ``extra_keep``), which end their image's segment.

    PyTorch only: the extra tokens (DToP's class summaries) are an ablation, not the paper's default.
    """
    keep, kept, before = _kept_before(keep, batch, cu_seqlens, n_img)
    ekeep = extra_keep & (extra_batch < n_img)
    ekept = running_count(ekeep)
    ebefore = ekept[torch.searchsorted(extra_batch, torch.arange(n_img + 1, device=keep.device))]
    cu = before + ebefore
    n_keep, n_drop = cu[-1], keep.shape[0] - kept[-1]
    ar, ear = torch.arange(keep.shape[0], device=keep.device), torch.arange(ekeep.shape[0], device=keep.device)
    # a kept stream token goes after the kept extras of earlier images; a kept extra token after
    # its image's kept stream tokens; dropped ones follow in order
    dest = torch.cat(
        [
            torch.where(keep, kept[1:] - 1 + ebefore[batch], n_keep + ar - kept[1:]),
            torch.where(
                ekeep, before[(extra_batch + 1).clamp(max=n_img)] + ekept[1:] - 1, n_keep + n_drop + ear - ekept[1:]
            ),
        ]
    )
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(dest.shape[0], device=dest.device))
    all_batch = torch.cat([batch, extra_batch])
    all_pos = torch.cat([pos, torch.full_like(extra_batch, -1)])
    out_batch, out_pos = _relabel(order, all_batch, all_pos, n_keep, n_img, num_patches)
    counts = cu[1:] - cu[:-1]
    special = (keep & (pos < 0)).sum() + ekept[-1]
    return order, *_place(
        out, [out_batch, out_pos, cu.to(torch.int32), torch.stack([n_keep, counts.max(), counts.min(), special])]
    )
