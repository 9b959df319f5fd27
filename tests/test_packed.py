"""TokenStream bookkeeping (select / plan / patches) against a per-image reference written with loops."""

from __future__ import annotations

import pytest
import torch

from dtop.models.packed import Extra, TokenStream
from tests.kernel_check import kernel_check


def _stream(lengths: list[int], prefix: int, phantom: int = 0, seed: int = 0) -> TokenStream:
    """Images of the given lengths (first ``prefix`` tokens of each are non-patch), plus ``phantom`` padding tokens."""
    g = torch.Generator().manual_seed(seed)
    batch, pos = [], []
    for b, n in enumerate(lengths):
        batch += [b] * n
        pos += [-1] * min(prefix, n) + torch.randperm(50, generator=g)[: max(n - prefix, 0)].tolist()
    batch += [len(lengths)] * phantom
    pos += list(range(phantom))
    T = len(batch)
    cu = torch.tensor([0] + lengths).cumsum(0)
    if phantom:
        cu = torch.cat([cu, torch.tensor([T])])
    n_special = sum(min(prefix, n) for n in lengths)
    return TokenStream(
        torch.randn(T, 4, generator=g),
        torch.tensor(batch),
        torch.tensor(pos),
        cu.to(torch.int32),
        max(lengths + [phantom]),
        len(lengths) + bool(phantom),
        n_special,
        False,
        bool(phantom),
    )


