"""The one place that reads image/label files: decoding, label mapping and sanity checks.

Every on-disk dataset (ADE20K, Cityscapes, COCO-Stuff, Pascal Context, CamVid) reduces to a
list of :class:`SampleFiles` plus a label lookup table; :class:`SegFileDataset` does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from dtop.data.transforms import JointTransform
from dtop.errors import DatasetLayoutError

__all__ = [
    "DatasetLayoutError",
    "SampleFiles",
    "SegFileDataset",
    "make_label_lut",
    "pair_files",
    "read_image",
    "read_label",
]

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class SampleFiles(NamedTuple):
    id: str
    image: Path
    label: Path


def read_image(path: Path) -> np.ndarray:
    """Decode any PIL image to uint8 RGB ``[H, W, 3]``.

    Grayscale, palette, RGBA (alpha dropped, as cv2's colour read) and CMYK go through
    ``convert("RGB")``; 16-bit grayscale is scaled to 8 bit (65535 -> 255) because
    ``convert`` would clip it instead.
    """
    with Image.open(path) as img:
        if img.mode in _16BIT_MODES:
            gray = np.asarray(img).astype(np.float64)
            if gray.max(initial=0) > 65535 or gray.min(initial=0) < 0:
                raise DatasetLayoutError(f"{path}: {img.mode} image with values outside 16 bit; cannot convert to RGB")
            gray8 = np.rint(gray / 257.0).astype(np.uint8)
            return np.repeat(gray8[:, :, None], 3, axis=2)
        return np.array(img.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    """Decode a single-channel index label (L, P indices, or 16-bit with values < 256) to uint8 ``[H, W]``."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", *_16BIT_MODES):
            raise DatasetLayoutError(
                f"{path}: label image has mode {img.mode!r}; expected a single-channel index PNG "
                "(mode L or P), not a colour-coded label"
            )
        label = np.array(img)
    if label.dtype != np.uint8:
        if label.max(initial=0) > 255 or label.min(initial=0) < 0:
            raise DatasetLayoutError(
                f"{path}: label values outside 0..255 (max {label.max()}); expected 8-bit class ids"
            )
        label = label.astype(np.uint8)
    return label


def make_label_lut(
    reduce_zero_label: bool = False, label_map: Mapping[int, int] | None = None, ignore_index: int = 255
) -> np.ndarray:
    """256-entry uint8 lookup table applied to raw label values.

    ``reduce_zero_label`` (0 -> ignore, k -> k - 1) is applied first, then ``label_map``
    (on the reduced values), as mmseg's ``LoadAnnotations``.
    """
    lut = np.arange(256, dtype=np.int64)
    if reduce_zero_label:
        lut = np.where(lut == 0, ignore_index, lut - 1)
        lut[255] = ignore_index
    mapped = lut.copy()  # map from the unmapped values so {1: 2, 2: 3} does not chain 1 -> 3
    for src, dst in (label_map or {}).items():
        if not 0 <= dst <= 255:
            raise ValueError(f"label_map must map to values in 0..255, got {src} -> {dst}")
        mapped[lut == src] = dst
    return mapped.astype(np.uint8)


def pair_files(
    image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str, layout: str
) -> list[SampleFiles]:
    """Match ``image_dir/**/X<image_suffix>`` with ``label_dir/**/X<label_suffix>`` by X.

    Raises :class:`DatasetLayoutError` (with ``layout`` as help) if a folder is missing or
    empty, or if an image has no label or vice versa, naming an example file.
    """
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetLayoutError(f"missing folder {folder}.\n{layout}")

    def index(folder: Path, suffix: str) -> dict[str, Path]:
        return {str(p.relative_to(folder))[: -len(suffix)]: p for p in folder.rglob(f"*{suffix}") if p.is_file()}

    images, labels = index(image_dir, image_suffix), index(label_dir, label_suffix)
    if not images:
        raise DatasetLayoutError(f"no '*{image_suffix}' images under {image_dir}.\n{layout}")
    if images.keys() != labels.keys():
        only_img = sorted(images.keys() - labels.keys())
        only_lab = sorted(labels.keys() - images.keys())
        example = (
            f"{images[only_img[0]]} has no label {label_dir / (only_img[0] + label_suffix)}"
            if only_img
            else f"{labels[only_lab[0]]} has no image {image_dir / (only_lab[0] + image_suffix)}"
        )
        raise DatasetLayoutError(
            f"{len(images)} images under {image_dir} but {len(labels)} labels under {label_dir} "
            f"({len(only_img)} images without label, {len(only_lab)} labels without image); e.g. {example}.\n{layout}"
        )
    return [SampleFiles(Path(key).name, images[key], labels[key]) for key in sorted(images)]


def _check_sizes(files: SampleFiles, image: tuple[int, ...], label: tuple[int, ...]) -> None:
    if tuple(image) != tuple(label):
        raise DatasetLayoutError(
            f"image {files.image} is {image[1]}x{image[0]} but label {files.label} is {label[1]}x{label[0]} (W x H): "
            "each label must have its image's size"
        )


class SegFileDataset(Dataset[dict[str, Any]]):
    """Samples ``{"image", "label", "id"}`` from a list of image/label files.

    Labels go through ``lut`` (see :func:`make_label_lut`) and are then checked to lie in
    ``[0, num_classes)`` or equal ``ignore_index`` on every read (cheap on uint8), so a wrong
    conversion fails loudly with the file name instead of corrupting the metric.
    """

    def __init__(
        self,
        samples: Sequence[SampleFiles],
        num_classes: int,
        transform: JointTransform,
        lut: np.ndarray | None = None,
        ignore_index: int = 255,
    ) -> None:
        if not samples:
            raise ValueError("SegFileDataset needs at least one sample")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transform = transform
        self.lut = lut
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded uint8 RGB image ``[H, W, 3]`` and mapped, validated label ``[H, W]``."""
        files = self.samples[index]
        image, label = read_image(files.image), read_label(files.label)
        _check_sizes(files, image.shape[:2], label.shape)
        return image, self.map_label(label, files.label)

    def map_label(self, label: np.ndarray, path: Path) -> np.ndarray:
        """``label`` through the lookup table, checked to hold classes or ``ignore_index`` only."""
        if self.lut is not None:
            label = self.lut[label]
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            raise DatasetLayoutError(
                f"{path}: label values {np.unique(label[bad]).tolist()} (after mapping) are outside "
                f"[0, {self.num_classes}) and not ignore_index={self.ignore_index}; wrong dataset, "
                "unconverted labels or missing conversion script run?"
            )
        return label

    def check(self, sizes: bool = True, labels: int = 32) -> None:
        """Fail now, with the file named, on what would otherwise stop a run later: every image's size
        against its label's (headers only, when ``sizes``), and the values of ``labels`` labels spread
        over the split."""
        if sizes:
            for files in self.samples:
                with Image.open(files.image) as img, Image.open(files.label) as lab:
                    _check_sizes(files, img.size[::-1], lab.size[::-1])
        step = max(1, len(self.samples) // max(labels, 1))
        for files in self.samples[::step][:labels]:
            self.map_label(read_label(files.label), files.label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(label))
        img, mask = self.transform(img, mask)
        return {
            "image": img.as_subclass(torch.Tensor).contiguous(),
            "label": mask.as_subclass(torch.Tensor).long(),
            "id": self.samples[index].id,
        }
