"""Train/eval pipelines: mmseg resize, cat_max_ratio crop, flip, photometric, pad."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD
from dtop.data.transforms import (
    KeepRatioResize,
    PadToSize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomResize,
    build_eval_transform,
    build_train_transform,
    keep_ratio_size,
    shift_hue,
)
from tests.tolerance import assert_reordered_close


def make_pair(label: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """uint8 image whose three channels all equal the label, to check joint geometry."""
    image = tv_tensors.Image(label.to(torch.uint8).expand(3, *label.shape).clone())
    return image, tv_tensors.Mask(label.to(torch.uint8))


@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [
        ((512, 683), (512, 2048), (512, 683)),  # ADE val image already fits
        ((300, 400), (512, 2048), (512, 683)),  # short edge limited, upscaled
        ((400, 300), (512, 2048), (683, 512)),  # portrait: long/short edges, not H/W
        ((400, 300), (2048, 512), (683, 512)),  # so (H, W) vs (W, H) order of scale is irrelevant
        ((1024, 2048), (1024, 2048), (1024, 2048)),  # Cityscapes
        ((100, 3000), (512, 2048), (68, 2048)),  # panorama: long edge limited
        ((375, 500), (520, 520), (390, 520)),  # Pascal Context
    ],
)
def test_keep_ratio_size_matches_mmcv(hw: tuple[int, int], scale: tuple[int, int], expected: tuple[int, int]) -> None:
    assert keep_ratio_size(*hw, scale) == expected


def test_random_resize_stays_within_ratio_range_and_uses_nearest_for_labels() -> None:
    torch.manual_seed(0)
    label = torch.randint(0, 5, (40, 60))
    label[0, 0] = 255
    t = RandomResize(scale=(40, 60), ratio_range=(0.5, 2.0))
    heights = set()
    for _ in range(30):
        image, mask = t(*make_pair(label))
        assert image.shape[-2:] == mask.shape[-2:]
        assert 20 <= mask.shape[0] <= 80 and 30 <= mask.shape[1] <= 120
        assert set(mask.unique().tolist()) <= set(label.unique().tolist())  # nearest: no blended ids
        heights.add(mask.shape[0])
    assert len(heights) > 10


def test_keep_ratio_resize_leaves_label_untouched() -> None:
    image, mask = make_pair(torch.randint(0, 3, (30, 40)))
    out_image, out_mask = KeepRatioResize((60, 200))(image, mask)
    assert out_image.shape == (3, 60, 80)
    assert out_mask is mask


def _crop_balanced(mask: torch.Tensor, ratio: float) -> bool:
    counts = torch.bincount(mask.flatten().long(), minlength=256)[:255]
    counts = counts[counts > 0]
    return counts.numel() > 1 and counts.max().item() / counts.sum().item() < ratio


def test_cat_max_ratio_prefers_balanced_crops() -> None:
    # 40x60 label split at x=30, crop 20x20: only left offsets 16..24 (9 of 41) give a
    # crop where neither class covers >= 75 %; retrying must find one nearly always.
    label = torch.zeros(40, 60, dtype=torch.long)
    label[:, 30:] = 1
    torch.manual_seed(0)
    with_ratio = RandomCropCatMax((20, 20), cat_max_ratio=0.75)
    without = RandomCropCatMax((20, 20), cat_max_ratio=1.0)
    n = 300
    hits_with = sum(_crop_balanced(with_ratio(*make_pair(label))[1], 0.75) for _ in range(n))
    hits_without = sum(_crop_balanced(without(*make_pair(label))[1], 0.75) for _ in range(n))
    assert hits_with / n > 0.85  # 1 - (32/41)^11 ~ 0.93
    assert hits_without / n < 0.4  # ~ 9/41


def test_cat_max_ratio_retry_count(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = RandomCropCatMax._random_box

    def counting(self: RandomCropCatMax, h: int, w: int) -> tuple[int, int, int, int]:
        calls.append(1)
        return original(self, h, w)

    monkeypatch.setattr(RandomCropCatMax, "_random_box", counting)
    crop = RandomCropCatMax((18, 18), cat_max_ratio=0.75)
    # Ignore pixels do not count: every crop holds the balanced 2-class centre -> first draw kept.
    label = torch.full((20, 20), 255)
    label[8:12, 8:10], label[8:12, 10:12] = 0, 1
    crop(*make_pair(label))
    assert len(calls) == 1
    # A single class can never qualify: 1 draw + 10 retries, then the last draw is used.
    calls.clear()
    _, mask = crop(*make_pair(torch.zeros(20, 20, dtype=torch.long)))
    assert len(calls) == 11 and mask.shape == (18, 18)


def test_crop_keeps_image_and_label_aligned_and_inside_the_image() -> None:
    torch.manual_seed(1)
    label = (torch.arange(40 * 60) % 251).reshape(40, 60)  # unique-ish per position
    for _ in range(20):
        image, mask = RandomCropCatMax((16, 24), cat_max_ratio=0.75)(*make_pair(label))
        assert mask.shape == (16, 24)
        assert torch.equal(image[0], mask)
    image, mask = RandomCropCatMax((64, 64))(*make_pair(label))  # larger than the image: kept whole
    assert mask.shape == (40, 60)


def test_pad_to_size_fills_image_zero_and_label_ignore() -> None:
    image = tv_tensors.Image(torch.ones(3, 10, 12))
    mask = tv_tensors.Mask(torch.zeros(10, 12, dtype=torch.uint8))
    out_image, out_mask = PadToSize((16, 20))(image, mask)
    assert out_image.shape == (3, 16, 20) and out_mask.shape == (16, 20)
    assert out_image[:, :10, :12].eq(1).all() and out_image[:, 10:].eq(0).all() and out_image[:, :, 12:].eq(0).all()
    assert out_mask[:10, :12].eq(0).all() and out_mask[10:].eq(255).all() and out_mask[:, 12:].eq(255).all()


def test_photometric_distortion_stays_in_range_and_changes_image() -> None:
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.rand(3, 16, 16))
    mask = tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.uint8))
    t = PhotoMetricDistortion()
    changed = 0
    for _ in range(20):
        out, out_mask = t(image, mask)
        assert isinstance(out, tv_tensors.Image) and out.shape == image.shape
        assert out.min() >= 0 and out.max() <= 1
        assert out_mask is mask
        changed += not torch.allclose(out, image)
    assert changed >= 15  # P(no op fires) = 1/16
    with pytest.raises(TypeError, match="float image"):
        t(tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8)), mask)


@pytest.mark.parametrize("shift", [-0.1, -1 / 180, 0.0, 0.05, 0.1])
def test_shift_hue_equals_torchvision_adjust_hue(shift: float) -> None:
    from torchvision.transforms.v2 import functional as F

    torch.manual_seed(0)
    image = torch.rand(2, 3, 24, 32)
    image[:, :, :4] = 0.5  # grey: no hue
    image[:, :, 4:6] = 0.0  # black
    image[:, 0, 6:8], image[:, 1, 6:8] = 0.9, 0.9  # ties between the largest channels
    image[:, :, 8:10] = image[:, :, 8:10].round()  # saturated primaries and secondaries
    assert_reordered_close(shift_hue(image, shift), F.adjust_hue(image, shift))


def test_train_pipeline_output_contract_and_padding() -> None:
    torch.manual_seed(0)
    label = torch.randint(0, 4, (30, 40))
    t = build_train_transform(scale=(30, 40), crop_size=(64, 64), ratio_range=(1.0, 1.0), photometric=True)
    image, mask = t(*make_pair(label))
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert mask.shape == (64, 64)
    # 30x40 with ratio 1 stays 30x40: the rest is padding (0 in normalised space, ignore in the label).
    assert image[:, 30:].eq(0).all() and image[:, :, 40:].eq(0).all()
    assert mask[30:].eq(255).all() and mask[:, 40:].eq(255).all()
    assert mask[:30, :40].lt(4).all()


def test_train_pipeline_flips_image_and_label_together() -> None:
    label = torch.arange(40).repeat(30, 1)  # value = column index
    t = build_train_transform(
        scale=(30, 40), crop_size=(30, 40), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False
    )
    image, mask = t(*make_pair(label))
    assert torch.equal(mask[0], torch.arange(39, -1, -1, dtype=mask.dtype))
    expected_r = (torch.arange(39, -1, -1) / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    torch.testing.assert_close(image[0, 0], expected_r)


def test_eval_pipeline_resizes_and_normalises_image_only() -> None:
    image = tv_tensors.Image(torch.full((3, 20, 30), 255, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(20, 30, dtype=torch.uint8))
    out_image, out_mask = build_eval_transform((40, 100))(image, mask)
    assert out_image.shape == (3, 40, 60) and out_mask.shape == (20, 30)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out_image[:, 5, 5], torch.tensor(expected))


@pytest.mark.parametrize("bad", [(0, 10), (10,), (1.5, 2)])
def test_bad_sizes_are_rejected(bad: tuple) -> None:
    with pytest.raises(ValueError, match="crop_size"):
        RandomCropCatMax(bad)
