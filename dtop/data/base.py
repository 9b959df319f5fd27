"""Generic segmentation DataModule: loaders, batch contract and dataset metadata.

Batch contract (every dataset in the project returns this per sample)::

    {"image": float32 [3, H, W] normalised with the data module's (mean, std) (see SegDataModule.normalisation),
     "label": int64 [H, W] in [0, num_classes) or ignore_index (255),
     "id": str}

Collated by :func:`seg_collate` into ``image [B, 3, H, W]``, ``label [B, H, W]``,
``id list[str]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dtop.data.sampler import EpochSeededRandomSampler, ResumableDataLoader, SeededSamples, eval_sampler, ignore_sigint
from dtop.errors import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegDataModule", "seg_collate"]

log = logging.getLogger("dtop")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

EVAL_MODES = ("whole", "slide")


def seg_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (``image``, ``label``, ...) and list everything else (``id``, ...).

    Unlike ``default_collate`` this fails with an actionable message when eval images have
    different sizes (e.g. ADE20K val at original resolution), instead of a bare
    ``stack expects each tensor to be equal size``.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    keys = batch[0].keys()
    for sample in batch:
        if sample.keys() != keys:
            raise ValueError(f"samples in a batch have different keys: {sorted(keys)} vs {sorted(sample.keys())}")
    out: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch {key!r}: samples have different shapes {sorted(shapes)}. "
                    "Variable-size evaluation images must be evaluated one at a time: set val_batch_size=1."
                )
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class SegDataModule(L.LightningDataModule):
    """Base DataModule: subclasses set the metadata attributes and build datasets in ``setup``.

    The model reads ``num_classes``, ``ignore_index``, ``eval_mode``, ``crop_size`` and
    ``stride`` (slide inference) from here, so those live next to the data rather than
    being duplicated in model configs.
    """

    num_classes: int
    ignore_index: int = 255
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    eval_mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None

    def __init__(
        self,
        batch_size: int,
        val_batch_size: int = 1,
        num_workers: int | str = 0,
        pin_memory: bool = False,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        test_images: int | None = None,
        test_images_seed: int = 0,
    ) -> None:
        super().__init__()
        self.test_images, self.test_images_seed = test_images, test_images_seed
        if (mean is None) != (std is None) or any(len(v) != 3 for v in (mean, std) if v is not None):
            raise ConfigError(
                f"data.mean and data.std go together, three values each (RGB in [0, 1]); got mean={mean}, std={std}."
            )
        self.mean = None if mean is None else tuple(float(v) for v in mean)
        self.std = None if std is None else tuple(float(v) for v in std)
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ConfigError(f"data.num_workers must be an int >= 0 or 'auto', got {num_workers!r}.")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def workers(self) -> int:
        """Loader workers: ``num_workers``, or with "auto" this process's share of the CPU cores it may use
        (one left to the process itself, at most 16): a training sample costs a worker 8–13 ms of a core."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        trainer = self.trainer  # attached by Lightning: its devices share this machine's cores
        devices = trainer.num_devices if trainer is not None else 1
        return max(1, min(16, cores // max(devices, 1) - 1))

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of RGB in [0, 1] that images are normalised with (ImageNet's until set)."""
        if self.mean is None or self.std is None:
            return IMAGENET_MEAN, IMAGENET_STD
        return self.mean, self.std

    def follow_weights(self, mean: Sequence[float], std: Sequence[float], weights: str) -> None:
        """Normalise like the backbone's ``weights`` were trained, unless the config chose a normalisation
        (then say so where the two differ: never a silent mismatch). Call before ``setup``."""
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if self.mean is None:
            self.mean, self.std = mean, std
            log.info("Inputs normalised as %s expects: mean %s, std %s.", weights, mean, std)
        elif (self.mean, self.std) != (mean, std):
            log.warning(
                "Inputs normalised with data.mean=%s, data.std=%s as configured, while %s were trained "
                "with mean %s, std %s.",
                self.mean,
                self.std,
                weights,
                mean,
                std,
            )

    def validate_metadata(self) -> None:
        """Fail early on inconsistent metadata that would otherwise surface as wrong metrics."""
        for attr in ("num_classes", "class_names", "palette"):
            if not hasattr(self, attr):
                raise AttributeError(f"{type(self).__name__} must define {attr!r}")
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: num_classes={self.num_classes} but {len(self.class_names)} class_names "
                f"and {len(self.palette)} palette entries"
            )
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(f"ignore_index={self.ignore_index} collides with a class id")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if self.eval_mode == "slide" and (self.crop_size is None or self.stride is None):
            raise ValueError("eval_mode='slide' requires crop_size and stride")

    def check(self, stage: str | None = None) -> None:
        """Set up the splits ``stage`` needs and raise :class:`~dtop.errors.DatasetLayoutError` on what can be
        found wrong before a run starts (on-disk datasets check files, sizes and a sample of labels)."""
        self.setup(stage)

    def _loader(
        self,
        dataset: Dataset | None,
        stage: str,
        loader: type[DataLoader] = DataLoader,
        max_workers: int | None = None,
        **kwargs: Any,
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no {stage} dataset; call setup() first")
        self.validate_metadata()
        workers = self.workers if max_workers is None else min(self.workers, max_workers)
        return loader(
            dataset,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            collate_fn=seg_collate,
            worker_init_fn=ignore_sigint if workers > 0 else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no train dataset; call setup('fit') first")
        num_samples = len(self.train_dataset)  # type: ignore[arg-type]
        if num_samples < self.batch_size:
            raise ValueError(
                f"train dataset has {num_samples} samples < batch_size={self.batch_size}; "
                "with drop_last=True an epoch would contain no batch"
            )
        sampler = EpochSeededRandomSampler(num_samples, self.seed)
        return self._loader(
            SeededSamples(self.train_dataset),
            "train",
            ResumableDataLoader,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader:
        dataset = self.test_dataset if self.test_dataset is not None else self.val_dataset
        if dataset is not None and self.test_images is not None:  # a seeded random subset, in dataset order
            count = min(int(self.test_images), len(dataset))  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(int(self.test_images_seed))
            dataset = Subset(dataset, sorted(torch.randperm(len(dataset), generator=g)[:count].tolist()))  # type: ignore[arg-type]
        return self.eval_loader(dataset, "test")

    # Under DDP the eval loaders shard without padding (each image on exactly one rank, in whole single-device
    # batches): see dtop.data.sampler. On one device the sampler is None, i.e. sequential.
    def eval_loader(self, dataset: Dataset | None, stage: str) -> DataLoader:
        """An evaluation loader over ``dataset`` (val, test, calibration subsets), in ``val_batch_size`` batches.

        No more workers than this rank has batches: a short evaluation (CamVid val: 7 batches of 16)
        would otherwise start workers, each a fork of this process, that never load a batch."""
        sampler = eval_sampler(dataset, self.val_batch_size)
        images = len(sampler) if sampler is not None else len(dataset) if dataset is not None else 0  # type: ignore[arg-type]
        return self._loader(
            dataset,
            stage,
            max_workers=-(-images // self.val_batch_size),
            batch_size=self.val_batch_size,
            shuffle=False,
            sampler=sampler,
        )
