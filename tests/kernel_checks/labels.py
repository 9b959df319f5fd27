"""The label kernel against :func:`dtop.ops.labels.labels_reference`: a top class at every pixel (ties aside)."""

from __future__ import annotations

import sys

import torch

from dtop.kernels.labels import upsampled_argmax
from dtop.models.heads.base import SegHead
from dtop.ops.labels import labels_reference, upsampled
from dtop.ops.resize import RUN, resize_taps
from tests.tolerance import reorder_rel


def main(dev_name: str, dtype_name: str) -> int:
    dev, dtype = torch.device(dev_name), getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    cases = 0
    # (grid, padded, input) per axis: ×16 with and without a padding crop, ×1, and a non-integer scale
    chains = [((2, 32, 32), (3, 48, 48)), ((3, 48, 45), (2, 32, 29)), ((3, 3, 3), (4, 4, 4)), ((2, 2, 2), (3, 11, 11))]
    for rule, with_presence in (("softmax", False), ("sigmoid", False), ("sigmoid", True)):
        for K, ((rn, rp, rc), (cn, cp, cc)) in zip((7, 150, 150, 7), chains):
            B = 2
            head = SegHead()
            head.grading = rule
            logits = (3 * torch.randn(B, rn, cn, K, generator=g)).to(dtype).permute(0, 3, 1, 2)
            logits[1, 3] += 3  # class 3 often wins in image 1, tied with a copy of it:
            logits[1, 5 if K < 40 else 40] = logits[1, 3]  # ties go to the first class, as torch's argmax
            presence = torch.randn(B, K, generator=g).to(dtype) if with_presence else None
            chain = [(rn, rp, rc, rc), (cn, cp, cc, cc)]
            want = labels_reference(logits.float(), presence, head.scores, chain)
            scores = head.scores(upsampled(logits.float(), chain).dense(), presence)
            rows, cols = (resize_taps(*c, dev) for c in chain)
            got = upsampled_argmax(
                logits.to(dev),
                None if presence is None else presence.to(dev),
                rule == "sigmoid",
                rows.runs,
                rows.weights,
                cols.runs,
                cols.weights,
                RUN,
            ).cpu()
            where = (K, rule, with_presence, rn, rp, rc, cn, cp, cc)
            assert got.shape == (B, rc, cc) and got.dtype == torch.long, where
            top = scores.max(1).values
            picked = scores.gather(1, got[:, None]).squeeze(1)
            tol = reorder_rel(torch.float32) * (1 + top.abs())
            assert bool((picked >= top - tol).all()), where  # a top class, up to rounding
            assert (got != want).float().mean() < 1e-3, where  # differences only at ties
            assert want.unique().numel() > 2, where  # a real test: several classes win
            cases += 1
    return cases


if __name__ == "__main__":
    print("ok", main(*sys.argv[1:]))
