"""Pixel cross-entropy on [B, K, H, W] logit maps as Triton kernels: a plain pair and an upsampling pair.

Why: a 150-class map upsampled to 512² is 300 M logits per batch of 8. The stock path (cast to
fp32, channel-strided log-softmax, NLL, then the same passes backwards) moves ~12 GB per map, a
large share of a ViT-B training step that token pruning cannot touch. Here the forward reads the
logits once (online log-sum-exp over the classes, fp32 accumulation) and keeps only the per-pixel
log-sum-exp; the backward reads them once more and writes the gradient in the logits' dtype, with no
fp32 copy of the map (measurements: docs/performance.md, ``tools/dev/bench_loss.py``).

The kernels read NCHW directly: a program owns a run of contiguous pixels of one image and walks the
class axis, so every load is coalesced. Results equal ``F.cross_entropy(..., reduction="sum")`` up to
float rounding; pixels labelled ``ignore_index`` contribute nothing; a label outside [0, K) that is
not ``ignore_index`` makes the loss NaN (never a silently wrong number).

The class count (and, for the upsampling backward, the label width) is a compile-time constant (one
compilation per dataset and crop), which also keeps the loops plain Python ranges under the
interpreter of Triton 3.6.

The upsampling pair (``_up_ce_*``) goes further for the maps a training step actually has: token-grid
logits bilinearly upsampled to the labels. The map is kept factored as ``A @ colsᵀ`` (``A`` resized
along rows only, 16× smaller for ViT/16); each program computes one row's logits tile by tile as a
tensor-core product and never writes them, and the backward reduces the row's gradient straight into
``dA``.

Import this module only where Triton exists; :func:`dtop.losses.cross_entropy` picks it for CUDA maps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (pixels, classes) per tile and warps: the fastest of a sweep for 150 classes at 512², bf16 (docs/performance.md)
FORWARD = (512, 32, 4)
BACKWARD = (128, 32, 4)
# (pixels of a row, classes) per tile and warps for the upsampling kernels: the fastest of tools/dev/sweep_ce_tiles.py
# (32² → 512², 150 classes, bf16; docs/performance.md)
UP_FORWARD = (128, 32, 2)
UP_BACKWARD = (128, 64, 4)
# widest low-resolution map the upsampling kernels take (one tile holds a whole source row)
MAX_SOURCE_WIDTH = 256


@triton.jit
def _ce_forward(
    x_ptr,
    t_ptr,
    w_ptr,
    lse_ptr,
    part_ptr,
    K: tl.constexpr,
    P,
    stride_b,
    stride_k,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p, b = tl.program_id(0), tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < P
    base = x_ptr + b.to(tl.int64) * stride_b + p
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k[:, None] < K) & in_p[None, :]
        tile = tl.load(base[None, :] + k[:, None].to(tl.int64) * stride_k, mask=mask, other=float("-inf")).to(
            tl.float32
        )
        m_new = tl.maximum(m, tl.max(tile, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(tile - m_safe[None, :]), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(t_ptr + b.to(tl.int64) * P + p, mask=in_p, other=ignore_index).to(tl.int64)
    valid = in_p & (t != ignore_index)
    bad = valid & ((t < 0) | (t >= K))
    ok = valid & ~bad
    x_t = tl.load(base + tl.where(ok, t, 0) * stride_k, mask=ok, other=0.0).to(tl.float32)
    w_t = tl.full([BLOCK_P], 1.0, tl.float32)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tl.where(ok, t, 0), mask=ok, other=0.0).to(tl.float32)
    loss = tl.where(ok, (lse - x_t) * w_t, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(lse_ptr + b.to(tl.int64) * P + p, lse, mask=in_p)
    tl.store(part_ptr + b * tl.num_programs(0) + pid_p, tl.sum(loss, 0))


@triton.jit
def _ce_backward(
    x_ptr,
    t_ptr,
    w_ptr,
    lse_ptr,
    g_ptr,
    dx_ptr,
    K: tl.constexpr,
    P,
    stride_b,
    stride_k,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid_p, b = tl.program_id(0), tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < P
    row = b.to(tl.int64) * P + p
    t = tl.load(t_ptr + row, mask=in_p, other=ignore_index).to(tl.int64)
    ok = in_p & (t != ignore_index) & (t >= 0) & (t < K)
    scale = tl.load(g_ptr).to(tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + tl.where(ok, t, 0), mask=ok, other=0.0).to(tl.float32)
    scale = tl.where(ok, scale, 0.0)
    lse = tl.load(lse_ptr + row, mask=in_p, other=0.0)
    base = b.to(tl.int64) * stride_b + p
    dbase = b.to(tl.int64) * K * P + p
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = (k[:, None] < K) & in_p[None, :]
        tile = tl.load(x_ptr + base[None, :] + k[:, None].to(tl.int64) * stride_k, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(tile - lse[None, :]) - (k[:, None] == t[None, :]).to(tl.float32)) * scale[None, :]
        tl.store(dx_ptr + dbase[None, :] + k[:, None].to(tl.int64) * P, grad.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _up_ce_forward(
    a_ptr,
    c_ptr,
    t_ptr,
    w_ptr,
    lse_ptr,
    part_ptr,
    K: tl.constexpr,
    H,
    W,
    WS,
    stride_ab,
    stride_ak,
    stride_ay,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One run of BLOCK_X pixels of row y: logits = A[b, :, y, :] @ colsᵀ on tensor cores, online log-sum-exp."""
    pid_x, y, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    in_x = x < W
    j = tl.arange(0, BLOCK_W)
    in_j = j < WS
    r = tl.load(c_ptr + x[None, :] * WS + j[:, None], mask=in_j[:, None] & in_x[None, :], other=0.0)
    row = (b.to(tl.int64) * H + y) * W + x
    t = tl.load(t_ptr + row, mask=in_x, other=ignore_index).to(tl.int64)
    a_row = a_ptr + b.to(tl.int64) * stride_ab + y.to(tl.int64) * stride_ay + j[None, :]
    m = tl.full([BLOCK_X], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_X], tl.float32)
    x_t = tl.zeros([BLOCK_X], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_row + k[:, None].to(tl.int64) * stride_ak, mask=(k[:, None] < K) & in_j[None, :], other=0.0)
        tile = tl.where(k[:, None] < K, tl.dot(a, r, input_precision=DOT), float("-inf"))
        m_new = tl.maximum(m, tl.max(tile, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(tile - m_new[None, :]), 0)
        m = m_new
        x_t += tl.sum(tl.where(k[:, None] == t[None, :], tile, 0.0), 0)
    lse = m + tl.log(s)
    valid = in_x & (t != ignore_index)
    bad = valid & ((t < 0) | (t >= K))
    ok = valid & ~bad
    w_t = tl.full([BLOCK_X], 1.0, tl.float32)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tl.where(ok, t, 0), mask=ok, other=0.0).to(tl.float32)
    loss = tl.where(ok, (lse - x_t) * w_t, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(lse_ptr + row, lse, mask=in_x)
    tl.store(part_ptr + (b * H + y) * tl.num_programs(0) + pid_x, tl.sum(loss, 0))


@triton.jit
def _up_ce_backward(
    a_ptr,
    c_ptr,
    t_ptr,
    w_ptr,
    lse_ptr,
    g_ptr,
    da_ptr,
    K: tl.constexpr,
    H,
    W: tl.constexpr,
    WS,
    stride_ab,
    stride_ak,
    stride_ay,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """dA[b, k-block, y, :] = Σ over the row's pixels of (softmax − onehot) · cols: no atomics, no full map."""
    pid_k, y, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = k < K
    j = tl.arange(0, BLOCK_W)
    in_j = j < WS
    a = tl.load(
        a_ptr
        + b.to(tl.int64) * stride_ab
        + y.to(tl.int64) * stride_ay
        + k[:, None].to(tl.int64) * stride_ak
        + j[None, :],
        mask=in_k[:, None] & in_j[None, :],
        other=0.0,
    )
    g = tl.load(g_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_W], tl.float32)
    for x0 in range(0, W, BLOCK_X):
        x = x0 + tl.arange(0, BLOCK_X)
        in_x = x < W
        r = tl.load(c_ptr + x[None, :] * WS + j[:, None], mask=in_j[:, None] & in_x[None, :], other=0.0)
        row = (b.to(tl.int64) * H + y) * W + x
        t = tl.load(t_ptr + row, mask=in_x, other=ignore_index).to(tl.int64)
        ok = in_x & (t != ignore_index) & (t >= 0) & (t < K)
        scale = tl.where(ok, g, 0.0)
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + tl.where(ok, t, 0), mask=ok, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row, mask=in_x, other=0.0)
        tile = tl.dot(a, r, input_precision=DOT)
        p = (tl.exp(tile - lse[None, :]) - (k[:, None] == t[None, :]).to(tl.float32)) * scale[None, :]
        acc += tl.dot(p.to(a.dtype), tl.trans(r), input_precision=DOT)
    out = ((b.to(tl.int64) * K + k[:, None]) * H + y) * WS + j[None, :]
    tl.store(da_ptr + out, acc.to(da_ptr.dtype.element_ty), mask=in_k[:, None] & in_j[None, :])


