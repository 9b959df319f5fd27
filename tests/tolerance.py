"""Tolerances for two computation orders of the same float function, derived from dtype and magnitude.

Why: a packed batch and a single image, or the engine and timm's dense forward, compute the same
function with reductions split and ordered differently (matmul blocking, SDPA tiling, the thread
count and the CPU's vector width all change them). Reordering a sum of n terms moves it by up to
about n·eps·Σ|x|; a ViT stacks many such sums, and the difference compounds through its layers. So
the bound is ``REORDER_ULPS`` units of the dtype's epsilon, relative to the largest value compared:
loose enough for any machine's rounding (fp32: 1.2e-4 of the magnitude), tight enough that a real
bug (a wrong token, mask or weight: errors of the values' own size) fails.
"""

from __future__ import annotations

import torch

REORDER_ULPS = 2**10


def reorder_atol(expected: torch.Tensor) -> float:
    """Absolute tolerance for ``expected``: ``REORDER_ULPS`` epsilons of its dtype times its largest value."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return REORDER_ULPS * torch.finfo(expected.dtype).eps * scale


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``actual`` equals ``expected`` up to what reordering the float reductions can change."""
    torch.testing.assert_close(
        actual, expected, rtol=REORDER_ULPS * torch.finfo(expected.dtype).eps, atol=reorder_atol(expected)
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def reorder_rel(dtype: torch.dtype) -> float:
    """The bound for :func:`rel_err` of two orders in ``dtype`` (norm-relative: the same epsilons)."""
    return REORDER_ULPS * torch.finfo(dtype).eps
