"""The fused Triton pixel cross-entropy (plain and upsampling) against ``F.cross_entropy``: loss and gradient.

CPU machines run the kernels through Triton's interpreter (a subprocess, since the interpreter is
chosen when the kernels are defined); CUDA machines run them compiled, in bf16 as in training.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_check import kernel_check

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import math, sys, torch, torch.nn.functional as F
    from dtop.kernels.cross_entropy import pixel_cross_entropy_sum

    def check(device, dtype, tol):
        g = torch.Generator().manual_seed(0)
        # K=5 (one class block), K=70 (several class blocks, the last ragged); 129 pixels: a ragged pixel block
        for K, weighted in [(5, False), (70, False), (70, True)]:
            x = (3 * torch.randn(2, K, 3, 43, generator=g)).to(device=device, dtype=dtype).requires_grad_()
            t = torch.randint(0, K, (2, 3, 43), generator=g)
            t[0, 0, :7] = 255
            t = t.to(device)
            w = (torch.rand(K, generator=g) + 0.5).to(device) if weighted else None
            loss = pixel_cross_entropy_sum(x, t, w, 255)
            (loss * 0.5).backward()
            ref_x = x.detach().float().requires_grad_()
            ref = F.cross_entropy(ref_x, t, weight=w, ignore_index=255, reduction="sum")
            (ref * 0.5).backward()
            assert math.isclose(float(loss), float(ref), rel_tol=tol), (K, float(loss), float(ref))
            err = (x.grad.float() - ref_x.grad).abs().max()
            assert err <= tol * ref_x.grad.abs().max(), (K, float(err))
            assert x.grad.dtype == dtype
        x = torch.randn(1, 4, 2, 2, device=device, dtype=dtype)
        t = torch.tensor([[[0, 1], [4, 255]]], device=device)  # 4 is out of range for K = 4
        assert math.isnan(float(pixel_cross_entropy_sum(x, t)))
        t = torch.full((1, 2, 2), 255, device=device)
        assert float(pixel_cross_entropy_sum(x, t)) == 0.0

    def check_upsampled(device, dtype, tol):
        from dtop.kernels.cross_entropy import upsampled_cross_entropy_sum
        from dtop.models.resize import resize_operator

        g = torch.Generator().manual_seed(0)
        dev = torch.device(device)
        # source width 7 (padded to a 16-wide tile) and 20 (32); 150 columns: two pixel blocks, the last ragged
        for K, (h, w), (H, W), weighted in [(5, (3, 7), (21, 40), False), (70, (4, 20), (9, 150), False),
                                            (70, (4, 20), (9, 150), True)]:
            low = (3 * torch.randn(2, K, h, w, generator=g)).to(device=device, dtype=dtype).requires_grad_()
            rows = resize_operator(h, H, H, None, dev)
            cols = resize_operator(w, W + 8, W, None, dev)  # resized to a padded width, then cropped
            t = torch.randint(0, K, (2, H, W), generator=g)
            t[0, 0, :7] = 255
            t = t.to(device)
            wt = (torch.rand(K, generator=g) + 0.5).to(device) if weighted else None
            loss = upsampled_cross_entropy_sum(torch.matmul(rows.to(dtype), low), cols, t, wt, 255)
            (loss * 0.5).backward()
            ref_low = low.detach().float().requires_grad_()
            ref = F.cross_entropy(rows @ ref_low @ cols.T, t, weight=wt, ignore_index=255, reduction="sum")
            (ref * 0.5).backward()
            assert math.isclose(float(loss), float(ref), rel_tol=tol), (K, float(loss), float(ref))
            err = (low.grad.float() - ref_low.grad).abs().max()
            assert err <= tol * ref_low.grad.abs().max(), (K, float(err))
        a = torch.randn(1, 4, 2, 16, device=device, dtype=dtype)
        cols = resize_operator(16, 32, 32, None, dev)
        t = torch.randint(0, 4, (1, 2, 32), device=device)
        t[0, 1, 3] = 4  # out of range for K = 4
        assert math.isnan(float(upsampled_cross_entropy_sum(a, cols, t)))
        assert float(upsampled_cross_entropy_sum(a, cols, torch.full_like(t, 255))) == 0.0

    check(sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3]))
    check_upsampled(sys.argv[1], getattr(torch, sys.argv[2]), float(sys.argv[3]))
    print("ok")
""")


def test_kernels_match_reference_in_interpreter():
    assert kernel_check(CHECK, "cpu", "float32", "1e-5").strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [("float32", "1e-5"), ("bfloat16", "2e-2")])
def test_kernels_match_reference_on_cuda(dtype, tol):
    assert kernel_check(CHECK, "cuda", dtype, tol).strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_factored_map_takes_the_upsampling_kernel_on_cuda_under_autocast(monkeypatch):
    from dtop.kernels import cross_entropy as kernels
    from dtop.losses import cross_entropy
    from dtop.models.resize import Upsampled, resize_operator

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