def _reference(stream: TokenStream, keep: torch.Tensor, extra: Extra | None):
    """Per image: its kept tokens in order, then its kept extra tokens in order (real images only)."""
    xs, batch, pos, lengths = [], [], [], []
    for b in range(stream.num_images):
        sel = (stream.batch == b) & keep
        n = int(sel.sum())
        xs.append(stream.x[sel])
        batch += [b] * n
        pos += stream.pos[sel].tolist()
        if extra is not None:
            esel = (extra.batch == b) & extra.keep
            xs.append(extra.x[esel])
            batch += [b] * int(esel.sum())
            pos += [-1] * int(esel.sum())
            n += int(esel.sum())
        lengths.append(n)
    return torch.cat(xs), torch.tensor(batch), torch.tensor(pos), torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("phantom", [0, 5])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_select_matches_per_image_reference(phantom, with_extra, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (4,), generator=g).tolist()
    lengths[seed % 4] = 1  # an image left with its prefix token only
    stream = _stream(lengths, prefix=1, phantom=phantom, seed=seed)
    keep = torch.rand(stream.x.shape[0], generator=g) > 0.4
    extra = None
    if with_extra:
        K = 3
        G = stream.batch_size * K  # a phantom image's summaries too, as DToP makes them
        extra = Extra(torch.randn(G, 4, generator=g), torch.arange(G) // K, torch.rand(G, generator=g) > 0.5)
    out = stream.select(keep, extra)
    x, batch, pos, cu = _reference(stream, keep, extra)
    torch.testing.assert_close(out.x, x)
    assert torch.equal(out.batch, batch) and torch.equal(out.pos, pos)
    assert out.cu_seqlens.tolist() == cu.tolist() and out.batch_size == len(lengths) and not out.phantom
    counts = cu[1:] - cu[:-1]
    assert out.max_len == int(counts.max()) and out.uniform == bool(counts.min() == counts.max())
    assert out.num_special == int((pos < 0).sum())
    _, order, pbatch, ppos, _, stats = stream.plan(keep, extra, num_patches=7)
    assert sorted(order.tolist()) == list(range(order.numel()))  # a permutation of all candidates
    assert stats.tolist() == [x.shape[0], int(counts.max()), int(counts.min()), int((pos < 0).sum())]
    n = x.shape[0]  # past the kept ones: the phantom image at positions cycling over the grid
    assert torch.equal(pbatch[:n], batch) and torch.equal(ppos[:n], pos)
    assert (pbatch[n:] == len(lengths)).all() and ppos[n:].tolist() == [i % 7 for i in range(n, order.numel())]


@pytest.mark.parametrize("phantom", [0, 6])
def test_patches_lists_each_images_patch_tokens_in_order(phantom):
    stream = _stream([5, 1, 7], prefix=2, phantom=phantom, seed=3)
    idx, ps = stream.patches()
    for b in range(3):
        sel = (stream.batch == b) & (stream.pos >= 0)
        seg = slice(int(ps.cu_seqlens[b]), int(ps.cu_seqlens[b + 1]))
        torch.testing.assert_close(ps.x[seg], stream.x[sel])
        assert ps.pos[seg].tolist() == stream.pos[sel].tolist() and (ps.batch[seg] == b).all()
    if phantom:  # every token once; non-patch tokens join the phantom image, whose segment ends the stream
        assert sorted(idx.tolist()) == list(range(stream.x.shape[0])) and ps.phantom
        assert int(ps.cu_seqlens[-1]) == stream.x.shape[0] and (ps.batch[int(ps.cu_seqlens[3]) :] == 3).all()
        assert (ps.pos >= 0).all()
    else:
        assert ps.x.shape[0] == int((stream.pos >= 0).sum()) and ps.num_special == 0
        assert ps.max_len == 5 and not ps.uniform


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_flash_gradients_match_per_image_attention():
    """Training through flash varlen: outputs and q/k/v gradients equal per-image SDPA (bf16 tolerance)."""
    import torch.nn.functional as F

    from dtop.ops.attention import segment_attention

    lengths, H, D = [37, 5, 64, 1], 3, 64
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).cuda()
    batch = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    stream = TokenStream(
        torch.empty(T, 1, device="cuda"), batch, torch.zeros_like(batch), cu, max(lengths), len(lengths), 0, False
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, D, generator=g).cuda().bfloat16().requires_grad_() for _ in range(3))
    w = torch.randn(T, H, D, generator=g).cuda()
    (segment_attention(q, k, v, stream).float() * w).sum().backward()
    ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (ref_q, ref_k, ref_v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    (torch.cat(outs) * w).sum().backward()
    for got, ref in ((q.grad, ref_q.grad), (k.grad, ref_k.grad), (v.grad, ref_v.grad)):
        assert (got.float() - ref).abs().max() <= 3e-2 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pruned_equal_segments_avoid_sdpa_on_cuda(monkeypatch):
    """A stream pruning shaped (equal lengths after select) takes flash varlen, never SDPA (cuDNN re-plans per
    length)."""
    import torch.nn.functional as F

    from dtop.ops.attention import segment_attention

    dense = TokenStream.from_dense(torch.randn(2, 10, 64, device="cuda", dtype=torch.bfloat16), 1)
    keep = torch.ones(20, dtype=torch.bool, device="cuda")
    keep[[3, 15]] = False
    pruned = dense.select(keep)
    assert pruned.uniform and not pruned.fixed and dense.fixed
    q, k, v = (torch.randn(18, 2, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expected = segment_attention(q, k, v, TokenStream.from_dense(torch.zeros(2, 9, 1, device="cuda"), 0))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("SDPA on a pruned stream"))
    got = segment_attention(q, k, v, pruned)
    assert torch.allclose(got.float(), expected.float(), atol=2e-2)


def test_partition_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    assert kernel_check("partition", "cpu") == 72


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_partition_kernel_matches_reference_on_cuda():
    assert kernel_check("partition", "cuda") == 72


def test_attention_kernel_matches_reference_in_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):  # seen failing on 3.6; 3.9 runs it
        pytest.skip("this Triton's interpreter cannot loop up to a loaded scalar (the CUDA test covers the kernel)")
    assert kernel_check("attention", "cpu", "float32") == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_kernel_matches_reference_on_cuda():
    assert kernel_check("attention", "cuda", "bfloat16") == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pruned_inference_attention_takes_the_triton_kernel(monkeypatch):
    import dtop.kernels.attention as kernel
    from dtop.ops import attention

    calls = []
    real = kernel.varlen_attention
    monkeypatch.setattr(kernel, "varlen_attention", lambda *a: calls.append(1) or real(*a))
    T, H, D = 300, 4, 64
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    batch = torch.cat([torch.zeros(100), torch.ones(200)]).long().cuda()
    stream = TokenStream(torch.zeros(T, 1, device="cuda"), batch, batch * 0, cu, 200, 2, 0, False)
    q, k, v = torch.randn(T, 3, H, D, device="cuda", dtype=torch.bfloat16).unbind(1)
    with torch.no_grad():
        got = attention.segment_attention(q, k, v, stream)
    want = attention._flash_forward(q, k, v, cu, 200)[0]
    assert calls == [1]
    assert (got.float() - want.float()).abs().max() <= 2e-2
