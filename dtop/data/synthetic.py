"""Procedural street-scene segmentation data for tests, smoke runs and pruning sanity checks.

Scenes are rendered on the fly (no files) and are deterministic per ``(split seed, index)``.
They are built so that token pruning has something real to exploit: large, easy regions
(sky at the top, asphalt road at the bottom) that intermediate ViT layers classify
confidently, next to hard pixels (1-3 px poles, small signs, object boundaries) and a
context-only class (cars whose body colours are drawn from the building palette but which
stand on the road).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD, SegDataModule

__all__ = ["CLASS_NAMES", "PALETTE", "SyntheticDataModule", "SyntheticSegDataset"]

ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, POLE, SIGN = range(8)
CLASS_NAMES: list[str] = ["road", "sidewalk", "building", "vegetation", "sky", "car", "pole", "sign"]
# Cityscapes colours for the matching classes, so visualisations look familiar.
PALETTE: list[tuple[int, int, int]] = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (107, 142, 35),
    (70, 130, 180),
    (0, 0, 142),
    (153, 153, 153),
    (220, 220, 0),
]
IGNORE_INDEX = 255
# Far from any small seed so that train and val scenes never share a generator stream.
SPLIT_SEED_OFFSET: dict[str, int] = {"train": 0, "val": 1_000_003}
MIN_SIDE = 32

_SIGN_COLOURS = np.asarray([[0.85, 0.1, 0.1], [0.9, 0.8, 0.1], [0.1, 0.3, 0.85], [0.92, 0.92, 0.92]], dtype=np.float32)


def _building_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 3]`` grey/brown facade colours; cars reuse them so colour alone cannot separate the two."""
    v = rng.uniform(0.3, 0.65, n)
    warm = rng.uniform(-0.03, 0.1, n)
    base = np.stack([v + warm, v, v - warm], axis=1)
    return (base + rng.uniform(-0.03, 0.03, (n, 3))).astype(np.float32)


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: separable bilinear upsampling of a coarse random grid.

    Deliberately no matmul: BLAS threads oversubscribe busy CPUs and DataLoader workers.
    """
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    y, x = np.arange(h, dtype=np.float32) / cell, np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - y0)[:, None], x - x0
    rows = grid[y0] * (1 - fy) + grid[y0 + 1] * fy  # [h, gw]
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


def _col(rgb: np.ndarray | Sequence[float]) -> np.ndarray:
    """Colour as a ``[3, 1, 1]`` float32 array that broadcasts against ``[h, w]`` maps."""
    return np.asarray(rgb, dtype=np.float32).reshape(3, 1, 1)


class _Canvas:
    """Channel-first colour image and label map, painted together back to front.

    Channel-first keeps the innermost axis long (W): numpy broadcasting over a trailing axis
    of size 3 is several times slower.
    """

    def __init__(self, h: int, w: int) -> None:
        self.img = np.empty((3, h, w), dtype=np.float32)
        self.lab = np.empty((h, w), dtype=np.int64)

    def paint(self, ys: slice, xs: slice, mask: np.ndarray | None, colour: np.ndarray, cls: int) -> None:
        """Paint ``colour`` (``[3, 1, 1]`` or ``[3, h, w]``) with label ``cls`` where ``mask`` in the box."""
        img, lab = self.img[:, ys, xs], self.lab[ys, xs]
        if mask is None:
            img[...] = colour
            lab[...] = cls
        else:  # copyto(where=) is ~2x faster than boolean fancy indexing here
            np.copyto(img, colour, where=mask)
            np.copyto(lab, cls, where=mask)


def render_scene(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene: ``(rgb float32 [3, H, W] in [0, 1], label int64 [H, W])``.

    The generator is seeded from ``(seed, index)`` only, so the result is identical on every
    call, in every worker process and on every machine.
    """
    rng = np.random.default_rng([seed, index])
    h, w = height, width
    sc = min(h, w) / 128.0
    cv = _Canvas(h, w)
    # One cheap byte draw feeds all per-pixel randomness (numpy's float normals cost ~5x
    # more): planes 0-2 sensor noise, 3 luminance texture, 4 ignore-band thinning.
    # Uniform bytes scaled to unit variance serve as well as Gaussian noise here.
    raw = np.frombuffer(rng.bytes(5 * h * w), dtype=np.uint8).reshape(5, h, w)
    unit = (raw[:4].astype(np.float32) - 127.5) / 73.9
    sensor, tex = unit[:3], unit[3]
    yi, xi = np.arange(h)[:, None], np.arange(w)[None, :]
    yy, xx = yi.astype(np.float32), xi.astype(np.float32)
    horizon = int(h * rng.uniform(0.48, 0.58))

    # Sky: smooth vertical gradient, mild noise -> trivially easy, large region.
    top_c = _col([0.25, 0.45, 0.8] + rng.uniform(-0.06, 0.06, 3))
    bot_c = _col([0.65, 0.8, 0.95] + rng.uniform(-0.05, 0.05, 3))
    t = yy[:horizon] / horizon
    cv.paint(slice(0, horizon), slice(None), None, top_c + (bot_c - top_c) * t + 0.015 * tex[:horizon], SKY)

    # Buildings: side-by-side facades with window grids, standing on the horizon. Per-facade
    # parameters are drawn as arrays and spread to columns, so the band is one vectorised pass.
    n_seg = 10  # facades are >= max(4 px, 0.12 W) wide, so 10 always cover W >= 32
    widths = np.maximum(4, (w * rng.uniform(0.12, 0.35, n_seg)).astype(np.int64))
    ends = np.cumsum(widths)
    seg = np.searchsorted(ends, xi[0], side="right")  # facade index of every column
    tops = np.maximum(1, horizon - (h * rng.uniform(0.12, 0.32, n_seg)).astype(np.int64))[seg]
    colours = np.ascontiguousarray(_building_colours(rng, n_seg)[seg].T[:, None, :])  # [3, 1, W]
    period = np.maximum(3, (rng.integers(6, 11, (2, n_seg)) * sc).astype(np.int64))
    opening = np.maximum(1, (period * rng.uniform(0.4, 0.65, (2, n_seg))).astype(np.int64))
    lit = np.where(rng.random(n_seg) < 0.7, rng.uniform(0.45, 0.7, n_seg), rng.uniform(1.25, 1.5, n_seg))
    ly = yi[:horizon] - tops  # row relative to the facade top
    lx = xi - (ends - widths)[seg]
    windows = ((ly - 2) % period[0, seg] < opening[0, seg]) & ((lx - 1) % period[1, seg] < opening[1, seg])
    windows &= ly >= 2
    shade = np.where(windows, lit[seg].astype(np.float32), np.float32(1.0))
    cv.paint(slice(0, horizon), slice(None), ly >= 0, colours * shade + 0.035 * tex[:horizon], BUILDING)

    # Ground: perspective road trapezoid with a dashed centre line, tiled sidewalk beside it.
    gs = slice(horizon, h)
    depth = (yy[gs] - horizon) / max(h - horizon - 1, 1)  # 0 at the horizon, 1 at the bottom
    vx = w * rng.uniform(0.35, 0.65)
    half_w = w * (0.03 + depth * rng.uniform(0.45, 0.6))
    on_road = np.abs(xx - vx) < half_w
    side_c = _col([0.62, 0.52, 0.55] + rng.uniform(-0.06, 0.06, 3))
    tile = max(3, int(rng.integers(6, 10) * sc))
    grout = (yi[gs] % tile == 0) | (xi % tile == 0)
    sidewalk = side_c * np.where(grout, np.float32(0.75), np.float32(1.0))
    asphalt = np.float32(rng.uniform(0.18, 0.32))
    dash = max(2, int(6 * sc))
    lane = (np.abs(xx - vx) < np.maximum(0.6, 0.025 * half_w)) & ((yi[gs] // dash) % 2 == 0)
    road = np.where(lane, np.float32(0.85), asphalt)
    grain = np.where(on_road, np.float32(0.06), np.float32(0.04)) * tex[gs]
    cv.img[:, gs] = np.where(on_road, road, sidewalk) + grain
    cv.lab[gs] = np.where(on_road, ROAD, SIDEWALK)

    # Vegetation: irregular leafy blobs around the horizon (in front of facades and sidewalk).
    leaf = _value_noise(rng, h, w, max(2, int(3 * sc)))
    for _ in range(int(rng.integers(1, 4))):
        r = min(h, w) * rng.uniform(0.07, 0.14)
        cy = horizon + h * rng.uniform(-0.12, 0.04)
        cx = w * rng.uniform(0.0, 1.0)
        green = _col([0.22, 0.45, 0.15] + rng.uniform(-0.05, 0.05, 3))
        ys = slice(max(0, int(cy - 1.5 * r)), min(h, int(cy + 1.5 * r) + 1))
        xs = slice(max(0, int(cx - 1.5 * r)), min(w, int(cx + 1.5 * r) + 1))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        blob = ((yy[ys] - cy) ** 2 + (xx[:, xs] - cx) ** 2) / r**2 + 0.45 * leaf[ys, xs] < 1.0
        foliage = green * (1.0 + 0.35 * leaf[ys, xs]) + 0.06 * tex[ys, xs]
        cv.paint(ys, xs, blob, foliage, VEGETATION)

    # Poles (1-3 px wide) standing on the ground, most carrying a small sign.
    for _ in range(int(rng.integers(1, 4))):
        pw = int(rng.integers(1, 4))
        px0 = int(rng.integers(0, w - pw + 1))
        y_bot = min(h, horizon + int((h - horizon) * rng.uniform(0.05, 0.4)))
        y_top = max(0, y_bot - int(h * rng.uniform(0.25, 0.5)))
        cv.paint(slice(y_top, y_bot), slice(px0, px0 + pw), None, _col([rng.uniform(0.35, 0.6)] * 3), POLE)
        if rng.random() < 0.85:
            s = max(3, int(rng.integers(3, 8) * sc))
            sx0 = px0 + pw // 2 - s // 2
            ys, xs = slice(y_top, min(h, y_top + s)), slice(max(0, sx0), min(w, sx0 + s))
            colour = _col(_SIGN_COLOURS[rng.integers(len(_SIGN_COLOURS))] + rng.uniform(-0.05, 0.05, 3))
            c = (s - 1) / 2
            disc = None
            if rng.random() < 0.5:  # round sign, else square
                disc = (yy[ys] - y_top - c) ** 2 + (xx[:, xs] - sx0 - c) ** 2 <= (s / 2) ** 2
            cv.paint(ys, xs, disc, colour, SIGN)

    # Cars on the road, far to near; body colours overlap the facade palette half the time.
    for y_c in np.sort(horizon + (h - horizon) * rng.uniform(0.2, 1.0, int(rng.integers(1, 4)))):
        y_c = min(int(y_c), h)
        d = (y_c - horizon) / max(h - horizon, 1)
        cw = max(6, int(min(w, 2 * h) * (0.08 + 0.22 * d)))  # keeps cars inside very wide images
        ch = max(4, int(cw * rng.uniform(0.45, 0.6)))
        cx = vx + w * (0.03 + d * 0.5) * rng.uniform(-0.7, 0.7)
        body_c = _building_colours(rng, 1)[0] if rng.random() < 0.5 else rng.uniform(0.1, 0.9, 3)
        x0, y0 = int(cx - cw / 2), y_c - ch
        ys, xs = slice(max(0, y0), y_c), slice(max(0, x0), min(w, x0 + cw))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        ly, lx = yy[ys] - y0, xx[:, xs] - x0  # box-local coordinates
        cabin = ly < 0.45 * ch
        inset = 0.2 * cw
        body = ~cabin | ((lx >= inset) & (lx < cw - inset))
        glass = cabin & (ly >= 0.1 * ch) & (lx >= inset + 1.5) & (lx < cw - inset - 1.5)
        r2, wy = (0.2 * ch) ** 2, 0.8 * ch
        wheels = ((ly - wy) ** 2 + (lx - 0.22 * cw) ** 2 <= r2) | ((ly - wy) ** 2 + (lx - 0.78 * cw) ** 2 <= r2)
        car = np.where(wheels, np.float32(0.08), np.where(glass, _col([0.28, 0.33, 0.4]), _col(body_c)))
        cv.paint(ys, xs, body | wheels, car + 0.03 * tex[ys, xs], CAR)

    img, lab = cv.img, cv.lab

    # Ignore pixels: a thinned 1-px band on region boundaries (not on poles/signs, which would
    # vanish) and a few small void patches of unlabelled clutter.
    if rng.random() < 0.6:
        edge = np.zeros((h, w), dtype=bool)
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
        edge &= (lab != POLE) & (lab != SIGN) & (raw[4] < 128)
        np.copyto(lab, IGNORE_INDEX, where=edge)
    for _ in range(int(rng.integers(0, 3))):
        ph, pw = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        py, px = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        img[:, py : py + ph, px : px + pw] = _col(rng.uniform(0.0, 1.0, 3))
        lab[py : py + ph, px : px + pw] = IGNORE_INDEX

    # Global illumination change and sensor noise.
    img *= np.float32(rng.uniform(0.85, 1.15))
    img += np.float32(rng.uniform(0.015, 0.04)) * sensor
    np.clip(img, 0.0, 1.0, out=img)
    return img, lab


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < MIN_SIDE:
        raise ValueError(f"image_size must be (H, W) with both sides >= {MIN_SIDE}, got {tuple(image_size)}")
    return size  # type: ignore[return-value]


def _check_num_classes(num_classes: int) -> None:
    if num_classes != len(CLASS_NAMES):
        raise ValueError(
            f"the synthetic generator draws exactly {len(CLASS_NAMES)} classes {CLASS_NAMES}; "
            f"got num_classes={num_classes}"
        )


class SyntheticSegDataset(Dataset):
    """Synthetic street scenes: 8 classes (road, sidewalk, building, vegetation, sky, car, pole, sign).

    Sample ``i`` of a split is a pure function of ``(seed + SPLIT_SEED_OFFSET[split], i)``;
    train and val therefore never overlap for the same base ``seed``. Returns the project
    batch contract: normalised (``mean``, ``std``) float32 ``image [3, H, W]``, int64 ``label [H, W]``
    (255 = ignore) and a string ``id``.
    """

    def __init__(
        self,
        split: Literal["train", "val"] = "train",
        size: int = 512,
        image_size: Sequence[int] = (128, 128),
        seed: int = 0,
        num_classes: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"split must be one of {sorted(SPLIT_SEED_OFFSET)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        _check_num_classes(num_classes)
        self.split = split
        self.size = size
        self.image_size = _check_image_size(image_size)
        self.seed = seed
        self.split_seed = seed + SPLIT_SEED_OFFSET[split]
        self.num_classes = num_classes
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        index %= self.size
        img, lab = render_scene(self.split_seed, index, *self.image_size)
        img -= self.mean
        img /= self.std
        return {
            "image": torch.from_numpy(img),
            "label": torch.from_numpy(lab),
            "id": f"synthetic_{self.split}_{index:06d}",
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"seed={self.seed}, num_classes={self.num_classes})"
        )


class SyntheticDataModule(SegDataModule):
    """DataModule over :class:`SyntheticSegDataset`; whole-image evaluation, test split = val split."""

    ignore_index = IGNORE_INDEX
    eval_mode = "whole"

    def __init__(
        self,
        image_size: Sequence[int] = (128, 128),
        num_classes: int = 8,
        train_size: int = 512,
        val_size: int = 64,
        seed: int = 0,
        batch_size: int = 16,
        val_batch_size: int = 16,
        num_workers: int | str = 0,
        pin_memory: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        test_images: int | None = None,
        test_images_seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            mean=mean,
            std=std,
            test_images=test_images,
            test_images_seed=test_images_seed,
        )
        _check_num_classes(num_classes)
        self.image_size = _check_image_size(image_size)
        self.num_classes = num_classes
        self.train_size = train_size
        self.val_size = val_size
        self.class_names = list(CLASS_NAMES)
        self.palette = list(PALETTE)

    def setup(self, stage: str | None = None) -> None:
        """Create both splits regardless of stage: they are lazy and cost nothing until indexed."""
        args = (self.image_size, self.seed, self.num_classes, *self.normalisation)
        self.train_dataset = SyntheticSegDataset("train", self.train_size, *args)
        self.val_dataset = SyntheticSegDataset("val", self.val_size, *args)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, train_size={self.train_size}, "
            f"val_size={self.val_size}, seed={self.seed}, batch_size={self.batch_size}, "
            f"val_batch_size={self.val_batch_size})"
        )
