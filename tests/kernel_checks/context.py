"""The top-k context kernel against :func:`dtop.ops.context.topk_context_reference`: keep masks and exit
stages bit-equal, ties in confidence included."""

from __future__ import annotations

import sys

import torch

import dtop.kernels.context as kernel
from dtop.ops.context import topk_context_reference


def main(dev: str) -> int:
    g = torch.Generator().manual_seed(0)
    N, cases = 300, 0
    # image segments: empty ones, one longer than a kernel tile and a step, a phantom-like tail image
    for lengths in ([5], [0, 7, 0], [40, 1, 0, 77, 300], [129, 128, 2], [1, 300]):
        for K in (1, 3, 150):
            for p_easy, k in ((0.0, 5), (0.6, 0), (0.6, 1), (0.6, 5), (1.0, 2), (1.0, 400)):
                for ties in (False, True):
                    T, B = sum(lengths), len(lengths)
                    batch = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths))
                    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
                    pos = torch.cat([torch.randperm(N, generator=g)[:n] for n in lengths]) if T else batch
                    pos = torch.where(torch.rand(T, generator=g) < 0.05, -1, pos)  # non-patch tokens
                    conf = torch.rand(T, generator=g)
                    if ties:  # few distinct values: ranks decided by stream order
                        conf = (conf * 4).floor() / 4
                    cls = torch.randint(0, K, (T,), generator=g)
                    easy = (torch.rand(T, generator=g) < p_easy) & (pos >= 0)
                    # graded tokens: the whole stream, or a subset of a longer one (prefix tokens in it, some of
                    # them graded as patches, as the phantom image of graph replay takes them)
                    indexed = (K + int(ties)) % 2 == 1
                    if indexed:
                        S = T + 9
                        idx = torch.randperm(S, generator=g)[:T]
                        stream_pos = torch.randint(0, N, (S,), generator=g)
                        stream_pos[idx[torch.rand(T, generator=g) < 0.1]] = -1
                        stream_pos[torch.isin(torch.arange(S), idx, invert=True)] = -1
                    else:
                        idx, stream_pos = None, pos
                    exit_stage = torch.randint(0, 4, (B * N + 1,), generator=g)
                    kexit = exit_stage.clone().to(dev)
                    ref = topk_context_reference(conf, cls, easy, batch, pos, B, K, k, exit_stage, 1, idx, stream_pos)
                    args = (conf, cls, easy, batch, pos, cu)
                    got = kernel.topk_context(
                        *(t.to(dev) for t in args),
                        k,
                        N,
                        kexit,
                        1,
                        None if idx is None else idx.to(dev),
                        stream_pos.to(dev),
                        kernel.TILES if cases % 2 == 0 else (32, 64, 4),  # the default tiles and another shape
                    )
                    where = (lengths, K, p_easy, k, ties, indexed, cases % 2)
                    assert torch.equal(ref, got.cpu()), where
                    assert torch.equal(exit_stage, kexit.cpu()), where
                    cases += 1
    return cases


if __name__ == "__main__":
    print("ok", main(sys.argv[1]))
