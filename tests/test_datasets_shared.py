"""Loaders on the real samples in ``../shared/data`` (or ``$DTOP_SHARED/data``); skipped without them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtop.data.datasets import ADE20KDataModule, CamVidDataModule

SHARED_DATA = Path(os.environ.get("DTOP_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
ADE_ROOT = SHARED_DATA / "ade20k_sample" / "ADEChallengeData2016"
CAMVID_ROOT = SHARED_DATA / "camvid"


@pytest.fixture(scope="module")
def ade() -> ADE20KDataModule:
    if not ADE_ROOT.is_dir():
        pytest.skip(f"no shared ADE20K sample at {ADE_ROOT}")
    dm = ADE20KDataModule(ADE_ROOT, batch_size=1)
    dm.setup("validate")
    return dm


@pytest.fixture(scope="module")
def camvid() -> CamVidDataModule:
    if not CAMVID_ROOT.is_dir():
        pytest.skip(f"no shared CamVid at {CAMVID_ROOT}")
    dm = CamVidDataModule(CAMVID_ROOT, batch_size=2)
    dm.setup("fit")
    return dm


def test_ade20k_validation_sample(ade: ADE20KDataModule) -> None:
    assert ade.val_dataset is not None and len(ade.val_dataset) == 3
    for i, files in enumerate(ade.val_dataset.samples):
        raw = np.array(Image.open(files.label))
        sample = ade.val_dataset[i]
        assert sample["id"] == files.image.stem
        # reduce_zero_label: 0 (other) -> ignore, 1..150 -> 0..149
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        np.testing.assert_array_equal(sample["label"].numpy(), expected)
        # image fitted into (512, 2048) keeping its aspect; label at original size
        height, width = raw.shape
        factor = min(2048 / max(height, width), 512 / min(height, width))
        assert sample["image"].shape == (3, int(height * factor + 0.5), int(width * factor + 0.5))
        assert torch.isfinite(sample["image"]).all()


def test_camvid_splits(camvid: CamVidDataModule) -> None:
    assert len(camvid.train_dataset) == 367 and len(camvid.val_dataset) == 101
    train_ids = {s.id for s in camvid.train_dataset.samples}
    assert train_ids.isdisjoint(s.id for s in camvid.val_dataset.samples)


def test_camvid_val_labels_are_valid(camvid: CamVidDataModule) -> None:
    seen: set[int] = set()
    for i in range(len(camvid.val_dataset)):
        _, label = camvid.val_dataset.load(i)  # decodes, maps 11 -> 255 and range-checks
        assert label.shape == (360, 480)
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(11)) | {255}


def test_camvid_train_batch(camvid: CamVidDataModule) -> None:
    torch.manual_seed(0)
    batch = next(iter(camvid.train_dataloader()))
    assert batch["image"].shape == (2, 3, 360, 480) and batch["label"].shape == (2, 360, 480)
    assert set(batch["label"].unique().tolist()) <= set(range(11)) | {255}
    sample = camvid.val_dataset[0]
    assert sample["image"].shape == (3, 360, 480) and sample["label"].shape == (360, 480)
