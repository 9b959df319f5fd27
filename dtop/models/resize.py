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


def _class_last(x: Tensor) -> bool:
    """[B, K, h, w] laid out as [B, h, w, K] (the engine's canvas): resized without a transpose."""
    return x.dim() == 4 and x.stride(1) == 1 and x.permute(0, 2, 3, 1).is_contiguous()


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize [..., h, w] to [..., H, W]; float32 at least (logits feed softmax and argmax).

    A class-last [B, K, h, w] view (see :func:`_class_last`) comes back class-last too, so per-pixel
    softmax, cross-entropy and argmax read each pixel's K scores contiguously.
    """
    H, W = int(size[0]), int(size[1])
    h, w = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if _class_last(x):
        B, K = x.shape[:2]
        y = x.permute(0, 2, 3, 1)  # [B, h, w, K], contiguous
        if h != H:  # bmm with a broadcast (stride-0) weight: torch.matmul would fold it via transposes
            y = torch.bmm(_weights(h, H, x.device, dtype).expand(B, H, h), y.reshape(B, h, w * K)).view(B, H, w, K)
        if w != W:
            y = torch.bmm(_weights(w, W, x.device, dtype).expand(B * H, W, w), y.reshape(B * H, w, K)).view(B, H, W, K)
        return y.permute(0, 3, 1, 2)
    if h != H:
        x = torch.matmul(_weights(h, H, x.device, dtype), x)
    if w != W:
        x = torch.matmul(x, _weights(w, W, x.device, dtype).T)
    return x
