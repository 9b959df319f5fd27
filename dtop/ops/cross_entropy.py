"""Σ of the per-pixel cross-entropy of a [B, K, H, W] logit map, possibly kept factored (upsampled).

Reference: ``F.cross_entropy(..., reduction="sum")`` on the materialised fp32 map. Fast path (CUDA):
the Triton kernels of :mod:`dtop.kernels.cross_entropy`, which read the map once without an fp32
copy and, for a factored :class:`~dtop.ops.resize.Upsampled` map whose source rows fit one tile,
interpolate it inside the kernel instead of forming it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dtop.kernels import load
from dtop.ops.resize import Upsampled, dense


def cross_entropy_sum_reference(
    logits: Tensor | Upsampled, target: Tensor, ignore_index: int, class_weight: Tensor | None
) -> Tensor:
    return F.cross_entropy(
        dense(logits).float(), target, weight=class_weight, ignore_index=ignore_index, reduction="sum"
    )


def cross_entropy_sum(
    logits: Tensor | Upsampled, target: Tensor, ignore_index: int, class_weight: Tensor | None
) -> Tensor:
    """:func:`cross_entropy_sum_reference`, through the Triton kernels on CUDA."""
    kernels = load("cross_entropy") if logits.is_cuda and len(logits.shape) > 2 else None
    if kernels is None:
        return cross_entropy_sum_reference(logits, target, ignore_index, class_weight)
    if isinstance(logits, Upsampled):
        if logits.cols is not None and logits.low.shape[-1] <= kernels.MAX_SOURCE_WIDTH:
            return kernels.upsampled_cross_entropy_sum(
                logits.row_resized(), logits.cols, target, class_weight, ignore_index
            )
        logits = logits.dense()
    return kernels.pixel_cross_entropy_sum(logits, target, class_weight, ignore_index)
