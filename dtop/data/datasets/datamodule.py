"""Shared DataModule for the on-disk datasets: pipelines, setup and layout errors.

A dataset subclass only declares its metadata (classes, palette, label handling, default
scales) and how to list the files of a split; everything else lives here.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from dtop.data.base import SegDataModule
from dtop.data.datasets.filelist import DatasetLayoutError, SampleFiles, SegFileDataset, make_label_lut
from dtop.data.transforms import JointTransform, build_eval_transform, build_train_transform

__all__ = ["FileListDataModule", "check_exist", "read_list_file"]


def _or_default(value: Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    return default if value is None else (int(value[0]), int(value[1]))


def read_list_file(path: Path, layout: str) -> list[str]:
    """Non-empty, stripped lines of a split list; a missing list is a layout error."""
    if not path.is_file():
        raise DatasetLayoutError(f"missing split list {path}.\n{layout}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetLayoutError(f"split list {path} is empty.\n{layout}")
    return lines


def check_exist(samples: Sequence[SampleFiles], source: Path, layout: str) -> list[SampleFiles]:
    """Fail on the first listed image or label that is not on disk (with a count of all)."""
    missing = [p for s in samples for p in (s.image, s.label) if not p.is_file()]
    if missing:
        raise DatasetLayoutError(f"{len(missing)} files listed in {source} do not exist, e.g. {missing[0]}.\n{layout}")
    return list(samples)


class FileListDataModule(SegDataModule, ABC):
    """DataModule over an mmsegmentation-style dataset folder.

    Sizes are (H, W) (mmseg writes (W, H)); ``None`` takes the dataset's default.

    Args:
        root: dataset folder (see the subclass' ``layout``).
        scale: base scale. Train: random keep-ratio resize into ``scale * U(ratio_range)``;
            eval: keep-ratio resize of the image into ``scale`` (label kept at full size).
        crop_size: train crop, also the slide-inference window.
        ratio_range, cat_max_ratio, flip_prob, photometric: train augmentation (mmseg semantics).
        eval_mode: "whole" or "slide" inference for val/test.
        stride: slide-inference stride; default ``round(2/3 * crop_size)``, mmseg's usual
            overlap (512 -> 341, 480 -> 320, 768 -> 512, 1024 -> 683).
        test_split: a labelled split to build ``test_dataset`` from (e.g. CamVid "test");
            without it ``trainer.test`` runs on the val split.
        mean, std: input normalisation (RGB in [0, 1]); None: as the backbone's weights expect
            (:meth:`~dtop.data.base.SegDataModule.follow_weights`).
        test_images, test_images_seed: evaluate (``trainer.test``) a seeded random subset of this many
            images, e.g. DoViT's FLOPs protocol (100 random val images).
    """

    name: str
    layout: str
    reduce_zero_label: bool = False
    label_map: ClassVar[Mapping[int, int] | None] = None
    train_split: str
    val_split: str
    default_scale: tuple[int, int]
    default_crop_size: tuple[int, int]
    default_eval_mode: str = "slide"

    def __init__(
        self,
        root: str | os.PathLike[str],
        batch_size: int,
        val_batch_size: int = 1,
        num_workers: int | str = 0,
        pin_memory: bool = False,
        seed: int = 0,
        scale: Sequence[int] | None = None,
        crop_size: Sequence[int] | None = None,
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        eval_mode: str | None = None,
        stride: Sequence[int] | None = None,
        test_split: str | None = None,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        test_images: int | None = None,
        test_images_seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size, val_batch_size, num_workers, pin_memory, seed, mean, std, test_images, test_images_seed
        )
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"{type(self).__name__} has {self.num_classes} classes, but the config says "
                f"num_classes={num_classes}; the model's class count comes from data.num_classes."
            )
        self.root = Path(root).expanduser()
        self.scale = _or_default(scale, self.default_scale)
        self.crop_size: tuple[int, int] = _or_default(crop_size, self.default_crop_size)
        self.stride: tuple[int, int] = _or_default(
            stride, (round(2 * self.crop_size[0] / 3), round(2 * self.crop_size[1] / 3))
        )
        self.eval_mode = eval_mode or self.default_eval_mode
        self.test_split = test_split
        self._augment = (ratio_range, cat_max_ratio, flip_prob, photometric)
        if any(not 0 < s <= c for s, c in zip(self.stride, self.crop_size, strict=True)):
            raise ValueError(f"stride must be positive and <= crop_size {self.crop_size}, got {self.stride}")
        self.lut = make_label_lut(self.reduce_zero_label, self.label_map, self.ignore_index)
        self.validate_metadata()

    @property
    def layout_help(self) -> str:
        """What the folder should look like, for every layout error."""
        return (
            f"{self.name} expects this layout under root={self.root}:\n{self.layout}\n"
            "Set the root with data.root=<path> or the DTOP_DATA environment variable."
        )

    @property
    def train_transform(self) -> JointTransform:
        """The train pipeline, normalising with :attr:`normalisation` (fixed once the splits are set up)."""
        return build_train_transform(self.scale, self.crop_size, *self._augment, self.ignore_index, self.normalisation)

    @property
    def eval_transform(self) -> JointTransform:
        return build_eval_transform(self.scale, self.normalisation)

    @abstractmethod
    def list_split(self, split: str) -> list[SampleFiles]:
        """Image/label files of ``split``; raise :class:`DatasetLayoutError` if not as expected."""

    def make_dataset(self, split: str, transform: JointTransform) -> SegFileDataset:
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.name} root {self.root} does not exist.\n{self.layout_help}")
        return SegFileDataset(self.list_split(split), self.num_classes, transform, self.lut, self.ignore_index)

    def setup(self, stage: str | None = None) -> None:
        """Train split only when fitting, so evaluation works with only the val split on disk; a split
        already listed is kept."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.make_dataset(self.train_split, self.train_transform)
        if self.val_dataset is None:
            self.val_dataset = self.make_dataset(self.val_split, self.eval_transform)
        if self.test_split is not None and stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self.make_dataset(self.test_split, self.eval_transform)

    def check(self, stage: str | None = None) -> None:
        """List the splits ``stage`` needs and check them (:meth:`SegFileDataset.check`): every val/test
        image against its label's size, and a sample of labels of each split."""
        self.setup(stage)
        for dataset in (self.train_dataset if stage in (None, "fit") else None, self.val_dataset, self.test_dataset):
            if isinstance(dataset, SegFileDataset):
                dataset.check(sizes=dataset is not self.train_dataset)
