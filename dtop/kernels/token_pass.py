"""DoViT's stage-end bookkeeping (:mod:`dtop.ops.token_pass`) as two Triton kernels.

``_stop``: one pass over the map's tokens and the stream's. A map token whose confidence passes ξ
stops (its exit stage written if it had not stopped yet); a stream token is kept unless its map row
is stopped or stops now — computed from its own row's confidence, so no program waits for another's
write. ``_merge``: one program per (image, slice of channels) sums the image's stopped tokens in
fp32 and rewrites its cls token's slice in place.

Same results as the references (tests compare them under Triton's interpreter; the merge to the
dtype's rounding); import this module only where Triton exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # tokens per program of _stop
MERGE_ROWS, MERGE_COLS = 64, 64  # map tokens per step, channels per program of _merge


@triton.jit(do_not_specialize=["M", "T", "stage"])
def _stop(
    conf_ptr,
    stopped_ptr,
    exit_ptr,
    flat_ptr,
    keep_ptr,
    M,
    T,
    stage,
    thr,
    diff,
    DIFF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_m = i < M
    c = tl.load(conf_ptr + i, mask=in_m, other=0.0)
    stop = c > thr
    if DIFF:
        stop = stop | (c < diff)
    old = tl.load(stopped_ptr + i, mask=in_m, other=0) != 0
    tl.store(exit_ptr + i, tl.full([BLOCK], 0, tl.int64) + stage, mask=in_m & stop & ~old)
    tl.store(stopped_ptr + i, (old | stop).to(tl.int8), mask=in_m)
    in_t = i < T
    f = tl.load(flat_ptr + i, mask=in_t, other=M)
    patch = f < M  # the trash row (index M) never stops
    cf = tl.load(conf_ptr + f, mask=in_t & patch, other=0.0)
    stop_f = cf > thr
    if DIFF:
        stop_f = stop_f | (cf < diff)
    was = tl.load(stopped_ptr + f, mask=in_t & patch, other=0) != 0
    tl.store(keep_ptr + i, (~(patch & (stop_f | was))).to(tl.int8), mask=in_t)


def stop_tokens(
    conf: Tensor,
    threshold: float,
    diff_conf: float | None,
    stopped: Tensor,
    exit_stage: Tensor,
    stage: int,
    flat: Tensor,
) -> Tensor:
    """The stream's keep mask: see :func:`dtop.ops.token_pass.stop_tokens_reference`."""
    M, T = conf.shape[0], flat.shape[0]
    keep = torch.empty(T, dtype=torch.bool, device=conf.device)
    if max(M, T):
        _stop[(triton.cdiv(max(M, T), BLOCK),)](
            conf.contiguous(),
            stopped.view(torch.int8),
            exit_stage,
            flat.contiguous(),
            keep.view(torch.int8),
            M,
            T,
            int(stage),
            float(threshold),
            float(diff_conf) if diff_conf is not None else 0.0,
            DIFF=diff_conf is not None,
            BLOCK=BLOCK,
            num_warps=4,
        )
    return keep


@triton.jit
def _merge(
    x_ptr,
    first_ptr,
    full_ptr,
    stopped_ptr,
    agg,
    N: tl.constexpr,  # fixed by the input size (one compile per size), and a loop bound every Triton can run
    C: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    img = tl.program_id(0)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    in_c = cols < C
    total = tl.zeros([COLS], dtype=tl.float32)
    count = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, N, ROWS):
        r = start + tl.arange(0, ROWS)
        s = tl.load(stopped_ptr + img * N + r, mask=r < N, other=0) != 0
        f = tl.load(full_ptr + (img * N + r)[:, None] * C + cols[None, :], mask=s[:, None] & in_c[None, :], other=0.0)
        total += tl.sum(f.to(tl.float32), 0)
        count += s.to(tl.int32)
    n_stopped = tl.sum(count, 0).to(tl.float32)
    row = tl.load(first_ptr + img)
    cls = tl.load(x_ptr + row * C + cols, mask=in_c, other=0.0)
    mean = total / tl.maximum(n_stopped, 1.0)
    merged = (0.5 * (cls.to(tl.float32) + mean)).to(cls.dtype)
    # a select, not a branch on the count: older Triton interpreters cannot branch on a reduced value
    tl.store(x_ptr + row * C + cols, tl.where(n_stopped / N > agg, merged, cls), mask=in_c)


def merge_cls(x: Tensor, first: Tensor, full: Tensor, stopped: Tensor, agg_rate: float) -> None:
    """Merge in place: see :func:`dtop.ops.token_pass.merge_cls_reference` (``full`` [n, N, C])."""
    n, N, C = full.shape
    if n and N:
        _merge[(n, triton.cdiv(C, MERGE_COLS))](
            x,
            first.contiguous(),
            full.contiguous(),
            stopped.contiguous().view(torch.int8),
            float(agg_rate),
            N=N,
            C=C,
            ROWS=MERGE_ROWS,
            COLS=MERGE_COLS,
            num_warps=4,
        )
