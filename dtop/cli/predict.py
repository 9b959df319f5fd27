"""``dtop-predict ckpt_path=... input=<file|folder|glob> output=<folder>``: segment your own images.

The checkpoint brings its model and data config (no ``experiment=``): each image (any size; PNG, JPEG,
grayscale and RGBA become RGB) is resized and normalised as the checkpoint's evaluation did, inferred
whole or in slide windows as its data config says, and its prediction resized back to the image's own
size. Images of one size run in batches. Per image it writes, under ``output``:

- ``labels/<id>.png``: class ids, an indexed PNG whose palette is the dataset's;
- ``overlays/<id>.png``: the class colours over the image;
- ``exits/<id>.png``: per pixel, the stage its token left the backbone at (indexed, stage colours);
- one row of ``predictions.parquet`` and ``predictions.json``: tokens and exits per stage, GMACs
  (pruned and dense), milliseconds (its batch's inference time over the batch's images).
"""

from __future__ import annotations

import glob
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dtop.cli.common import cli, hydra_app, log, write_json
from dtop.cli.trained import data_info, load_trained
from dtop.data.datasets.filelist import read_image
from dtop.data.transforms import keep_ratio_size
from dtop.errors import ConfigError, DtopError
from dtop.inference import MAC_KINDS, infer_labels
from dtop.models.engine import Segmentor
from dtop.models.graphs import GraphedSegmentor
from dtop.viz import colorize, exit_map_pixels, stage_colors, stage_names

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ImageInputError(DtopError, ValueError):
    """An ``input=`` that names no image, or an image that cannot be read."""


@dataclass
class Item:
    """One image to segment: where it is, its id (output name), its own size and the model's input size."""

    path: Path
    id: str
    size: tuple[int, int]
    input_size: tuple[int, int]


def find_images(spec: str, skip: Path) -> tuple[list[Path], Path]:
    """The images ``spec`` names (a file, a folder searched recursively, or a glob), sorted, none under
    ``skip`` (the output folder, so a re-run never reads its own results); and the folder ids are relative to."""
    path = Path(spec).expanduser()
    if path.is_file():
        found, root = [path], path.parent
    elif path.is_dir():
        found, root = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES], path
    else:
        found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        magic = next((i for i, part in enumerate(path.parts) if glob.has_magic(part)), len(path.parts))
        root = Path(*path.parts[:magic]) if magic else Path(".")
    skip = skip.resolve()
    found = sorted(p for p in found if not p.resolve().is_relative_to(skip))
    if not found:
        raise ImageInputError(
            f"input={spec} names no image: give an image file, a folder of images ({', '.join(IMAGE_SUFFIXES)}; "
            "searched recursively) or a glob such as 'photos/*.jpg' (quoted)."
        )
    return found, root


def image_ids(paths: Sequence[Path], root: Path) -> list[str]:
    """Output names: each path relative to ``root`` without its suffix, or with it where two would clash."""
    rel = [p.relative_to(root) if p.is_relative_to(root) else Path(p.name) for p in paths]
    stems = [r.with_suffix("").as_posix() for r in rel]
    return [s if stems.count(s) == 1 else r.as_posix() for s, r in zip(stems, rel)]


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file's header, or one clear error for a file that is not a readable image."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as err:
        raise ImageInputError(f"Cannot read image {path}: {err}. Remove it from input= or re-save it.") from err


def load_image(path: Path) -> Tensor:
    """uint8 RGB [3, H, W] (grayscale, palette, RGBA, CMYK, 16-bit as the datasets read them)."""
    try:
        return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError) as err:
        raise ImageInputError(f"Cannot decode image {path}: {err}. Remove it from input= or re-save it.") from err


