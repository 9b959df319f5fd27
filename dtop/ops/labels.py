"""Per-pixel labels of a token-grid logit map: bilinear upsampling, then the argmax of the scores.

Reference: materialise the class scores at the output size and take their argmax. Fast path (CUDA,
a scoring rule the kernel implements, a resize whose every output mixes at most two inputs per
axis): :mod:`dtop.kernels.labels` interpolates in registers and writes only the labels, never the
[B, K, H, W] score maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from dtop.kernels import load
from dtop.ops.resize import RUN, Upsampled, resize_operator, resize_taps

Chain = tuple[int, int, int, int]  # one axis: token grid, padded input, input (crop), output size
Scores = Callable[[Tensor, "Tensor | None"], Tensor]
KERNEL_RULES = ("softmax", "sigmoid")


def upsampled(logits: Tensor, chains: Sequence[Chain]) -> Upsampled:
    """The [B, K, h, w] map resized along both axes' chains, kept factored."""
    return Upsampled(logits, *(resize_operator(*chain, logits.device) for chain in chains))


def labels_reference(logits: Tensor, presence: Tensor | None, scores: Scores, chains: Sequence[Chain]) -> Tensor:
    """``scores(upsampled map, presence).argmax(1)``: [B, H, W] int64."""
    return scores(upsampled(logits, chains).dense(), presence).argmax(1)


def labels(
    logits: Tensor, presence: Tensor | None, scores: Scores, rule: str | None, chains: Sequence[Chain]
) -> Tensor:
    """:func:`labels_reference`, in one kernel where it can be. ``rule`` names what ``scores`` computes
    ("softmax": the logits' order; "sigmoid": sigmoid × presence's sigmoid), None for another rule."""
    kernel = load("labels") if logits.is_cuda and rule in KERNEL_RULES else None
    if kernel is not None:
        rows, cols = (resize_taps(*chain, logits.device) for chain in chains)
        if rows is not None and cols is not None:
            sigmoid = rule == "sigmoid"
            return kernel.upsampled_argmax(
                logits, presence if sigmoid else None, sigmoid, rows.runs, rows.weights, cols.runs, cols.weights, RUN
            )
    return labels_reference(logits, presence, scores, chains)