def _layout(logits: Tensor) -> Tensor:
    """The logits as [B, K, P] with unit pixel stride."""
    x = logits.reshape(*logits.shape[:2], -1)
    return x if x.stride(2) == 1 else x.contiguous()


def _launch(kernel: triton.JITFunction, config: tuple[int, int, int], B: int, K: int, P: int, *args, **meta) -> None:
    block_p, block_k, warps = config
    kernel[(triton.cdiv(P, block_p), B)](
        *args, BLOCK_K=min(triton.next_power_of_2(K), block_k), BLOCK_P=block_p, num_warps=warps, **meta
    )


class _PixelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
        x = _layout(logits)
        B, K, P = x.shape
        t = target.reshape(B, P).contiguous()
        lse = torch.empty(B, P, dtype=torch.float32, device=x.device)
        part = torch.empty(B * triton.cdiv(P, FORWARD[0]), dtype=torch.float32, device=x.device)
        w = weight.float().contiguous() if weight is not None else lse  # any pointer when unused
        _launch(
            _ce_forward,
            FORWARD,
            B,
            K,
            P,
            x,
            t,
            w,
            lse,
            part,
            K,
            P,
            x.stride(0),
            x.stride(1),
            ignore_index,
            HAS_WEIGHT=weight is not None,
        )
        ctx.save_for_backward(x, t, w, lse)
        ctx.meta = (logits.shape, weight is not None, ignore_index)
        return part.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, t, w, lse = ctx.saved_tensors
        shape, has_weight, ignore_index = ctx.meta
        B, K, P = x.shape
        dx = torch.empty(B, K, P, dtype=x.dtype, device=x.device)
        _launch(
            _ce_backward,
            BACKWARD,
            B,
            K,
            P,
            x,
            t,
            w,
            lse,
            grad.float().contiguous(),
            dx,
            K,
            P,
            x.stride(0),
            x.stride(1),
            ignore_index,
            HAS_WEIGHT=has_weight,
        )
        return dx.view(shape), None, None, None


