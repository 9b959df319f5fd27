"""The fused Triton pixel cross-entropy (plain and upsampling) against ``F.cross_entropy``: loss and gradient.

CPU machines run the kernels through Triton's interpreter (a subprocess, since the interpreter is
chosen when the kernels are defined); CUDA machines run them compiled, in bf16 as in training.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_check import kernel_check

triton = pytest.importorskip("triton")


def test_kernels_match_reference_in_interpreter():
    assert kernel_check("cross_entropy", "cpu", "float32") == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_match_reference_on_cuda(dtype):
    assert kernel_check("cross_entropy", "cuda", dtype) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_factored_map_takes_the_upsampling_kernel_on_cuda_under_autocast(monkeypatch):
    from dtop.kernels import cross_entropy as kernels
    from dtop.losses import cross_entropy
    from dtop.ops.resize import Upsampled, resize_operator

    g = torch.Generator().manual_seed(2)
    low = torch.randn(2, 150, 32, 32, generator=g).cuda().requires_grad_()
    t = torch.randint(0, 150, (2, 512, 512), generator=g).cuda()
    t[:, :5] = 255
    op = resize_operator(32, 512, 512, None, low.device)
    calls = []
    fused = kernels.upsampled_cross_entropy_sum
    monkeypatch.setattr(kernels, "upsampled_cross_entropy_sum", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cross_entropy(Upsampled(low, op, op), t)
    loss.backward()
    ref_low = low.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.interpolate(ref_low, size=(512, 512), mode="bilinear"), t, ignore_index=255)
    ref.backward()
    assert calls == [1]
    assert float(loss) == pytest.approx(float(ref), rel=1e-3)
    assert torch.allclose(low.grad, ref_low.grad, atol=2e-2 * float(ref_low.grad.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cross_entropy_takes_the_kernel_on_cuda_under_autocast():
    from dtop.losses import cross_entropy

    g = torch.Generator().manual_seed(1)
    low = torch.randn(2, 150, 8, 8, generator=g).cuda().requires_grad_()
    t = torch.randint(0, 150, (2, 64, 64), generator=g).cuda()
    t[:, :5] = 255
    with torch.autocast("cuda", dtype=torch.bfloat16):
        up = F.interpolate(low, size=(64, 64), mode="bilinear").to(torch.bfloat16)
        loss = cross_entropy(up, t)
    loss.backward()
    ref_low = low.detach().clone().requires_grad_()
    ref_up = F.interpolate(ref_low, size=(64, 64), mode="bilinear").to(torch.bfloat16).float()
    ref = F.cross_entropy(ref_up, t, ignore_index=255)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-4)
    assert torch.allclose(low.grad, ref_low.grad, atol=2e-2 * float(ref_low.grad.abs().max()))