def model_input(image: Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The checkpoint's evaluation pipeline: bilinear resize (as mmcv, no antialias), to [0, 1], normalise."""
    if tuple(image.shape[-2:]) != size:
        image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=False)
    return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), list(mean), list(std))


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Runs of at most ``batch_size`` images of one input and output size (only those stack)."""
    ordered = sorted(items, key=lambda it: (it.input_size, it.size))
    out: list[list[Item]] = []
    for item in ordered:
        last = out[-1] if out else []
        if 0 < len(last) < batch_size and (last[0].input_size, last[0].size) == (item.input_size, item.size):
            last.append(item)
        else:
            out.append([item])
    return out


def indexed_png(values: np.ndarray, palette: Sequence[Sequence[int]], path: Path, size: tuple[int, int]) -> None:
    """``values`` [h, w] as an indexed PNG with ``palette`` (16-bit grey past 256 values), nearest-resized to
    ``size`` (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(palette) > 256:
        img = Image.fromarray(values.astype(np.uint16))
    else:
        img = Image.fromarray(values.astype(np.uint8))
        img.putpalette([int(c) for rgb in palette for c in rgb])
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
    img.save(path)


def device_and_dtype(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """``auto``: the GPU if there is one (bf16 autocast there), else the CPU in fp32."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is visible; use device=auto or device=cpu.")
    if precision == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else None
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}.")
    return dev, PRECISIONS[precision]


def predict(cfg: DictConfig) -> dict[str, Any]:
    output = Path(cfg.output)
    paths, root = find_images(str(cfg.input), output)
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size must be ≥ 1; got {cfg.batch_size}.")
    sizes = [image_size(p) for p in paths]  # every file is an image, before any model is built
    trained = load_trained(cfg)
    model, info = trained.model, data_info(cfg, trained.data)
    scale = info["scale"]
    slide = (info["crop_size"], info["stride"]) if info["eval_mode"] == "slide" and info["crop_size"] else None
    items = [
        Item(path, image_id, size, keep_ratio_size(*size, scale) if scale else size)
        for path, image_id, size in zip(paths, image_ids(paths, root), sizes)
    ]
    device, amp = device_and_dtype(str(cfg.device), str(cfg.precision))
    model.to(device)
    graphs = cfg.cuda_graphs and device.type == "cuda"
    run: Segmentor | GraphedSegmentor = GraphedSegmentor.for_streams(model) if graphs else model
    patch, colors = model.backbone.patch_size, stage_colors(model.num_stages)
    alpha = float(cfg.overlay_alpha)
    rows: list[dict[str, Any]] = []
    log.info("Segmenting %d images from %s on %s (%s) into %s", len(items), cfg.input, device, amp or "fp32", output)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TimeRemainingColumn()) as progress, torch.inference_mode():
        task = progress.add_task("dtop-predict", total=len(items))
        for batch in batches(items, int(cfg.batch_size)):
            originals = [load_image(it.path) for it in batch]
            inputs = [model_input(img, it.input_size, info["mean"], info["std"]) for img, it in zip(originals, batch)]
            _wait(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                labels, stats = infer_labels(model, run, torch.stack(inputs).to(device), batch[0].size, slide)
            _wait(device)
            ms = 1000 * (time.perf_counter() - start) / len(batch)
            labels, stats = labels.cpu(), {k: v.cpu() for k, v in stats.items()}
            for i, (item, original) in enumerate(zip(batch, originals)):
                label = labels[i].numpy()
                indexed_png(label, info["palette"], output / "labels" / f"{item.id}.png", item.size)
                rgb = original.permute(1, 2, 0).numpy().astype(np.float32)
                overlay = rgb * (1 - alpha) + colorize(label, info["palette"], info["ignore_index"]) * alpha
                _save_rgb(overlay.round().astype(np.uint8), output / "overlays" / f"{item.id}.png")
                exits = exit_map_pixels(stats["exit_stage"][i], patch, item.input_size)
                indexed_png(exits, colors.tolist(), output / "exits" / f"{item.id}.png", item.size)
                rows.append(_row(item, stats, i, ms))
            progress.advance(task, len(batch))
    rows.sort(key=lambda r: r["image_id"])
    output.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(output / "predictions.parquet", index=False)
    summary = {
        "checkpoint": str(trained.path),
        "threshold": list(model.pruning.threshold),
        "device": str(device),
        "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "inference": "slide" if slide else "whole",
        "stages": stage_names(model.prune_layers, model.backbone.depth),
        "data": info,
        "images": rows,
    }
    write_json(output / "predictions.json", summary)
    log.info(
        "Wrote %d predictions to %s: mean %.2f ms/image, %.4f GMACs/image (dense %.4f)",
        len(rows),
        output,
        float(np.mean([r["ms"] for r in rows])),
        float(np.mean([r["gmacs"] for r in rows])),
        float(np.mean([r["gmacs_dense"] for r in rows])),
    )
    return summary


def _wait(device: torch.device) -> None:
    """Let the GPU finish its queued work, so that the timer measures it (the CPU computes synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save_rgb(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _row(item: Item, stats: dict[str, Tensor], i: int, ms: float) -> dict[str, Any]:
    """One image's row: ids, sizes, milliseconds, GMACs, and tokens and exits per stage."""
    row: dict[str, Any] = {
        "image_id": item.id,
        "path": str(item.path),
        "height": item.size[0],
        "width": item.size[1],
        "input_height": item.input_size[0],
        "input_width": item.input_size[1],
        "windows": int(stats["windows"][i]),
        "ms": round(ms, 3),
        **{f"gmacs{k}": float(stats[f"macs{k}"][i]) / 1e9 for k in MAC_KINDS},
        "gmacs_dense": float(stats["macs_dense"][i]) / 1e9,
    }
    row.update({f"tokens_s{s}": int(t) for s, t in enumerate(stats["tokens_per_stage"][i].tolist())})
    row.update({f"exits_s{s}": int(e) for s, e in enumerate(stats["exits_per_stage"][i].tolist())})
    return row


@hydra_app("predict")
def main(cfg: DictConfig) -> None:
    cli(predict)(cfg)


if __name__ == "__main__":
    main()
