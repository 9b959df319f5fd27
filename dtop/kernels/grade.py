"""A DToP stage end's grading as one Triton kernel.

Why: grading the tokens an aux head saw is, in PyTorch, ~15 small kernels — flat canvas rows,
the fp32 cast and canvas write, the class probabilities and their max, the exit rule, the
exit-stage write and the keep mask. At batch 1 each is a few microseconds of launch and tail, the
same order as the work pruning saves. Here each program takes a tile of tokens and does all of it.

Same results as :func:`dtop.ops.grade.grade_reference` (tests compare them under Triton's
interpreter); import this module only where Triton exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 16  # tokens per program


@triton.jit(do_not_specialize=["T", "num_patches", "trash", "n_mask", "stage"])
def _grade(
    logits_ptr,
    presence_ptr,
    batch_ptr,
    pos_ptr,
    canvas_ptr,
    exit_ptr,
    mask_ptr,
    conf_ptr,
    cls_ptr,
    easy_ptr,
    keep_ptr,
    T,
    num_patches,
    trash,
    n_mask,
    stage,
    thr,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    PRESENCE: tl.constexpr,
    MASK: tl.constexpr,
    FINAL: tl.constexpr,
    CANVAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    in_t = rows < T
    in_k = cols < K
    m2 = in_t[:, None] & in_k[None, :]
    b = tl.load(batch_ptr + rows, mask=in_t, other=0)
    p = tl.load(pos_ptr + rows, mask=in_t, other=-1)
    patch = p >= 0
    flat = tl.where(patch, b * num_patches + p, trash)
    x = tl.load(logits_ptr + rows[:, None] * K + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if CANVAS:
        tl.store(canvas_ptr + flat[:, None] * K + cols[None, :], x, mask=m2)
    if SIGMOID:  # ATM: sigmoid mask scores, times the image's class presence
        prob = tl.sigmoid(x)
        if PRESENCE:
            pr = tl.load(presence_ptr + b[:, None] * K + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            prob = prob * tl.sigmoid(pr)
        prob = tl.where(m2, prob, -1.0)
        conf = tl.max(prob, 1)
        cls = tl.argmax(prob, 1)
    else:  # softmax: the top probability is 1 / Σ exp(x − max)
        x = tl.where(m2, x, float("-inf"))
        top = tl.max(x, 1)
        top_safe = tl.where(in_t, top, 0.0)
        total = tl.sum(tl.where(m2, tl.exp(x - top_safe[:, None]), 0.0), 1)
        conf = 1.0 / tl.where(in_t, total, 1.0)
        cls = tl.argmax(x, 1)
    if MASK:  # recorded decisions: the tokens not in the keep mask are easy
        row = tl.minimum(b, n_mask - 1)
        kept = tl.load(mask_ptr + row * num_patches + p, mask=in_t & patch, other=1)
        easy = (kept == 0) & patch
    else:
        easy = (conf >= thr) & patch
    tl.store(conf_ptr + rows, conf, mask=in_t)
    tl.store(cls_ptr + rows, cls.to(tl.int64), mask=in_t)
    tl.store(easy_ptr + rows, easy.to(tl.int8), mask=in_t)
    if FINAL:  # the easy tokens exit: record the stage, keep the others
        tl.store(exit_ptr + flat, tl.full([ROWS], 0, tl.int64) + stage, mask=in_t & easy)
        tl.store(keep_ptr + rows, (~easy).to(tl.int8), mask=in_t)


def grade(
    logits: Tensor,
    presence: Tensor | None,
    sigmoid: bool,
    batch: Tensor,
    pos: Tensor,
    num_patches: int,
    canvas: Tensor | None,
    exit_stage: Tensor,
    stage: int,
    threshold: float,
    mask: Tensor | None,
    final: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(conf, cls, easy, keep or None): see :func:`dtop.ops.grade.grade_reference`; without a ``canvas``
    the logits are only graded (:func:`dtop.ops.grade.confidence`)."""
    T, K = logits.shape
    dev = logits.device
    logits = logits.contiguous()
    conf = torch.empty(T, dtype=torch.float32, device=dev)
    cls = torch.empty(T, dtype=torch.long, device=dev)
    easy = torch.empty(T, dtype=torch.bool, device=dev)
    keep = torch.empty(T, dtype=torch.bool, device=dev) if final else None
    presence_t = presence.contiguous() if presence is not None else logits
    mask_t = mask.contiguous() if mask is not None else easy
    if T:
        _grade[(triton.cdiv(T, ROWS),)](
            logits,
            presence_t,
            batch,
            pos,
            canvas if canvas is not None else logits,
            exit_stage,
            mask_t.view(torch.int8),
            conf,
            cls,
            easy.view(torch.int8),
            (keep if final else easy).view(torch.int8),
            T,
            num_patches,
            canvas.shape[0] - 1 if canvas is not None else 0,
            mask.shape[0] if mask is not None else 1,
            stage,
            float(threshold),
            K=K,
            SIGMOID=sigmoid,
            PRESENCE=presence is not None,
            MASK=mask is not None,
            FINAL=final,
            CANVAS=canvas is not None,
            ROWS=ROWS,
            BLOCK_K=triton.next_power_of_2(K),
            num_warps=4,
        )
    return conf, cls, easy, keep


def confidence(logits: Tensor, presence: Tensor | None, sigmoid: bool, batch: Tensor) -> Tensor:
    """The top class probability alone (:func:`dtop.ops.grade.confidence`): :func:`grade` without canvas,
    mask or exits. ``batch`` also stands for the positions and exit stages, which nothing then reads or
    writes (non-negative positions grade every row as a patch), so no buffer is allocated for them."""
    conf, *_ = grade(logits, presence, sigmoid, batch, batch, 1, None, batch, 0, 2.0, None, False)
    return conf
