"""The fused pixel cross-entropy kernels (plain and upsampling) against ``F.cross_entropy``: loss and gradient,
ignore pixels, class weights, and a NaN for labels out of range."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from dtop.kernels.cross_entropy import pixel_cross_entropy_sum, upsampled_cross_entropy_sum
from dtop.ops.resize import resize_operator
from tests.tolerance import reorder_rel


def check(device: str, dtype: torch.dtype, tol: float) -> int:
    g, cases = torch.Generator().manual_seed(0), 0
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
        cases += 1
    x = torch.randn(1, 4, 2, 2, device=device, dtype=dtype)
    t = torch.tensor([[[0, 1], [4, 255]]], device=device)  # 4 is out of range for K = 4
    assert math.isnan(float(pixel_cross_entropy_sum(x, t)))
    t = torch.full((1, 2, 2), 255, device=device)
    assert float(pixel_cross_entropy_sum(x, t)) == 0.0
    return cases + 1


def check_upsampled(device: str, dtype: torch.dtype, tol: float) -> int:
    g, cases = torch.Generator().manual_seed(0), 0
    dev = torch.device(device)
    # source width 7 (padded to a 16-wide tile) and 20 (32); 150 columns: two pixel blocks, the last ragged
    for K, (h, w), (H, W), weighted in [
        (5, (3, 7), (21, 40), False),
        (70, (4, 20), (9, 150), False),
        (70, (4, 20), (9, 150), True),
    ]:
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
        cases += 1
    a = torch.randn(1, 4, 2, 16, device=device, dtype=dtype)
    cols = resize_operator(16, 32, 32, None, dev)
    t = torch.randint(0, 4, (1, 2, 32), device=device)
    t[0, 1, 3] = 4  # out of range for K = 4
    assert math.isnan(float(upsampled_cross_entropy_sum(a, cols, t)))
    assert float(upsampled_cross_entropy_sum(a, cols, torch.full_like(t, 255))) == 0.0
    return cases + 1


def main(device: str, dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    tol = 2e-2 if dtype != torch.float32 else reorder_rel(dtype)  # 16-bit maps: their rounding
    return check(device, dtype, tol) + check_upsampled(device, dtype, tol)


if __name__ == "__main__":
    print("ok", main(*sys.argv[1:]))
