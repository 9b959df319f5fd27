import math

import pytest
import torch

from dtop.metrics import SegMetrics, format_metrics

NAN = float("nan")

# 4 classes; 255 = ignore. Class 2 is predicted but absent from GT; class 3 is absent from
# GT and only "predicted" on ignored pixels, so it must count as absent from both.
TARGET = torch.tensor(
    [
        [0, 0, 0, 1],
        [1, 1, 255, 255],
        [0, 1, 0, 255],
    ]
)[None]
PRED = torch.tensor(
    [
        [0, 0, 1, 1],
        [1, 2, 3, 3],
        [0, 1, 2, 3],
    ]
)[None]
# Labelled pixels: 9 (3 ignored). Correct: (0,0) (0,1) (0,3) (1,0) (2,0) (2,1) -> 6.
# class 0: GT 5, pred 3, TP 3 -> union 5+3-3 = 5 -> IoU 3/5 = 60 %, Acc 3/5 = 60 %
# class 1: GT 4, pred 4 [(0,2) (0,3) (1,0) (2,1)], TP 3 -> union 5 -> IoU 60 %, Acc 3/4 = 75 %
# class 2: GT 0, pred 2 [(1,1) (2,2)], TP 0 -> union 2 -> IoU 0 %, Acc 0/0 = NaN
# class 3: GT 0, pred 0 on labelled pixels -> union 0 -> IoU NaN, Acc NaN
# aAcc = 6/9 = 66.666..., mIoU = (60 + 60 + 0)/3 = 40, mAcc = (60 + 75)/2 = 67.5
EXPECTED = {
    "aAcc": 600 / 9,
    "mIoU": 40.0,
    "mAcc": 67.5,
    "IoU": [60.0, 60.0, 0.0, NAN],
    "Acc": [60.0, 75.0, NAN, NAN],
}


def _assert_matches_expected(out: dict[str, torch.Tensor]) -> None:
    for key in ("aAcc", "mIoU", "mAcc"):
        assert out[key].ndim == 0
        assert out[key].item() == pytest.approx(EXPECTED[key], abs=1e-4), key
    for key in ("IoU", "Acc"):
        torch.testing.assert_close(out[key], torch.tensor(EXPECTED[key]), equal_nan=True)


def test_hand_computed_example_with_ignore_and_absent_classes() -> None:
    metric = SegMetrics(num_classes=4)
    metric.update(PRED, TARGET)
    _assert_matches_expected(metric.compute())


def test_logits_input_matches_label_input() -> None:
    logits = torch.nn.functional.one_hot(PRED, 4).permute(0, 3, 1, 2).float()
    logits = logits * 3.0 + 0.1 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    metric = SegMetrics(num_classes=4)
    metric.update(logits, TARGET)
    _assert_matches_expected(metric.compute())


def _mmseg_reference(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> dict:
    """Independent re-implementation of mmseg's intersect_and_union + total_area_to_metrics."""
    mask = target != ignore_index
    pred_label, label = preds[mask].float(), target[mask].float()
    intersect = pred_label[pred_label == label]
    area_intersect = torch.histc(intersect, bins=num_classes, min=0, max=num_classes - 1).double()
    area_pred = torch.histc(pred_label, bins=num_classes, min=0, max=num_classes - 1).double()
    area_label = torch.histc(label, bins=num_classes, min=0, max=num_classes - 1).double()
    area_union = area_pred + area_label - area_intersect
    iou, acc = area_intersect / area_union, area_intersect / area_label
    return {
        "aAcc": area_intersect.sum() / area_label.sum() * 100,
        "mIoU": iou.nanmean() * 100,
        "mAcc": acc.nanmean() * 100,
        "IoU": iou * 100,
        "Acc": acc * 100,
    }


def _random_batches(num_classes: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random batches where class C-2 is only predicted (never in GT) and class C-1 is only
    predicted on ignored pixels (absent from both), so both NaN paths are exercised."""
    g = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(n):
        target = torch.randint(0, num_classes - 2, (2, 9, 11), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        noise = torch.randint(0, num_classes - 1, target.shape, generator=g)
        preds = torch.where(torch.rand(target.shape, generator=g) < 0.3, noise, target)
        preds = torch.where(target == 255, num_classes - 1, preds)
        batches.append((preds, target))
    return batches


def test_accumulation_equals_single_update_and_matches_mmseg_reference() -> None:
    num_classes = 6
    batches = _random_batches(num_classes, 4)
    accumulated, single = SegMetrics(num_classes), SegMetrics(num_classes)
    for preds, target in batches:
        accumulated.update(preds, target)
    all_preds = torch.cat([p for p, _ in batches])
    all_target = torch.cat([t for _, t in batches])
    single.update(all_preds, all_target)
    assert torch.equal(accumulated.confmat, single.confmat)
    out_acc, out_single = accumulated.compute(), single.compute()
    reference = _mmseg_reference(all_preds, all_target, num_classes)
    assert math.isnan(out_acc["IoU"][-1].item()) and out_acc["IoU"][-2].item() == 0.0
    assert math.isnan(out_acc["Acc"][-2].item())
    for key in out_acc:
        torch.testing.assert_close(out_acc[key], out_single[key], equal_nan=True)
        torch.testing.assert_close(out_acc[key], reference[key].float(), equal_nan=True)


@pytest.mark.parametrize("bad_value", [4, -1, 254])
def test_out_of_range_target_raises(bad_value: int) -> None:
    target = TARGET.clone()
    target[0, 0, 0] = bad_value
    metric = SegMetrics(num_classes=4)
    with pytest.raises(ValueError, match="outside"):
        metric.update(PRED, target)
    assert metric.confmat.sum() == 0  # nothing was silently counted


def test_out_of_range_pred_raises() -> None:
    preds = PRED.clone()
    preds[0, 0, 0] = 4
    with pytest.raises(ValueError, match="preds contain"):
        SegMetrics(num_classes=4).update(preds, TARGET)


def test_bad_inputs_raise() -> None:
    metric = SegMetrics(num_classes=4)
    with pytest.raises(ValueError, match="shapes differ"):
        metric.update(PRED[:, :2], TARGET)
    with pytest.raises(ValueError, match="logits"):
        metric.update(torch.zeros(1, 3, 3, 4), TARGET)  # wrong channel count
    with pytest.raises(ValueError, match="integer"):
        metric.update(PRED, TARGET.float())
    with pytest.raises(ValueError, match="collides"):
        SegMetrics(num_classes=4, ignore_index=2)


def test_all_ignored_batch_adds_nothing() -> None:
    metric = SegMetrics(num_classes=4)
    metric.update(PRED, torch.full_like(TARGET, 255))
    metric.update(PRED, TARGET)
    _assert_matches_expected(metric.compute())


def test_format_metrics_rounds_scalars_and_expands_per_class() -> None:
    metric = SegMetrics(num_classes=4)
    metric.update(PRED, TARGET)
    out = metric.compute()
    flat = format_metrics(out)
    assert flat == {"aAcc": 66.67, "mIoU": 40.0, "mAcc": 67.5}
    assert all(type(v) is float for v in flat.values())
    named = format_metrics(out, class_names=["a", "b", "c", "d"])
    assert named["IoU.b"] == 60.0 and named["Acc.b"] == 75.0 and named["IoU.c"] == 0.0
    assert math.isnan(named["IoU.d"]) and math.isnan(named["Acc.c"])
    with pytest.raises(ValueError, match="class names"):
        format_metrics(out, class_names=["a"])
