"""Bilinear resizing as two small matmuls.

Exactly ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialias), but its backward is a
matmul too: the built-in kernel's backward scatters with atomics, which for 16× upsampling of 150-class
logits to 512² took most of a training step on an H200. Logit maps are upsampled this way for the
loss and for prediction.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=64)
def _weights(size_in: int, size_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[size_out, size_in] interpolation matrix with PyTorch's half-pixel source coordinates."""
    with torch.inference_mode(False):  # cached across eval and training: never an inference tensor
        return _build(size_in, size_out).to(device=device, dtype=dtype)


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


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize [..., h, w] to [..., H, W]; float32 at least (logits feed softmax and argmax)."""
    H, W = int(size[0]), int(size[1])
    h, w = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if h != H:
        x = torch.matmul(_weights(h, H, x.device, dtype), x)
    if w != W:
        x = torch.matmul(x, _weights(w, W, x.device, dtype).T)
    return x
