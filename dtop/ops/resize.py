"""Bilinear resizing as two small matmuls, and logit maps kept in that factored form.

Exactly ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias), but its backward is a
matmul too: the built-in kernel's backward scatters with atomics, which for 16× upsampling of 150-class
logits to 512² dominated a training step (docs/performance.md). Logit maps are upsampled this way for
the loss and for prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


def _build(size_in: int, size_out: int) -> Tensor:
    scale = size_in / size_out
    src = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=size_in - 1)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    lam = src - i0
    w = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    w.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    w.index_put_((rows, i1), lam, accumulate=True)
    return w


def _chain(size_in: int, padded: int, crop: int, size_out: int | None) -> Tensor:
    """[out, size_in] float64: resize to ``padded``, keep the first ``crop``, resize to ``size_out``."""
    op = _build(size_in, padded)[:crop] if padded != size_in else torch.eye(size_in, dtype=torch.float64)[:crop]
    if size_out is not None and size_out != crop:
        op = _build(crop, size_out) @ op
    return op


@lru_cache(maxsize=64)
def resize_operator(size_in: int, padded: int, crop: int, size_out: int | None, device: torch.device) -> Tensor | None:
    """[out, size_in] float32 matrix: resize to ``padded``, keep the first ``crop``, resize to ``size_out``.

    None when the whole chain is the identity.
    """
    with torch.inference_mode(False):
        op = _chain(size_in, padded, crop, size_out)
        if op.shape[0] == op.shape[1] and torch.equal(op, torch.eye(op.shape[0], dtype=op.dtype)):
            return None
        return op.to(device=device, dtype=torch.float32)


RUN = 16  # at most this many outputs in one run of :class:`Taps`


@dataclass(frozen=True)
class Taps:
    """A resize chain whose every output mixes at most two inputs, as runs of outputs sharing both.

    Why: a kernel can then load the two inputs once per run and interpolate ``RUN`` outputs from
    registers (bilinear ×16 has runs of 16) instead of reading a dense operator.
    """

    runs: Tensor  # [R, 4] int32: first input, second input, first output, number of outputs (≤ RUN)
    weights: Tensor  # [out, 2] float32: the two inputs' weights, exactly the operator's float32 entries


@lru_cache(maxsize=64)
def resize_taps(size_in: int, padded: int, crop: int, size_out: int | None, device: torch.device) -> Taps | None:
    """:func:`resize_operator`'s chain as :class:`Taps`; None where an output mixes more than two inputs
    (a second resize after the crop)."""
    with torch.inference_mode(False):
        op = _chain(size_in, padded, crop, size_out).to(torch.float32)
        nonzero = op != 0
        if int(nonzero.sum(1).max()) > 2:
            return None
        idx = torch.arange(size_in).expand_as(op)
        first = torch.where(nonzero, idx, size_in).min(1).values
        second = torch.where(nonzero, idx, -1).max(1).values
        out = torch.arange(op.shape[0])
        weights = torch.stack([op[out, first], torch.where(second > first, op[out, second], 0.0)], 1)
        runs: list[list[int]] = []
        for o, pair in enumerate(zip(first.tolist(), second.tolist())):
            if runs and tuple(runs[-1][:2]) == pair and runs[-1][3] < RUN:
                runs[-1][3] += 1
            else:
                runs.append([*pair, o, 1])
        return Taps(torch.tensor(runs, dtype=torch.int32, device=device), weights.to(device))


@dataclass(frozen=True)
class Upsampled:
    """The logit map ``rows @ low @ cols.T`` kept factored: [B, K, h, w] and two interpolation matrices.

    Why: a loss can read the small map and interpolate on the fly (the fused CE kernel) instead of
    materialising a 150-class full-resolution map three times per training step. ``None`` matrices
    are the identity; :meth:`dense` gives the map itself.
    """

    low: Tensor
    rows: Tensor | None  # [H, h]
    cols: Tensor | None  # [W, w]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, K, h, w = self.low.shape
        return (B, K, h if self.rows is None else self.rows.shape[0], w if self.cols is None else self.cols.shape[0])

    @property
    def is_cuda(self) -> bool:
        return self.low.is_cuda

    def row_resized(self) -> Tensor:
        """``rows @ low``: [B, K, H, w], float32 at least (or the autocast dtype)."""
        x = self.low.to(torch.promote_types(self.low.dtype, torch.float32))
        return x if self.rows is None else torch.matmul(self.rows.to(x.dtype), x)

    def dense(self) -> Tensor:
        """The full map [B, K, H, W]."""
        if self.rows is None and self.cols is None:
            return self.low
        x = self.row_resized()
        return x if self.cols is None else torch.matmul(x, self.cols.to(x.dtype).T)


def dense(logits: Tensor | Upsampled) -> Tensor:
    """A logit map as a tensor, materialising a factored one."""
    return logits.dense() if isinstance(logits, Upsampled) else logits


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize [..., h, w] to [..., H, W]; float32 at least (logits feed softmax and argmax)."""
    (h, w), dev = x.shape[-2:], x.device
    return Upsampled(
        x,
        resize_operator(h, int(size[0]), int(size[0]), None, dev),
        resize_operator(w, int(size[1]), int(size[1]), None, dev),
    ).dense()
