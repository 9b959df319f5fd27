"""Attention within each image's segment of a packed token stream: one op, four backends.

The reference is per-image SDPA over the segments padded to the longest one, padding masked (CPU,
fp32, dropout). The fast paths run on CUDA in 16 bits: batched SDPA for the unpruned model's equal
segments, the Triton varlen kernel for pruned inference, ATen's flash varlen (forward and backward)
for pruned training.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from dtop.kernels import load


class Segments(Protocol):
    """The layout of a packed stream that attention needs (:class:`~dtop.models.packed.TokenStream` has it)."""

    cu_seqlens: Tensor  # [B + 1] int32 segment offsets
    max_len: int  # longest segment (an upper bound on CUDA)
    uniform: bool  # every non-empty segment has max_len tokens
    fixed: bool  # lengths follow from the input size alone (no pruning decision shaped them)

    def pad(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def unpad(self, t: Tensor) -> Tensor: ...


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> tuple[Tensor, ...]:
    """ATen flash varlen forward, non-causal, no dropout: (out, lse, philox seed, philox offset, debug mask)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)


class _FlashVarlen(torch.autograd.Function):
    """Flash attention over packed segments, with its backward: the ATen flash kernels called directly.

    ``torch.nn.attention.varlen.varlen_attn`` does the same through two Python custom ops, whose
    dispatch is host time a CPU-bound training step cannot spare.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
        out, lse, seed, offset, _ = _flash_forward(q, k, v, cu, max_len)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, False, seed, offset
        )
        return dq, dk, dv, None, None


def segment_attention(q: Tensor, k: Tensor, v: Tensor, stream: Segments, dropout_p: float = 0.0) -> Tensor:
    """Self-attention of [T, H, D] q/k/v within each segment of ``stream`` → [T, H, D].

    - the dense model's equal segments: batched SDPA, like timm;
    - other streams on CUDA in 16 bits: flash varlen — without gradient the Triton kernel of
      :mod:`dtop.kernels.attention` (for a unit-stride head dim, a power of two in [16, 128]; the ATen
      op otherwise or where Triton is missing), with gradient :class:`_FlashVarlen` (ATen's forward and
      backward). Equal segments too when pruning shaped them: SDPA's cuDNN backend plans anew for
      every sequence length, and a pruned length is new almost every batch
      (docs/performance.md has the measurements);
    - elsewhere (CPU, fp32): SDPA over the padded segments with the padding masked.
    """
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
    if flash and not (stream.uniform and stream.fixed):
        cu, n = stream.cu_seqlens, stream.max_len
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _FlashVarlen.apply(q, k, v, cu, n)
        D = q.shape[-1]
        fits = D & (D - 1) == 0 and 16 <= D <= 128 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        kernel = load("attention") if fits else None
        return kernel.varlen_attention(q, k, v, cu, n) if kernel is not None else _flash_forward(q, k, v, cu, n)[0]
    if stream.uniform:
        B = q.shape[0] // stream.max_len
        qb, kb, vb = (t.reshape(B, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(q.shape)
    (qp, valid), (kp, _), (vp, _) = stream.pad(q), stream.pad(k), stream.pad(v)
    mask = valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p
    )
    return stream.unpad(out.transpose(1, 2))
