"""The grading kernel against :func:`dtop.ops.grade.grade_reference`: canvas, exit stages, classes and
decisions bit-equal, confidences to the dtype's rounding."""

from __future__ import annotations

import sys

import torch

from dtop.kernels.grade import confidence, grade
from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.packed import TokenStream
from dtop.ops.grade import grade_reference
from tests.tolerance import reorder_rel


class _Head(SegHead):
    def __init__(self, rule: str) -> None:
        super().__init__()
        self.grading = rule


def main(dev: str, dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    N, cases = 20, 0
    # three images (one token-less) + a phantom; a cls token (pos -1) leads each real image
    segments = [[-1] + sorted(torch.randperm(N, generator=g)[:13].tolist()), [], [-1, 0, 3, 19]]
    segments.append([j % N for j in range(17)])
    batch = torch.cat([torch.full((len(s),), i) for i, s in enumerate(segments)])
    pos = torch.tensor(sum(segments, []))
    cu = torch.tensor([0] + [len(s) for s in segments]).cumsum(0).to(torch.int32)
    T, B = batch.numel(), len(segments)
    ps = TokenStream(torch.zeros(T, 1), batch, pos, cu, 18, B, 3, False, True)
    for K in (7, 150):
        for rule, with_presence in (("softmax", False), ("sigmoid", False), ("sigmoid", True)):
            for with_mask in (False, True):
                for final in (False, True):
                    scale = 3.0 if rule == "softmax" else 1.0
                    logits = (scale * torch.randn(T, K, generator=g)).to(dtype)
                    presence = torch.randn(B, K, generator=g).to(dtype) if with_presence else None
                    mask = torch.rand(B - 1, N, generator=g) < 0.5 if with_mask else None
                    thr = 0.3 if rule == "softmax" else 0.4 if with_presence else 0.6
                    head, out = _Head(rule), HeadOutput(logits, presence)
                    canvas, exit_stage = torch.zeros(B * N + 1, K), torch.full((B * N + 1,), 2)
                    kcanvas, kexit = canvas.clone().to(dev), exit_stage.clone().to(dev)
                    r = grade_reference(
                        logits,
                        lambda: head.token_probs(out, ps),
                        batch,
                        pos,
                        N,
                        canvas,
                        exit_stage,
                        1,
                        thr,
                        mask,
                        final,
                        inplace=True,
                    )
                    k = grade(
                        logits.to(dev),
                        None if presence is None else presence.to(dev),
                        rule == "sigmoid",
                        batch.to(dev),
                        pos.to(dev),
                        N,
                        kcanvas,
                        kexit,
                        1,
                        thr,
                        None if mask is None else mask.to(dev),
                        final,
                    )
                    kconf, kcls, keasy, kkeep = (None if t is None else t.cpu() for t in k)
                    where = (K, rule, with_presence, with_mask, final)
                    assert torch.allclose(
                        r.conf, kconf, rtol=reorder_rel(torch.float32), atol=reorder_rel(torch.float32)
                    ), where
                    assert torch.equal(r.cls, kcls) and torch.equal(r.easy, keasy), where
                    assert (r.keep is None) == (kkeep is None) and (r.keep is None or torch.equal(r.keep, kkeep)), where
                    assert torch.equal(canvas[:-1], kcanvas[:-1].cpu()) and torch.equal(exit_stage, kexit.cpu()), where
                    assert r.easy.any() and not r.easy.all() and not r.easy[pos < 0].any(), where  # a real test
                    assert final == bool((exit_stage == 1).any()), where
                    if not with_mask and not final:  # graded only (dtop.ops.grade.confidence): no canvas
                        before = kcanvas.clone()
                        conf = confidence(
                            logits.to(dev),
                            None if presence is None else presence.to(dev),
                            rule == "sigmoid",
                            batch.to(dev),
                        )
                        tol = reorder_rel(torch.float32)
                        assert torch.allclose(r.conf, conf.cpu(), rtol=tol, atol=tol), where
                        assert torch.equal(before, kcanvas), where
                    cases += 1
    return cases


if __name__ == "__main__":
    print("ok", main(*sys.argv[1:]))
