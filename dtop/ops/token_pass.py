"""DoViT's stage-end bookkeeping (Sec. 3.2 token pass, Eq. 8 cls merge) on the reconstructed map.

``stop_tokens``: the tokens whose confidence passes ξ stop (recording the stage for those not stopped
yet) and the stream's keep mask follows. ``merge_cls``: each image's cls token takes the mean of its
stopped tokens once enough have stopped. Reference: PyTorch ops (autograd flows through the merge).
Fast path (CUDA, in place, no gradient): one Triton kernel each, :mod:`dtop.kernels.token_pass` — the
reference is ~25 launches per stage end, most of the DoViT policy's own time at small batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dtop.kernels import load


def stop_tokens_reference(
    conf: Tensor,
    threshold: float,
    diff_conf: float | None,
    stopped: Tensor,
    exit_stage: Tensor,
    stage: int,
    flat: Tensor,
) -> Tensor:
    """Stop the map's tokens whose confidence ``conf`` [B·N] is above ``threshold`` (or below
    ``diff_conf``); ``stopped`` / ``exit_stage`` [B·N + 1] are updated in place (the trash row never
    stops); returns the keep mask of the stream's tokens, whose rows in the map are ``flat``."""
    stop = conf > threshold
    if diff_conf is not None:
        stop = stop | (conf < diff_conf)
    live = stopped[:-1]
    exit_stage[:-1].masked_fill_(stop & ~live, stage)
    live |= stop
    return ~stopped[flat]


def stop_tokens(
    conf: Tensor,
    threshold: float,
    diff_conf: float | None,
    stopped: Tensor,
    exit_stage: Tensor,
    stage: int,
    flat: Tensor,
) -> Tensor:
    """:func:`stop_tokens_reference`, as one kernel on CUDA."""
    kernel = load("token_pass") if conf.is_cuda else None
    if kernel is None:
        return stop_tokens_reference(conf, threshold, diff_conf, stopped, exit_stage, stage, flat)
    return kernel.stop_tokens(conf, threshold, diff_conf, stopped, exit_stage, stage, flat)


def merge_cls_reference(x: Tensor, first: Tensor, full: Tensor, stopped: Tensor, agg_rate: float) -> Tensor:
    """Eq. 8: the cls tokens ``x[first]`` [n, C] become ½(cls + mean of the image's stopped tokens) where
    more than ``agg_rate`` of its ``full`` [n, N, C] tokens have ``stopped`` [n, N]; returns them."""
    N = stopped.shape[1]
    count = stopped.sum(1)
    # the stopped tokens' sum as one batched GEMM: a masked product and sum would write and read the map again
    total = torch.bmm(stopped[:, None, :].to(full.dtype), full)[:, 0]
    mean = total / count.clamp(min=1)[:, None]
    cls = x[first]
    return torch.where((count.float() / N > agg_rate)[:, None], 0.5 * (cls + mean.to(cls.dtype)), cls)


def merge_cls(x: Tensor, first: Tensor, full: Tensor, stopped: Tensor, agg_rate: float, inplace: bool) -> Tensor:
    """The stream features ``x`` with the merged cls tokens (:func:`merge_cls_reference`): written in
    place where ``inplace`` (one kernel on CUDA), else a new tensor autograd can follow."""
    kernel = load("token_pass") if x.is_cuda and inplace and x.is_contiguous() and not x.requires_grad else None
    if kernel is not None:
        kernel.merge_cls(x, first, full, stopped, agg_rate)
        return x
    merged = merge_cls_reference(x, first, full, stopped, agg_rate)
    return x.index_put_((first,), merged) if inplace else x.index_put((first,), merged)
