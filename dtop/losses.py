"""Losses: CE on assembled maps, per-stage aux terms, and KL self-distillation (DoViT Eq. 9–12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dtop.errors import ConfigError
from dtop.ops.cross_entropy import cross_entropy_sum
from dtop.ops.resize import Upsampled


def cross_entropy(
    logits: Tensor | Upsampled, target: Tensor, ignore_index: int = 255, class_weight: Tensor | None = None
) -> Tensor:
    """Pixel CE over the labelled pixels of [B, K, H, W] logits (zero, not NaN, when none are labelled).

    Summed (:func:`~dtop.ops.cross_entropy.cross_entropy_sum`: fused kernels on CUDA, a factored map
    interpolated inside them), then divided by the labelled pixels' (class-weighted) count: no host sync.
    """
    if tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"Labels of shape {tuple(target.shape)} do not match logits {tuple(logits.shape)} "
            "([B, K, H, W] logits need [B, H, W] labels)."
        )
    total = cross_entropy_sum(logits, target, ignore_index, class_weight)
    valid = target != ignore_index
    if class_weight is None:
        denom = valid.sum()
    else:
        denom = (class_weight[torch.where(valid, target, 0)] * valid).sum()
    return total / denom.clamp(min=1e-12)


def kl_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    ignore_index: int = 255,
    direction: str = "student_teacher",
) -> Tensor:
    """Per-pixel KL divergence between the class distributions of [B, K, H, W] maps, averaged over pixels.

    ``direction``: "student_teacher" is KL(p_s ‖ p_t), the paper's Eq. 11; "teacher_student" is
    KL(p_t ‖ p_s), what the official DoViT code computes (``F.kl_div(log p_s, p_t)``). Pixels labelled
    ``ignore_index`` are left out when ``target`` is given (the official code averages over all).
    """
    if direction not in ("student_teacher", "teacher_student"):
        raise ConfigError(f"KL direction must be 'student_teacher' or 'teacher_student'; got {direction!r}.")
    log_s = student_logits.float().log_softmax(1)
    log_t = teacher_logits.float().log_softmax(1)
    if direction == "teacher_student":
        log_s, log_t = log_t, log_s
    kl = (log_s.exp() * (log_s - log_t)).sum(1)
    if target is not None:
        valid = target != ignore_index
        return (kl * valid).sum() / valid.sum().clamp(min=1)
    return kl.mean()


def feature_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE between last-layer token features (DoViT's optional feature distillation)."""
    return F.mse_loss(student.float(), teacher.float())


def sigmoid_focal_loss(
    logits: Tensor, target: Tensor, valid: Tensor | None = None, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss of [M, P] mask logits vs binary targets → [M], each mask's mean over its valid pixels.

    ``alpha`` < 0 disables the class balancing; a mask with no valid pixel contributes 0.
    """
    x = logits.float()
    t = target.to(x.dtype)
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if valid is None:
        return loss.mean(-1)
    w = valid.to(x.dtype)
    return (loss * w).sum(-1) / w.sum(-1).clamp(min=1)


def dice_loss(logits: Tensor, target: Tensor, valid: Tensor | None = None, eps: float = 1.0) -> Tensor:
    """Dice loss 1 - (2Σpt + ε)/(Σp + Σt + ε) of sigmoid [M, P] masks over their valid pixels → [M]."""
    p = logits.float().sigmoid()
    t = target.to(p.dtype)
    if valid is not None:
        w = valid.to(p.dtype)
        p, t = p * w, t * w
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def presence_loss(logits: Tensor, target: Tensor, absent_weight: float = 0.1) -> Tensor:
    """Class-presence BCE-with-logits of [B, K] logits vs [B, K] presence targets.

    Present terms weigh 1, absent ones ``absent_weight``; the sum is divided by the total weight
    (the normalisation of DETR/SegViT's ``eos_coef``-weighted classification loss).
    """
    x = logits.float()
    t = target.to(x.dtype)
    w = t + absent_weight * (1 - t)
    return (w * F.binary_cross_entropy_with_logits(x, t, reduction="none")).sum() / w.sum().clamp(min=1e-12)