def pixel_cross_entropy_sum(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = 255
) -> Tensor:
    """Σ over labelled pixels of (class-weighted) −log softmax(logits)[target]; logits [B, K, ...], target [B, ...]."""
    if target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"Labels of shape {tuple(target.shape)} do not match logits {tuple(logits.shape)} "
            "([B, K, H, W] logits need [B, H, W] labels)."
        )
    return _PixelCrossEntropy.apply(logits, target, weight, int(ignore_index))


class _UpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, cols: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
        B, K, H, WS = a.shape
        W = cols.shape[0]
        t = target.contiguous()
        lse = torch.empty(B, H, W, dtype=torch.float32, device=a.device)
        block_x, block_k, warps = UP_FORWARD
        grid = (triton.cdiv(W, block_x), H, B)
        part = torch.empty(grid[0] * H * B, dtype=torch.float32, device=a.device)
        w = weight.float().contiguous() if weight is not None else lse  # any pointer when unused
        meta = dict(
            HAS_WEIGHT=weight is not None,
            DOT="ieee" if a.dtype == torch.float32 else "tf32",
            BLOCK_W=max(16, triton.next_power_of_2(WS)),
        )
        _up_ce_forward[grid](
            a,
            cols,
            t,
            w,
            lse,
            part,
            K,
            H,
            W,
            WS,
            a.stride(0),
            a.stride(1),
            a.stride(2),
            ignore_index,
            BLOCK_K=max(16, min(triton.next_power_of_2(K), block_k)),
            BLOCK_X=block_x,
            num_warps=warps,
            **meta,
        )
        ctx.save_for_backward(a, cols, t, w, lse)
        ctx.meta = (meta, ignore_index)
        return part.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        a, cols, t, w, lse = ctx.saved_tensors
        meta, ignore_index = ctx.meta
        B, K, H, WS = a.shape
        da = torch.empty(B, K, H, WS, dtype=a.dtype, device=a.device)
        block_x, block_k, warps = UP_BACKWARD
        block_k = max(16, min(triton.next_power_of_2(K), block_k))
        _up_ce_backward[(triton.cdiv(K, block_k), H, B)](
            a,
            cols,
            t,
            w,
            lse,
            grad.float().contiguous(),
            da,
            K,
            H,
            cols.shape[0],
            WS,
            a.stride(0),
            a.stride(1),
            a.stride(2),
            ignore_index,
            BLOCK_K=block_k,
            BLOCK_X=block_x,
            num_warps=warps,
            **meta,
        )
        return da, None, None, None, None


def upsampled_cross_entropy_sum(
    a: Tensor, cols: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = 255
) -> Tensor:
    """Σ over labelled pixels of −log softmax(a @ colsᵀ)[target] without forming ``a @ colsᵀ``.

    ``a`` [B, K, H, w] is the logit map already resized along rows, ``cols`` [W, w] the column
    interpolation matrix, ``target`` [B, H, W]. Why: the full map of a 150-class 512² batch is
    hundreds of MB written, read and back-propagated through for every loss term; these kernels
    read ``a`` (16× smaller for ViT/16) and interpolate each tile on tensor cores.
    """
    B, K, H, WS = a.shape
    if tuple(target.shape) != (B, H, cols.shape[0]) or cols.shape[1] != WS:
        raise ValueError(
            f"Labels {tuple(target.shape)}, row-resized logits {tuple(a.shape)} and column matrix "
            f"{tuple(cols.shape)} do not fit ([B, K, H, w], [W, w] and [B, H, W])."
        )
    if WS > MAX_SOURCE_WIDTH:
        raise ValueError(
            f"Source width {WS} > {MAX_SOURCE_WIDTH}: materialise the map and use pixel_cross_entropy_sum."
        )
    a = a if a.stride(3) == 1 else a.contiguous()
    return _UpsampledCrossEntropy.apply(a, cols.to(a.dtype).contiguous(), target, weight, int(ignore_index))
