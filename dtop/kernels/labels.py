"""Bilinear upsampling of a class map fused with the per-pixel argmax.

Why: a prediction only needs each pixel's class, but upsampling 150 fp32 class maps to 512² writes
1.26 GB at batch 8, dense and pruned alike, to read it once for the argmax.
Here each program takes a block of up to ``RUN``×``RUN`` pixels that mix the same four
low-resolution class vectors, interpolates them in registers row by row and writes only the labels.

Same labels as ``scores(upsample(logits)).argmax(1)`` up to the last bit of the interpolation
(ties); tests compare them under Triton's interpreter. Import only where Triton exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

WARPS = (2, 4)  # per program, up to 32 classes / more (chosen by tools/dev/bench_labels.py --sweep)


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _labels(
    low_ptr,
    presence_ptr,
    out_ptr,
    row_runs,
    row_w,
    col_runs,
    col_w,
    h,
    w,
    H,
    W,
    K: tl.constexpr,
    SIGMOID: tl.constexpr,
    PRESENCE: tl.constexpr,
    RUN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    run_y, run_x, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    in_k = ks < K
    y0, y1 = tl.load(row_runs + run_y * 4), tl.load(row_runs + run_y * 4 + 1)
    first_y, count_y = tl.load(row_runs + run_y * 4 + 2), tl.load(row_runs + run_y * 4 + 3)
    x0, x1 = tl.load(col_runs + run_x * 4), tl.load(col_runs + run_x * 4 + 1)
    first_x, count_x = tl.load(col_runs + run_x * 4 + 2), tl.load(col_runs + run_x * 4 + 3)
    image = low_ptr + b * h * w * K  # channels-last: a pixel's K classes are contiguous
    c00 = tl.load(image + (y0 * w + x0) * K + ks, mask=in_k, other=0.0).to(tl.float32)
    c01 = tl.load(image + (y0 * w + x1) * K + ks, mask=in_k, other=0.0).to(tl.float32)
    c10 = tl.load(image + (y1 * w + x0) * K + ks, mask=in_k, other=0.0).to(tl.float32)
    c11 = tl.load(image + (y1 * w + x1) * K + ks, mask=in_k, other=0.0).to(tl.float32)
    xs = tl.arange(0, RUN)
    in_x = xs < count_x
    wx0 = tl.load(col_w + (first_x + xs) * 2, mask=in_x, other=0.0)
    wx1 = tl.load(col_w + (first_x + xs) * 2 + 1, mask=in_x, other=0.0)
    if PRESENCE:
        presence = tl.sigmoid(tl.load(presence_ptr + b * K + ks, mask=in_k, other=0.0).to(tl.float32))
    for i in tl.static_range(RUN):
        y = first_y + i
        width = tl.where(count_y > i, count_x, 0)  # outputs to store on this row
        row = tl.minimum(y, H - 1)  # past the run: any valid row, its labels are not stored
        wy0, wy1 = tl.load(row_w + row * 2), tl.load(row_w + row * 2 + 1)
        left = wy0 * c00 + wy1 * c10  # rows first, as the reference's two matmuls
        right = wy0 * c01 + wy1 * c11
        v = left[:, None] * wx0[None, :] + right[:, None] * wx1[None, :]
        if SIGMOID:  # ATM: mask sigmoid times class presence (both in (0, 1))
            v = tl.sigmoid(v)
            if PRESENCE:
                v = v * presence[:, None]
            v = tl.where(in_k[:, None], v, -1.0)
        else:
            v = tl.where(in_k[:, None], v, float("-inf"))
        label = tl.argmax(v, 0)
        tl.store(out_ptr + (b * H + y) * W + first_x + xs, label.to(tl.int64), mask=xs < width)


def upsampled_argmax(
    logits: Tensor,
    presence: Tensor | None,
    sigmoid: bool,
    row_runs: Tensor,
    row_weights: Tensor,
    col_runs: Tensor,
    col_weights: Tensor,
    run: int,
) -> Tensor:
    """Labels [B, H, W] (int64) of the token-grid ``logits`` [B, K, h, w] resized along rows and columns.

    Each axis's resize is given as runs ([R, 4] int32: first input, second input, first output, number
    of outputs ≤ ``run``) and the two inputs' weights per output ([out, 2] float32). Scores are the
    logits, or with ``sigmoid`` their sigmoid times ``presence``'s [B, K] when given.
    """
    B, K, h, w = logits.shape
    H, W = row_weights.shape[0], col_weights.shape[0]
    low = logits.permute(0, 2, 3, 1).contiguous()  # a view already for the engine's maps
    out = torch.empty(B, H, W, dtype=torch.long, device=logits.device)
    if out.numel():
        presence_t = presence.contiguous() if presence is not None else low
        block_k = max(16, triton.next_power_of_2(K))
        _labels[(row_runs.shape[0], col_runs.shape[0], B)](
            low,
            presence_t,
            out,
            row_runs,
            row_weights,
            col_runs,
            col_weights,
            h,
            w,
            H,
            W,
            K=K,
            SIGMOID=sigmoid,
            PRESENCE=presence is not None,
            RUN=run,
            BLOCK_K=block_k,
            num_warps=WARPS[block_k > 32],
        )
    return out
