"""Whole-image helpers and mmsegmentation-style sliding-window inference.

Plain ViTs are trained on fixed crops; on larger eval images mmseg runs them on a grid of
crop-sized windows and averages the overlapping logits. This module reproduces that so
numbers are comparable with published mmseg results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dtop.ops.resize import resize_bilinear

__all__ = ["MAC_KINDS", "infer_labels", "resize_logits", "slide_inference", "slide_windows", "stitch_exit_maps"]


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``[B, C, h, w]`` logits to ``size`` (H, W), align_corners=False as mmseg."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return resize_bilinear(logits, (int(size[0]), int(size[1])))


def slide_windows(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` of mmseg's ``slide_inference`` grid.

    Windows start every ``stride`` pixels and the last one in each direction is shifted
    back to end at the border, so all windows have size ``min(crop, image)`` and never
    leave the image; a side shorter than the crop is covered by one window. Requires
    ``stride <= crop_size`` so that consecutive windows leave no gap.
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    stride_h, stride_w = int(stride[0]), int(stride[1])
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"crop_size and stride must be positive, got crop_size={crop_size}, stride={stride}")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {tuple(stride)} larger than crop_size {tuple(crop_size)} would leave pixels unseen")
    grids_h = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    grids_w = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for i in range(grids_h):
        y2 = min(i * stride_h + crop_h, height)
        y1 = max(y2 - crop_h, 0)
        for j in range(grids_w):
            x2 = min(j * stride_w + crop_w, width)
            x1 = max(x2 - crop_w, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def slide_inference(
    forward: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    crop_size: Sequence[int],
    stride: Sequence[int],
) -> Tensor:
    """Average the logits of ``forward`` over the :func:`slide_windows` grid.

    Args:
        forward: maps a crop ``[B, 3, h, w]`` to logits ``[B, num_classes, h, w]`` (at the
            crop's resolution: resize inside ``forward`` if the model predicts at a stride).
        image: ``[B, 3, H, W]``.
        crop_size, stride: (H, W).

    Returns:
        float32 logits ``[B, num_classes, H, W]``: the sum over windows divided by the
        number of windows covering each pixel. Accumulated in float32 so overlapping
        bf16/fp16 logits do not lose precision.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
    batch, _, height, width = image.shape
    logits = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(height, width, crop_size, stride):
        out = forward(image[:, :, y1:y2, x1:x2])
        if tuple(out.shape) != (batch, num_classes, y2 - y1, x2 - x1):
            raise ValueError(
                f"forward returned shape {tuple(out.shape)} for a crop of {y2 - y1}x{x2 - x1}; expected "
                f"{(batch, num_classes, y2 - y1, x2 - x1)} (logits at the crop's resolution)"
            )
        logits[:, :, y1:y2, x1:x2] += out.float()
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def stitch_exit_maps(
    maps: Sequence[Tensor], windows: Sequence[tuple[int, int, int, int]], size: Sequence[int], patch: int
) -> Tensor:
    """One token-grid exit map [B, ceil(H/p), ceil(W/p)] of a slide-inferred image from its windows' maps.

    Each window's map [B, h, w] covers its pixels ``patch`` × ``patch`` per token; a pixel takes the
    stage of the last window over it (windows in :func:`slide_windows` order), and each output token
    the stage at its centre pixel, so the map reads like a whole-image one.
    """
    height, width = int(size[0]), int(size[1])
    pixels = maps[0].new_zeros(maps[0].shape[0], height, width)
    for grid, (y1, y2, x1, x2) in zip(maps, windows, strict=True):
        up = grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
        pixels[:, y1:y2, x1:x2] = up[:, : y2 - y1, : x2 - x1]
    ys = (torch.arange(0, height, patch) + patch // 2).clamp(max=height - 1)
    xs = (torch.arange(0, width, patch) + patch // 2).clamp(max=width - 1)
    return pixels[:, ys][:, :, xs]


MAC_KINDS = ("", "_linear", "_mmcv")  # the conventions of dtop.models.macs: macs, macs_linear, macs_mmcv
_SUMMED = (
    "tokens_per_stage",
    "exits_per_stage",
    "exits_per_class",
    *(f"macs{kind}{dense}" for kind in MAC_KINDS for dense in ("", "_dense")),
)


def infer_labels(
    model: Any,
    run: Any,
    images: Tensor,
    size: tuple[int, int],
    slide: tuple[Sequence[int], Sequence[int]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pixel labels at ``size`` and per-image stats summed over slide windows (``slide``: crop and stride;
    None: the whole image), with each crop's dense MACs beside its own (``macs*_dense``) and the window count.

    ``model`` is a :class:`~dtop.models.engine.Segmentor` and ``run`` the model or its
    :class:`~dtop.models.graphs.GraphedSegmentor` (this layer does not import models). Evaluation and
    ``dtop-predict`` share it, so a prediction is what the metrics measured.
    """
    collected: list[dict[str, Tensor]] = []

    def collect(crop: Tensor, stats: dict[str, Tensor]) -> None:
        for kind, value in zip(MAC_KINDS, model.dense_macs(*crop.shape[-2:]), strict=True):
            stats[f"macs{kind}_dense"] = torch.full_like(stats["macs"], value)
        collected.append(stats)

    def forward(crop: Tensor) -> Tensor:
        scores, out = run.predict(crop)
        collect(crop, out.stats)
        return scores

    if slide is None and tuple(images.shape[-2:]) == size:  # labels straight from the token grid, no score maps
        labels, out = run.segment(images)
        collect(images, out.stats)
        return labels, {**out.stats, "windows": torch.ones_like(out.stats["macs"])}
    scores = forward(images) if slide is None else slide_inference(forward, images, model.num_classes, *slide)
    stats = {k: torch.stack([c[k] for c in collected]).sum(0) for k in _SUMMED}
    stats["windows"] = torch.full_like(stats["macs"], len(collected))
    if slide is None:
        stats["exit_stage"] = collected[0]["exit_stage"]
    else:
        windows = slide_windows(*images.shape[-2:], *slide)
        maps = [c["exit_stage"] for c in collected]
        stats["exit_stage"] = stitch_exit_maps(maps, windows, images.shape[-2:], model.backbone.patch_size)
    return resize_logits(scores, size).argmax(1), stats
