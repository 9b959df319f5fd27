"""The varlen attention kernel against the padded-SDPA reference of :func:`dtop.ops.attention.segment_attention`."""

from __future__ import annotations

import sys

import torch

from dtop.kernels.attention import varlen_attention
from dtop.models.packed import TokenStream
from dtop.ops.attention import segment_attention
from tests.tolerance import reorder_rel


def main(dev: str, dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    tol = 2e-2 if dtype != torch.float32 else reorder_rel(dtype)  # 16-bit inputs: their rounding
    g = torch.Generator().manual_seed(0)
    cases = 0
    # an empty segment, lengths around the 64-token tiles, and (on CUDA) segments past the long-tile switch
    shapes = [[5], [130, 0, 64, 200], [1, 129, 63]] + ([[2100, 7], [3000]] if dev == "cuda" else [])
    for lengths in shapes:
        for H, D in ((2, 64), (3, 32)):
            T = sum(lengths)
            cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
            batch = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
            q, k, v = torch.randn(T, 3, H, D, generator=g).to(dtype).unbind(1)  # strided, as from one qkv
            stream = TokenStream(torch.zeros(T, 1), batch, batch * 0, cu, max(lengths), len(lengths), 0, False)
            ref = segment_attention(q.float(), k.float(), v.float(), stream)
            got = varlen_attention(q.to(dev), k.to(dev), v.to(dev), cu.to(dev), max(lengths) + 7)  # an upper bound
            assert got.dtype == dtype and got.shape == q.shape
            err = float((got.float().cpu() - ref).abs().max())
            assert err <= tol, (lengths, H, D, err)
            cases += 1
    return cases


if __name__ == "__main__":
    print("ok", main(*sys.argv[1:]))
