"""Semantic-segmentation metrics that reproduce mmsegmentation's numbers exactly.

mmseg (``mmseg.evaluation.metrics.iou_metric``) accumulates, over the whole eval set,
per-class ``area_intersect``, ``area_union``, ``area_pred_label`` and ``area_label``
on non-ignored pixels, then reports (in percent)::

    aAcc = sum(intersect) / sum(label)
    IoU  = intersect / union          (NaN when union == 0, i.e. class absent from pred and GT)
    Acc  = intersect / label          (NaN when the class is absent from GT)
    mIoU = nanmean(IoU),  mAcc = nanmean(Acc)

All four areas are row/column sums and the diagonal of the confusion matrix
(rows = ground truth, columns = prediction), so a single summed ``confmat`` state is
enough and is exact under DDP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SegMetrics", "format_metrics"]


class SegMetrics(Metric):
    """Dataset-level aAcc / mIoU / mAcc (plus per-class IoU / Acc) in percent, mmseg semantics.

    ``update`` accepts hard predictions ``[B, H, W]`` (integer) or logits ``[B, C, H, W]``
    (floating, argmax over ``C``) and integer targets ``[B, H, W]`` whose values are in
    ``[0, num_classes)`` or equal to ``ignore_index``. Out-of-range values raise instead
    of being silently dropped, because a wrong label mapping would otherwise look like a
    plausible (but wrong) mIoU.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a real class id in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate the confusion matrix of one batch (ignored pixels are skipped)."""
        preds = self._to_labels(preds)
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
        if preds.shape != target.shape:
            raise ValueError(f"preds and target shapes differ: {tuple(preds.shape)} vs {tuple(target.shape)}")
        target = target.long()
        keep = target != self.ignore_index
        target = target[keep]
        preds = preds[keep]
        c = self.num_classes
        if target.numel() > 0:
            # One host sync per batch; cheap next to the model forward and it catches
            # label-mapping bugs (e.g. un-reduced ADE20K labels, Cityscapes raw ids).
            t_min, t_max, p_min, p_max = torch.stack([target.min(), target.max(), preds.min(), preds.max()]).tolist()
            if t_min < 0 or t_max >= c:
                raise ValueError(
                    f"target contains values in [{t_min}, {t_max}] outside [0, {c}) "
                    f"that are not ignore_index={self.ignore_index}"
                )
            if p_min < 0 or p_max >= c:
                raise ValueError(f"preds contain values in [{p_min}, {p_max}] outside [0, {c})")
        self.confmat += torch.bincount(target * c + preds, minlength=c * c).reshape(c, c)

    def _to_labels(self, preds: Tensor) -> Tensor:
        """Turn logits ``[B, C, H, W]`` into labels; pass integer labels through."""
        if preds.is_floating_point():
            if preds.ndim != 4 or preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"floating preds are treated as logits and must be [B, {self.num_classes}, H, W], "
                    f"got {tuple(preds.shape)}"
                )
            return preds.argmax(dim=1)
        if preds.is_complex() or preds.dtype == torch.bool:
            raise ValueError(f"preds must be integer labels or float logits, got dtype {preds.dtype}")
        return preds.long()

    def compute(self) -> dict[str, Tensor]:
        """Return ``aAcc``, ``mIoU``, ``mAcc`` (scalars) and ``IoU``, ``Acc`` (per class), in percent."""
        cm = self.confmat.double()
        intersect = cm.diagonal()
        area_label = cm.sum(dim=1)
        area_pred = cm.sum(dim=0)
        union = area_label + area_pred - intersect
        # 0/0 -> NaN exactly as in mmseg's numpy division; nanmean drops those classes.
        iou = intersect / union
        acc = intersect / area_label
        out = {
            "aAcc": intersect.sum() / area_label.sum(),
            "mIoU": iou.nanmean(),
            "mAcc": acc.nanmean(),
            "IoU": iou,
            "Acc": acc,
        }
        return {k: (v * 100).float() for k, v in out.items()}


def format_metrics(metrics: Mapping[str, Tensor | float], class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Round metrics to 2 decimals (mmseg's reporting precision) as plain floats for logging.

    Scalar entries are always kept. Per-class vectors are dropped unless ``class_names`` is
    given, in which case they are expanded to ``"<key>.<class name>"`` entries.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        t = torch.as_tensor(value).detach().cpu()
        if t.ndim == 0:
            out[key] = round(t.item(), 2)
        elif class_names is not None:
            if t.numel() != len(class_names):
                raise ValueError(
                    f"metric {key!r} has {t.numel()} entries but {len(class_names)} class names were given"
                )
            for name, v in zip(class_names, t.tolist()):
                out[f"{key}.{name}"] = round(v, 2)
    return out
