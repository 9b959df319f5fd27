"""DoViT's stage-end kernels against :mod:`dtop.ops.token_pass`'s references: stopped masks, exit stages
and keep masks bit-equal; merged cls tokens to the dtype's rounding, the rows other than cls untouched."""

from __future__ import annotations

import sys

import torch

import dtop.kernels.token_pass as kernel
from dtop.ops.token_pass import merge_cls_reference, stop_tokens_reference
from tests.tolerance import REORDER_ULPS


def main(dev: str, dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    cases = 0
    # maps smaller and larger than a program's block; streams shorter and longer than the map
    for B, N, T in ((1, 20, 9), (3, 700, 1500), (2, 1100, 2300)):
        M = B * N
        for diff in (None, 0.2):
            for ties in (False, True):
                conf = torch.rand(M, generator=g)
                if ties:  # values on the threshold: strictly above stops
                    conf = (conf * 4).floor() / 4
                stopped = torch.rand(M + 1, generator=g) < 0.3
                stopped[-1] = False
                exit_stage = torch.randint(0, 3, (M + 1,), generator=g)
                flat = torch.randint(0, M + 1, (T,), generator=g)  # index M: a non-patch token (the trash row)
                kstopped, kexit = stopped.clone().to(dev), exit_stage.clone().to(dev)
                ref = stop_tokens_reference(conf, 0.75, diff, stopped, exit_stage, 3, flat)
                got = kernel.stop_tokens(conf.to(dev), 0.75, diff, kstopped, kexit, 3, flat.to(dev))
                where = (B, N, T, diff, ties)
                assert torch.equal(ref, got.cpu()), where
                assert torch.equal(stopped, kstopped.cpu()) and torch.equal(exit_stage, kexit.cpu()), where
                assert bool(ref.any()) and not bool(ref.all()) and not bool(stopped[-1]), where  # a real test
                cases += 1
        for p_stop in (0.0, 0.05, 0.6):
            C = 96 if N < 1000 else 200
            full = torch.randn(B, N, C, generator=g).to(dtype)
            stopped = torch.rand(B, N, generator=g) < p_stop
            x = torch.randn(T, C, generator=g).to(dtype)
            first = torch.sort(torch.randperm(T, generator=g)[:B]).values
            ref = merge_cls_reference(x, first, full, stopped, 0.1)
            kx = x.clone().to(dev)
            kernel.merge_cls(kx, first.to(dev), full.to(dev), stopped.to(dev), 0.1)
            kx = kx.cpu()
            # fp32: summation order only; bf16: the reference also rounds the sum and the mean to bf16
            ulps = REORDER_ULPS if dtype == torch.float32 else 8
            tol = ulps * torch.finfo(dtype).eps
            scale = float(ref.float().abs().max())
            assert torch.allclose(kx[first].float(), ref.float(), rtol=tol, atol=tol * scale), (B, N, p_stop)
            rest = torch.ones(T, dtype=torch.bool)
            rest[first] = False
            assert torch.equal(kx[rest], x[rest]), (B, N, p_stop)
            merged = stopped.sum(1).float() / N > 0.1
            assert torch.equal((kx[first] != x[first]).any(1), merged), (B, N, p_stop)  # merged iff enough stopped
            cases += 1
    return cases


if __name__ == "__main__":
    print("ok", main(*sys.argv[1:]))
