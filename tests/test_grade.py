"""The fused grading kernel of a DToP stage end against :func:`~dtop.models.policies.grade_reference`.

CPU machines run the kernel through Triton's interpreter (a subprocess, since the interpreter is
chosen when the kernel is defined); CUDA machines run it compiled, with bf16 logits as at inference.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from tests.kernel_check import kernel_check

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import sys, torch
    from dtop.kernels.grade import grade
    from dtop.models.heads.base import HeadOutput, SegHead
    from dtop.models.packed import TokenStream
    from dtop.models.policies import RunState, grade_reference

    dev, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    g = torch.Generator().manual_seed(0)
    N, S, cases = 20, 3, 0

    class Head(SegHead):
        def __init__(self, rule):
            super().__init__()
            self.grading = rule

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
                    outs = []
                    for run in ("reference", "kernel"):
                        state = RunState(batch_size=B, grid=(4, 5), num_classes=K, num_stages=S,
                                         canvas=torch.zeros(B * N + 1, K), exit_stage=torch.full((B * N + 1,), S - 1),
                                         lengths=torch.zeros(B, S, dtype=torch.int32), keep_stages=False, phantom=True)
                        if run == "reference":
                            r = grade_reference(HeadOutput(logits, presence), Head(rule), ps, state, 1, thr, mask, final)
                            r = (r.conf, r.cls, r.easy, r.keep)
                        else:
                            state.canvas, state.exit_stage = state.canvas.to(dev), state.exit_stage.to(dev)
                            r = grade(logits.to(dev), None if presence is None else presence.to(dev), rule == "sigmoid",
                                      batch.to(dev), pos.to(dev), N, state.canvas, state.exit_stage, 1, thr,
                                      None if mask is None else mask.to(dev), final)
                            r = tuple(None if t is None else t.cpu() for t in r)
                        outs.append((r, state.canvas[:-1].cpu(), state.exit_stage.cpu()))
                    (conf, cls, easy, keep), canvas, exit_stage = outs[0]
                    (kconf, kcls, keasy, kkeep), kcanvas, kexit = outs[1]
                    where = (K, rule, with_presence, with_mask, final)
                    assert torch.allclose(conf, kconf, rtol=1e-5, atol=1e-6), where
                    assert torch.equal(cls, kcls) and torch.equal(easy, keasy), where
                    assert (keep is None) == (kkeep is None) and (keep is None or torch.equal(keep, kkeep)), where
                    assert torch.equal(canvas, kcanvas) and torch.equal(exit_stage, kexit), where
                    assert easy.any() and not easy.all() and not easy[pos < 0].any(), where  # a real test
                    assert final == bool((exit_stage == 1).any()), where
                    cases += 1
    print("ok", cases)
""")


def test_grade_kernel_matches_reference_in_interpreter():
    assert kernel_check(CHECK, "cpu", "float32").startswith("ok 24")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grade_kernel_matches_reference_on_cuda():
    assert kernel_check(CHECK, "cuda", "bfloat16").startswith("ok 24")
