"""Sliding-window inference: coverage, agreement with whole inference, averaging."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dtop.inference import resize_logits, slide_inference, slide_windows


@pytest.mark.parametrize(
    ("height", "width", "crop", "stride"),
    [
        (h, w, c, s)
        for (h, w), (c, s) in itertools.product(
            [(1, 1), (7, 50), (31, 32), (64, 64), (65, 200), (100, 37)],
            [((16, 16), (16, 16)), ((32, 24), (21, 11)), ((10, 40), (1, 40)), ((64, 64), (43, 43))],
        )
    ],
)
def test_windows_cover_every_pixel_inside_the_image(height: int, width: int, crop: tuple, stride: tuple) -> None:
    windows = slide_windows(height, width, crop, stride)
    count = torch.zeros(height, width, dtype=torch.long)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        assert (y2 - y1, x2 - x1) == (min(crop[0], height), min(crop[1], width))
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    assert len(set(windows)) == len(windows)


def test_windows_match_mmseg_grid() -> None:
    # ADE20K val image 512x683 with crop 512 / stride 341: two windows, the last right-aligned.
    assert slide_windows(512, 683, (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    # Cityscapes 1024x2048, crop 512x1024 / stride 341x683: 3 x 3 grid.
    windows = slide_windows(1024, 2048, (512, 1024), (341, 683))
    assert sorted({w[0] for w in windows}) == [0, 341, 512] and sorted({w[2] for w in windows}) == [0, 683, 1024]


def test_stride_larger_than_crop_is_rejected() -> None:
    with pytest.raises(ValueError, match="unseen"):
        slide_windows(100, 100, (10, 10), (20, 10))


@pytest.mark.parametrize("size", [(45, 70), (20, 70), (16, 16), (10, 12)])
def test_slide_equals_whole_for_pointwise_model(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=1)
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = conv(image)
        slid = slide_inference(conv, image, num_classes=5, crop_size=(16, 24), stride=(11, 15))
    assert slid.shape == (2, 5, *size) and slid.dtype == torch.float32
    torch.testing.assert_close(slid, whole)


def test_small_image_runs_once_on_the_whole_image() -> None:
    seen = []

    def forward(crop: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(crop.shape))
        return torch.zeros(crop.shape[0], 3, *crop.shape[-2:])

    slide_inference(forward, torch.zeros(1, 3, 10, 12), num_classes=3, crop_size=(16, 16), stride=(8, 8))
    assert seen == [(1, 3, 10, 12)]


def test_overlaps_are_averaged() -> None:
    # A position-dependent model: each window predicts 10 * its left edge x1 everywhere.
    width = 20
    assert slide_windows(4, width, (4, 12), (4, 8)) == [(0, 4, 0, 12), (0, 4, 8, 20)]

    def offset_forward(crop: torch.Tensor) -> torch.Tensor:
        x1 = int(crop[0, 0, 0, 0].item())  # the image holds each column's x
        return torch.full((1, 1, *crop.shape[-2:]), float(x1 * 10))

    image = torch.arange(width, dtype=torch.float32).expand(1, 3, 4, width)
    out = slide_inference(offset_forward, image, num_classes=1, crop_size=(4, 12), stride=(4, 8))
    assert out[0, 0, :, :8].eq(0).all()  # first window only
    assert out[0, 0, :, 8:12].eq(40).all()  # (0 + 80) / 2
    assert out[0, 0, :, 12:].eq(80).all()  # second window only


def test_wrong_forward_output_shape_is_reported() -> None:
    with pytest.raises(ValueError, match="crop's resolution"):
        slide_inference(
            lambda x: x[:, :, ::2, ::2], torch.zeros(1, 3, 8, 8), num_classes=3, crop_size=(8, 8), stride=(8, 8)
        )


def test_resize_logits_is_bilinear_without_corner_alignment() -> None:
    logits = torch.randn(2, 4, 8, 10)
    out = resize_logits(logits, (17, 23))
    torch.testing.assert_close(out, F.interpolate(logits, size=(17, 23), mode="bilinear", align_corners=False))
    assert resize_logits(logits, (8, 10)) is logits


def test_exit_maps_are_stitched_from_the_windows() -> None:
    from dtop.inference import stitch_exit_maps

    windows = slide_windows(40, 70, (32, 32), (21, 21))
    maps = [torch.full((2, 2, 2), i) for i in range(len(windows))]
    stitched = stitch_exit_maps(maps, windows, (40, 70), 16)
    assert stitched.shape == (2, 3, 5)  # the whole image's token grid
    # each token takes the last window over its centre pixel: rows 8 (window row 0), 24, 39 (row 1 from y = 8)
    assert stitched[0].tolist() == [[3, 4, 5, 5, 5]] * 3


def test_slide_evaluation_keeps_exit_maps_and_counts_windows() -> None:
    """Slide-inferred images get an exit map over their whole token grid (for the dashboard) and GMACs per crop."""
    from functools import partial

    from dtop.lit.module import SegModule
    from dtop.models.build import build_segmentor
    from dtop.models.heads.fcn import FCNHead
    from dtop.models.policies import DToP
    from dtop.models.vit import ViTBackbone

    torch.manual_seed(0)
    model = build_segmentor(
        ViTBackbone(img_size=(32, 32), depth=3), partial(FCNHead), 3, partial(FCNHead), [1], DToP(0.2)
    ).eval()
    module = SegModule(model, 3, eval_mode="slide", crop_size=(32, 32), stride=(16, 16))
    batch = {"image": torch.randn(2, 3, 48, 64), "label": torch.randint(0, 3, (2, 48, 64)), "id": ["a", "b"]}
    with torch.no_grad():
        module._eval_step(batch, module.test_metrics)
    rows, visual = module.per_image, module.visuals[0]
    assert [r["windows"] for r in rows] == [6, 6] and visual["exit_stage"].shape == (3, 4)
    assert set(visual["exit_stage"].unique().tolist()) <= {0, 1} and visual["pred"].shape == (48, 64)
    assert {"exits_s0.0", "exits_s1.2"} <= set(rows[0])
