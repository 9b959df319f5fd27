"""A DToP stage end's grading: write the aux head's logits into the canvas, grade every token.

A patch token is *easy* when its confidence (top class probability) is ≥ ξ or, given a recorded keep
mask, when the mask drops it; with ``final`` the easy tokens exit right away (their exit stage is
recorded, ``keep`` is the rest). Reference: a few PyTorch ops. Fast path (CUDA, no gradient to carry,
a head graded by one of the rules the kernel implements): one Triton kernel, :mod:`dtop.kernels.grade`.

Rows of the flat per-token tensors (canvas, exit stage) are ``image · N + patch``; non-patch tokens
(pos < 0) write to the last row, the *trash row*, which nobody reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dtop.kernels import load

KERNEL_RULES = ("softmax", "sigmoid")


@dataclass
class Grades:
    """The grading of the tokens a head saw: confidence, class, whether easy (may exit), the keep mask
    over those tokens when the easy ones exited right away, and the canvas holding their logits."""

    conf: Tensor  # [T] float32
    cls: Tensor  # [T] int64
    easy: Tensor  # [T] bool
    keep: Tensor | None
    canvas: Tensor


def flat_rows(batch: Tensor, pos: Tensor, num_patches: int, trash: int) -> Tensor:
    """Each token's row in the flat per-token tensors: ``batch · num_patches + pos``, or ``trash``."""
    return torch.where(pos >= 0, pos.add(batch, alpha=num_patches), trash)


def write_rows(canvas: Tensor, rows: Tensor, logits: Tensor, inplace: bool) -> Tensor:
    """``canvas`` with ``logits`` at ``rows``: overwritten in place, or a new tensor where autograd needs one."""
    logits = logits.to(canvas.dtype)
    return canvas.index_put_((rows,), logits) if inplace else canvas.index_put((rows,), logits)


def mark_exits(exit_stage: Tensor, rows: Tensor, exits: Tensor, stage: int) -> None:
    """Record ``stage`` as the exit stage of the tokens at ``rows`` where ``exits`` (in place)."""
    exit_stage.index_put_((rows,), torch.where(exits, stage, exit_stage[rows]))


def grade_reference(
    logits: Tensor,
    probs: Callable[[], Tensor],
    batch: Tensor,
    pos: Tensor,
    num_patches: int,
    canvas: Tensor,
    exit_stage: Tensor,
    stage: int,
    threshold: float,
    mask: Tensor | None,
    final: bool,
    inplace: bool,
) -> Grades:
    """Grade the tokens (``batch``, ``pos``) whose head gave ``logits`` [T, K]; ``probs()`` their class
    probabilities [T, K]; ``mask`` [n, N] a recorded keep mask (a phantom image borrows the last row)."""
    rows = flat_rows(batch, pos, num_patches, canvas.shape[0] - 1)
    canvas = write_rows(canvas, rows, logits, inplace)
    conf, cls = probs().max(-1)
    patch = pos >= 0
    if mask is None:
        easy = (conf >= threshold) & patch
    else:
        easy = ~mask[batch.clamp(max=mask.shape[0] - 1), pos.clamp(min=0)] & patch
    keep = None
    if final:
        mark_exits(exit_stage, rows, easy, stage)
        keep = ~easy
    return Grades(conf, cls, easy, keep, canvas)


def grade(
    logits: Tensor,
    presence: Tensor | None,
    rule: str | None,
    probs: Callable[[], Tensor],
    batch: Tensor,
    pos: Tensor,
    num_patches: int,
    canvas: Tensor,
    exit_stage: Tensor,
    stage: int,
    threshold: float,
    mask: Tensor | None,
    final: bool,
    inplace: bool,
) -> Grades:
    """:func:`grade_reference`, as one kernel where it can be. ``rule`` names what ``probs`` computes
    ("softmax" of the logits, or "sigmoid" of each times ``presence``'s [B, K]), None for another rule."""
    kernel = load("grade") if logits.is_cuda and inplace and rule in KERNEL_RULES else None
    if kernel is None:
        return grade_reference(
            logits, probs, batch, pos, num_patches, canvas, exit_stage, stage, threshold, mask, final, inplace
        )
    sigmoid = rule == "sigmoid"
    conf, cls, easy, keep = kernel.grade(
        logits,
        presence if sigmoid else None,
        sigmoid,
        batch,
        pos,
        num_patches,
        canvas,
        exit_stage,
        stage,
        threshold,
        mask,
        final,
    )
    return Grades(conf, cls, easy, keep, canvas)


def confidence(
    logits: Tensor, presence: Tensor | None, rule: str | None, probs: Callable[[], Tensor], batch: Tensor
) -> Tensor:
    """Each token's confidence [T] float32, its top class probability: ``probs().max(-1)``, or on CUDA
    for logits that carry no gradient, for a ``rule`` the grading kernel implements, that kernel without its
    canvas write (one launch instead of the cast, softmax and max over a [T, K] map)."""
    kernel = load("grade") if logits.is_cuda and rule in KERNEL_RULES and not logits.requires_grad else None
    if kernel is None:
        return probs().max(-1).values
    sigmoid = rule == "sigmoid"
    return kernel.confidence(logits, presence if sigmoid else None, sigmoid, batch)
