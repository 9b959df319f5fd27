"""The fused upsample + argmax kernel and :meth:`Segmentor.labels`.

The kernel runs under Triton's interpreter on CPU machines (a subprocess: the interpreter is chosen
when the kernel is defined) and compiled on CUDA ones, against ``scores(upsampled).argmax(1)``.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from dtop.models.resize import RUN, resize_operator, resize_taps
from tests.kernel_check import kernel_check
from tests.test_engine import K, make_model

CHECK = textwrap.dedent("""
    import sys, torch
    from dtop.kernels.labels import upsampled_argmax
    from dtop.models.heads.base import SegHead
    from dtop.models.resize import Upsampled, resize_operator, resize_taps

    dev, dtype = torch.device(sys.argv[1]), getattr(torch, sys.argv[2])
    g = torch.Generator().manual_seed(0)
    cpu, cases = torch.device("cpu"), 0
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
            ops = [resize_operator(n, p, c, None, cpu) for n, p, c in ((rn, rp, rc), (cn, cp, cc))]
            scores = head.scores(Upsampled(logits.float(), *ops).dense(), presence)
            taps = [resize_taps(n, p, c, None, dev) for n, p, c in ((rn, rp, rc), (cn, cp, cc))]
            got = upsampled_argmax(logits.to(dev), None if presence is None else presence.to(dev),
                                   rule == "sigmoid", *taps).cpu()
            where = (K, rule, with_presence, rn, rp, rc, cn, cp, cc)
            assert got.shape == (B, rc, cc) and got.dtype == torch.long, where
            top = scores.max(1).values
            picked = scores.gather(1, got[:, None]).squeeze(1)
            assert bool((picked >= top - 1e-5 * (1 + top.abs())).all()), where  # a top class, up to rounding
            want = scores.argmax(1)
            assert (got != want).float().mean() < 1e-3, where  # differences only at ties
            assert want.unique().numel() > 2, where  # a real test: several classes win
            cases += 1
    print("ok", cases)
""")


def test_label_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    assert kernel_check(CHECK, "cpu", "float32").startswith("ok 12")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_label_kernel_matches_reference_on_cuda():
    assert kernel_check(CHECK, "cuda", "bfloat16").startswith("ok 12")


@pytest.mark.parametrize("chain", [(32, 512, 512, None), (32, 512, 500, None), (8, 8, 8, None), (3, 3, 3, 23),
                                   (5, 80, 77, None)])
def test_taps_reproduce_the_resize_operator(chain):
    cpu = torch.device("cpu")
    op, taps = resize_operator(*chain, cpu), resize_taps(*chain, cpu)
    op = torch.eye(chain[0]) if op is None else op
    rebuilt = torch.zeros_like(op)
    for first, second, start, count in taps.runs.tolist():
        assert 1 <= count <= RUN
        rows = torch.arange(start, start + count)
        rebuilt[rows, first] += taps.weights[rows, 0]
        rebuilt[rows, second] += taps.weights[rows, 1]
    assert torch.equal(rebuilt, op)
    assert int(taps.runs[:, 3].sum()) == op.shape[0]


def test_taps_refuse_a_second_resize():
    assert resize_taps(32, 512, 500, 300, torch.device("cpu")) is None


def test_segment_gives_the_argmax_of_predict():
    model = make_model(img_size=(48, 64))
    images = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        labels, _ = model.segment(images)
        scores, _ = model.predict(images)
        resized, _ = model.segment(images, (30, 40))
    assert labels.shape == (2, 45, 61) and torch.equal(labels, scores.argmax(1))
    assert resized.shape == (2, 30, 40) and int(resized.max()) < K


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segment_takes_the_label_kernel_on_cuda(monkeypatch):
    import dtop.kernels.labels as kernel

    calls = []
    real = kernel.upsampled_argmax
    monkeypatch.setattr(kernel, "upsampled_argmax", lambda *a: calls.append(1) or real(*a))
    model = make_model(img_size=(48, 64)).cuda()
    images = torch.randn(2, 3, 45, 61, device="cuda")
    with torch.no_grad():
        labels, _ = model.segment(images)
        scores, _ = model.predict(images)
        model.segment(images, (30, 40))  # a second resize: PyTorch
    assert calls == [1]
    top = scores.max(1).values
    assert bool((scores.gather(1, labels[:, None]).squeeze(1) >= top - 1e-5 * (1 + top.abs())).all())
