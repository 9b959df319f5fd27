"""Drawing: exit maps over images (DToP Fig. 4 / DoViT Fig. 5), class colours, histograms and the
accuracy/computation trade-off curve. Figures are drawn without pyplot's global state, so any thread
or notebook can call these."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD


def figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def stage_colors(num_stages: int) -> np.ndarray:
    """[S, 3] uint8 colours: early exits dark/purple … tokens kept to the end yellow (viridis)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return (np.array([cmap(i / max(num_stages - 1, 1))[:3] for i in range(num_stages)]) * 255).astype(np.uint8)


def stage_names(prune_layers: Sequence[int], depth: int) -> list[str]:
    """Legend text per exit stage: where its tokens left the backbone."""
    return [f"exit after layer {p}" for p in prune_layers] + [f"to the end (layer {depth})"]


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]


def denormalize(
    image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """A normalised [3, H, W] image (``(x - mean) / std`` of [0, 1] RGB) → uint8 [H, W, 3]."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.float().cpu() * s + m).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def colorize(label: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """Class map [H, W] → uint8 [H, W, 3]; ignored / unknown ids are black."""
    lab = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label).astype(np.int64)
    lut = np.zeros((max(256, ignore_index + 1, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[ignore_index] = 0
    return lut[np.clip(lab, 0, len(lut) - 1)]


def exit_map_pixels(exit_stage: torch.Tensor, patch: int, size: tuple[int, int]) -> np.ndarray:
    """Token-grid exit stages [h, w] → one stage per pixel [H, W] (each token covers patch × patch)."""
    grid = exit_stage.cpu().long()
    up = grid.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    return up[: size[0], : size[1]].numpy()


def token_classes(pred: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """The predicted class at each token's centre pixel: [H, W] → [h, w]."""
    H, W = pred.shape[-2:]
    ys = (torch.arange(grid[0]) * patch + patch // 2).clamp(max=H - 1)
    xs = (torch.arange(grid[1]) * patch + patch // 2).clamp(max=W - 1)
    return pred.cpu()[ys][:, xs]


def exit_overlay(image: np.ndarray, stages: np.ndarray, colors: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    return (image * (1 - alpha) + colors[stages] * alpha).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_exit_panel(
    visual: dict[str, Any],
    path: Path,
    *,
    patch: int,
    num_stages: int,
    legend: Sequence[str],
    palette: Sequence[Sequence[int]],
    ignore_index: int,
    normalisation: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> np.ndarray:
    """Input | exit stages over the input | prediction | ground truth (+ legend) → ``path`` (PNG).

    Drawn with PIL at the image's own resolution (small images are enlarged by an integer factor),
    so every token is an exact patch × patch square; returns the overlay. ``visual["image"]`` is the
    model's input, normalised with ``normalisation`` (mean, std).
    """
    from PIL import Image, ImageDraw

    image = denormalize(visual["image"], *normalisation)
    H, W = image.shape[:2]
    colors = stage_colors(num_stages)
    stages = exit_map_pixels(visual["exit_stage"], patch, (H, W))
    overlay = exit_overlay(image, stages, colors)
    panels = [
        ("input", image),
        ("exit stage per token", overlay),
        ("prediction", colorize(visual["pred"], palette, ignore_index)),
        ("ground truth", colorize(visual["label"], palette, ignore_index)),
    ]
    scale = max(1, -(-192 // max(W, 1)))  # at least ~192 px per panel, so the titles fit
    gap, head, font = 6, 22, _font(13)
    counts = np.bincount(visual["exit_stage"].reshape(-1).numpy(), minlength=num_stages)
    rows = -(-num_stages // 2)
    width = 4 * W * scale + 3 * gap
    canvas = Image.new("RGB", (width, head + H * scale + 8 + 20 * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, img) in enumerate(panels):
        x = i * (W * scale + gap)
        big = img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img
        canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (x, head))
        draw.text((x + 2, 3), title if i else f"{title} · {visual['id']}"[:40], fill="black", font=font)
    y0 = head + H * scale + 6
    for s in range(num_stages):
        x, y = (s % 2) * (width // 2) + 2, y0 + (s // 2) * 20
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=tuple(int(c) for c in colors[s]))
        draw.text((x + 20, y + 1), f"{legend[s]}: {counts[s]} tokens", fill="black", font=font)
    canvas.save(path, compress_level=1)
    return overlay


def plot_histograms(
    columns: dict[str, np.ndarray],
    path: Path,
    xlabel: str,
    title: str,
    reference: float | None = None,
    reference_label: str = "",
) -> None:
    fig = figure(6, 3.6)
    ax = fig.subplots()
    values = [v for v in columns.values() if len(v)]
    if values:
        lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for name, v in columns.items():
            ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (mean {np.mean(v):.4g})")
    if reference is not None and math.isfinite(reference):
        ax.axvline(reference, color="k", ls="--", lw=1, label=reference_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_tradeoff(
    table: pd.DataFrame,
    path: str | Path | None,
    *,
    x: str = "gmacs",
    y: str = "mIoU",
    label: str | None = "threshold",
    group: Sequence[str] = (),
    dense: tuple[float, float] | None = None,
    title: str = "mIoU vs GMACs",
    xlabel: str | None = None,
    ax: Any = None,
) -> None:
    """One curve per value combination of the ``group`` columns, (``x``, ``y``) points sorted by ``x`` and
    annotated with ``label``; ``dense`` = (GMACs, mIoU) of the unpruned model as a star. Draws on ``ax``
    when given, else on a new figure saved to ``path``."""
    fig = None
    if ax is None:
        fig = figure(6, 4.2)
        ax = fig.subplots()
    group = [g for g in group if g in table]
    parts = [((), table)] if not group else list(table.groupby(group, dropna=False, sort=True))
    for name, part in parts:
        part = part.dropna(subset=[x, y]).sort_values(x)
        if part.empty:
            continue
        values = name if isinstance(name, tuple) else (name,)
        curve = ", ".join(f"{g.removeprefix('override:')}={v}" for g, v in zip(group, values)) or None
        ax.plot(part[x], part[y], "o-", label=curve)
        if label is not None and label in part:
            for _, row in part.iterrows():
                ax.annotate(
                    f"ξ={row[label]}" if label == "threshold" else str(row[label]),
                    (row[x], row[y]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
    if dense is not None and all(v is not None and math.isfinite(v) for v in dense):
        ax.plot([dense[0]], [dense[1]], "k*", ms=11, label="dense")
    ax.set_xlabel(xlabel or ("GMACs / image" if x.startswith("gmacs") else x))
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if fig is not None:
        fig.savefig(path)
