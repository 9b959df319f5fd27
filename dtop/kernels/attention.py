"""Varlen self-attention over a packed token stream, forward only, in Triton.

Why: pruned streams cannot take cuDNN (a new plan per sequence length; its ragged mode cannot be
captured in a CUDA graph), and ATen's flash varlen (FA2) runs far below the chip's rate on the
300–900-token segments of pruned 512² streams (docs/performance.md). On Hopper Triton compiles
``tl.dot`` to wgmma; this kernel is FA2's algorithm
(online softmax over key blocks, one program per query block, segment and head) without the backward,
for inference.

Same results as the masked SDPA reference within bf16 rounding (tests compare them under Triton's
interpreter); import this module only where Triton exists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tiles chosen by `tools/dev/bench_attention.py --sweep` (docs/performance.md): short segments (≲1k tokens,
# ViT-B/L at 512²) and long ones (~5k tokens, 1024×2048) prefer different tiles.
SHORT = (64, 64, 4, 3)  # BLOCK_M, BLOCK_N, warps, stages for max_len ≤ LONG_FROM
LONG = (128, 64, 8, 3)
LONG_FROM = 2048


@triton.jit(do_not_specialize=["max_len"])
def _attention(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_ptr,
    max_len,
    sq_t,
    sq_h,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    so_t,
    so_h,
    qk_scale,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    seg = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seg)
    n = tl.load(cu_ptr + seg + 1) - start
    if m_block * BLOCK_M < n:
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        row_ok = rows < n
        q = tl.load(
            q_ptr + (start + rows)[:, None].to(tl.int64) * sq_t + head * sq_h + dims[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j in range(0, n, BLOCK_N):
            cols = j + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            tok = (start + cols).to(tl.int64)
            k = tl.load(k_ptr + tok[:, None] * sk_t + head * sk_h + dims[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain: exp2 below
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + tok[:, None] * sv_t + head * sv_h + dims[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            o_ptr + (start + rows)[:, None].to(tl.int64) * so_t + head * so_h + dims[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int) -> Tensor:
    """Softmax(q kᵀ / √D) v within each segment of ``cu_seqlens``; q/k/v [T, H, D] with unit stride in D
    (D a power of two). ``max_len`` bounds the longest segment; tokens outside every segment are left
    unwritten, as by FA2."""
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    segments = cu_seqlens.shape[0] - 1
    if T == 0 or segments == 0 or max_len <= 0:
        return out.zero_()
    block_m, block_n, warps, stages = SHORT if max_len <= LONG_FROM else LONG
    grid = (triton.cdiv(max_len, block_m), segments, H)
    _attention[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        max_len,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        math.log2(math.e) / math.sqrt(D),
        D=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fp32: no TF32 rounding
    return out
