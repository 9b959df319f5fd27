"""The fused grading kernel of a DToP stage end against :func:`~dtop.ops.grade.grade_reference`.

CPU machines run the kernel through Triton's interpreter (a subprocess, since the interpreter is
chosen when the kernel is defined); CUDA machines run it compiled, with bf16 logits as at inference.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_check import kernel_check

pytest.importorskip("triton")


def test_grade_kernel_matches_reference_in_interpreter():
    assert kernel_check("grade", "cpu", "float32") == 24


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grade_kernel_matches_reference_on_cuda():
    assert kernel_check("grade", "cuda", "bfloat16") == 24
