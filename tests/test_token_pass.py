"""DoViT's stage-end kernels (stop + keep mask, cls merge) against :mod:`dtop.ops.token_pass`'s references.

CPU machines run the kernels through Triton's interpreter (a subprocess, since the interpreter is
chosen when a kernel is defined); CUDA machines run them compiled, with bf16 features as at inference.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_check import kernel_check

pytest.importorskip("triton")


def test_token_pass_kernels_match_reference_in_interpreter():
    assert kernel_check("token_pass", "cpu", "float32") == 21


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_pass_kernels_match_reference_on_cuda():
    assert kernel_check("token_pass", "cuda", "bfloat16") == 21
