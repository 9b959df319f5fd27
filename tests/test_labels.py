"""The fused upsample + argmax kernel and :meth:`Segmentor.labels`.

The kernel runs under Triton's interpreter on CPU machines (a subprocess: the interpreter is chosen
when the kernel is defined) and compiled on CUDA ones, against ``scores(upsampled).argmax(1)``.
"""

from __future__ import annotations

import pytest
import torch

from dtop.ops.resize import RUN, resize_operator, resize_taps
from tests.kernel_check import kernel_check
from tests.test_engine import K, make_model


def test_label_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    assert kernel_check("labels", "cpu", "float32") == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_label_kernel_matches_reference_on_cuda():
    assert kernel_check("labels", "cuda", "bfloat16") == 12


@pytest.mark.parametrize(
    "chain", [(32, 512, 512, None), (32, 512, 500, None), (8, 8, 8, None), (3, 3, 3, 23), (5, 80, 77, None)]
)
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
