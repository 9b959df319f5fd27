"""The top-k context kernel of a DToP stage end against :func:`~dtop.ops.context.topk_context_reference`.

CPU machines run the kernel through Triton's interpreter (a subprocess, since the interpreter is
chosen when the kernel is defined); CUDA machines run it compiled.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_check import kernel_check

triton = pytest.importorskip("triton")


def test_context_kernel_matches_reference_in_interpreter():
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8):  # 3.5 fails, 3.8 runs it
        pytest.skip("this Triton's interpreter cannot loop up to a loaded scalar (the CUDA test covers the kernel)")
    assert kernel_check("context", "cpu") == 180


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_context_kernel_matches_reference_on_cuda():
    assert kernel_check("context", "cuda") == 180


def test_kernels_can_be_switched_off(monkeypatch):
    from dtop.kernels import load

    monkeypatch.setenv("DTOP_KERNELS", "0")
    assert load("context") is None
    monkeypatch.delenv("DTOP_KERNELS")
    assert load("context") is not None
