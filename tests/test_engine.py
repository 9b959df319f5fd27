"""Invariants of the pruning engine, each against an independent reference."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dtop.models.build import build_segmentor
from dtop.models.heads.fcn import FCNHead
from dtop.models.packed import TokenStream
from dtop.models.policies import DoViT, DToP
from dtop.models.vit import ViTBackbone
from dtop.ops.attention import segment_attention
from dtop.ops.context import topk_per_group
from tests.tolerance import assert_reordered_close, rel_err, reorder_rel

K = 5


def make_model(
    name: str = "vit_tiny_patch16_224", img_size=(48, 64), depth: int = 4, prune=(1, 2), policy=None, **kwargs
):
    torch.manual_seed(0)
    backbone = ViTBackbone(name, img_size=img_size, depth=depth, **kwargs)
    model = build_segmentor(backbone, partial(FCNHead), K, partial(FCNHead), list(prune), policy or DToP(1.0))
    return model.eval()


def dense_reference(model, images: torch.Tensor) -> torch.Tensor:
    """The unpruned model the ordinary way: timm's forward_features, decode head on the patch tokens."""
    vit = model.backbone.vit
    tokens = vit.forward_features(images)[:, vit.num_prefix_tokens :]
    B, N, C = tokens.shape
    head = model.decode_head
    return head.cls(head.conv(head.norm(tokens.reshape(B * N, C)))).view(B, N, -1)


def canvas(out) -> torch.Tensor:
    B, Kc, h, w = out.logits.shape
    return out.logits.permute(0, 2, 3, 1).reshape(B, h * w, Kc)


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("vit_tiny_patch16_224", {}, (48, 64)),
        ("vit_tiny_patch16_224", {"class_token": False}, (48, 64)),
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True}, (32, 80)),
        ("vit_small_patch14_dinov2", {"embed_dim": 96, "num_heads": 2}, (42, 56)),
    ],
)
def test_threshold_one_reproduces_dense_model(name, kwargs, size):
    model = make_model(name, img_size=size, policy=DToP(1.0), **kwargs)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(images)
        ref = dense_reference(model, images)
    assert rel_err(canvas(out), ref) <= reorder_rel(torch.float32)
    assert (out.stats["exits_per_stage"][:, :-1] == 0).all()


@pytest.mark.parametrize(
    "policy",
    [
        DToP(0.25, context="topk", k=1),
        DToP(0.25, context="remove"),
        DToP(0.25, context="average"),
        DToP(0.25, context="avg_topk", k=1),
        DToP(1.0, context="fixed_ratio", ratio=0.4),
        DToP([0.22, 0.3], context="topk", k=2),
        DoViT(0.22),
        DoViT(0.25, diff_conf=0.21),
    ],
)
def test_packed_batch_equals_each_image_alone(policy):
    model = make_model(policy=policy)
    torch.manual_seed(1)
    images = torch.randn(4, 3, 48, 64) * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1, 1)
    with torch.no_grad():
        batched = model(images)
        singles = [model(images[i : i + 1]) for i in range(4)]
    tokens = batched.stats["tokens_per_stage"]
    assert tokens[:, -1].lt(tokens[:, 0]).any(), "the test must really prune"
    for i, single in enumerate(singles):
        assert_reordered_close(batched.logits[i], single.logits[0])
        for key in ("tokens_per_stage", "exits_per_stage", "exits_per_class", "exit_stage"):
            assert torch.equal(batched.stats[key][i], single.stats[key][0]), key
        torch.testing.assert_close(batched.stats["macs"][i], single.stats["macs"][0])


@pytest.mark.parametrize(
    "policy",
    [
        DToP(0.25, context="topk", k=1),
        DToP(0.25, context="average"),
        DToP(0.25, context="avg_topk", k=1),
        DToP(1.0, context="fixed_ratio", ratio=0.4),
        DToP([0.22, 0.3], context="remove"),
    ],
)
def test_token_local_head_grading_the_whole_stream_equals_grading_patches(policy, monkeypatch):
    """An eval FCN head grades the stream with its cls/summary tokens riding along: same decisions."""
    model = make_model(policy=policy, reg_tokens=1)
    images = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        assert model.aux_heads[0].token_local
        local = model(images)
        monkeypatch.setattr(FCNHead, "token_local", property(lambda self: False))
        patches = model(images)
    torch.testing.assert_close(local.logits, patches.logits)
    for key in ("tokens_per_stage", "exits_per_stage", "exit_stage"):
        assert torch.equal(local.stats[key], patches.stats[key]), key
    assert local.stats["tokens_per_stage"][:, -1].lt(local.stats["tokens_per_stage"][:, 0]).all()
    # riding tokens are computed, so counted: 2 prefix tokens (cls + register) per image per aux head,
    # plus the class summaries in the second head for the averaging contexts
    extra = sum(h.macs(torch.tensor([2]))[0] for h in model.aux_heads).double()
    diff = local.stats["macs"] - patches.stats["macs"]
    if policy.context in ("average", "avg_topk"):
        assert (diff > extra).all()
    else:
        torch.testing.assert_close(diff, extra.expand(3))


def test_exited_tokens_cannot_influence_later_layers():
    """Engine ≡ dense blocks whose attention cannot see exited tokens, whatever those tokens hold."""
    model = make_model(prune=(2,), depth=4, policy=DToP(0.24, context="remove"))
    vit = model.backbone.vit
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = model(images)
        exited = out.stats["exit_stage"].view(-1) == 0
        assert 0 < int(exited.sum()) < exited.numel()
        x = model.backbone.embed(images)
        for block in vit.blocks[:2]:
            x = block(x)
        P = vit.num_prefix_tokens
        gone = torch.cat([torch.zeros(P, dtype=torch.bool), exited])
        x = torch.where(gone[None, :, None], torch.randn_like(x) * 100, x)  # perturb after exit
        mask = ~gone[None, None, None, :]
        for block in vit.blocks[2:]:
            x = block(x, attn_mask=mask)
        head = model.decode_head
        ref = head.cls(head.conv(head.norm(vit.norm(x[0, P:]))))
    assert_reordered_close(canvas(out)[0][~exited], ref[~exited])


def test_lower_threshold_computes_fewer_tokens_and_macs():
    model = make_model(policy=DToP(1.0, context="remove"))
    images = torch.randn(2, 3, 48, 64)
    tokens, macs = [], []
    with torch.no_grad():
        for thr in (0.99, 0.5, 0.3, 0.25, 0.22, 0.0):
            model.pruning.set_threshold(thr)
            out = model(images)
            tokens.append(int(out.stats["tokens_per_stage"].sum()))
            macs.append(float(out.stats["macs"].sum()))
    assert tokens == sorted(tokens, reverse=True) and macs == sorted(macs, reverse=True)
    assert tokens[-1] < tokens[0] and macs[-1] < 0.7 * macs[0]


def test_topk_per_group_keeps_min_k_of_each_group():
    torch.manual_seed(0)
    group = torch.randint(0, 6, (200,))
    group[group == 5] = 6  # group 5 empty; 6 = "no group"
    score = torch.rand(200)
    chosen = topk_per_group(group, score, 3, num_groups=6)
    for g in range(6):
        members = group == g
        assert int(chosen[members].sum()) == min(3, int(members.sum()))
        if members.any():
            best = score[members].topk(min(3, int(members.sum()))).values
            assert torch.equal(score[members & chosen].sort(descending=True).values, best)
    assert not chosen[group == 6].any()


def test_topk_context_keeps_min_k_tokens_of_each_exiting_class():
    k = 2
    model = make_model(prune=(2,), policy=DToP(0.22, context="topk", k=k))
    images = torch.randn(3, 3, 48, 64)
    with torch.no_grad():
        out = model(images)
        x = model.backbone.embed(images)
        for block in model.backbone.vit.blocks[:2]:
            x = block(x)
        aux = model.aux_heads[0]
        patches = x[:, model.backbone.num_prefix_tokens :]
        probs = aux(patches.reshape(-1, patches.shape[-1]), None).logits.softmax(-1).view(3, -1, K)
    conf, cls = probs.max(-1)
    easy = conf >= 0.22
    for b in range(3):
        for c in range(K):
            n_c = int((easy[b] & (cls[b] == c)).sum())
            exited = int(((out.stats["exit_stage"][b].view(-1) == 0) & (cls[b] == c)).sum())
            assert exited == n_c - min(k, n_c)
    assert int(out.stats["exits_per_stage"][:, 0].sum()) > 0


def _counted(model, images):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(images)
    counts = counter.get_flop_counts()["Global"]
    attn = sum(v for op, v in counts.items() if "attention" in str(op))
    return out, counter.get_total_flops() / 2, (counter.get_total_flops() - attn) / 2


@pytest.mark.parametrize(
    "policy,batch", [(DToP(1.0), 2), (DToP(0.24, k=1), 1), (DToP(0.24, context="average"), 1), (DoViT(0.23), 1)]
)
def test_analytic_macs_match_flop_counter(policy, batch):
    model = make_model(policy=policy)
    images = torch.randn(batch, 3, 48, 64)
    out, macs, macs_linear = _counted(model, images)
    assert float(out.stats["macs"].sum()) == pytest.approx(macs, rel=1e-9)
    assert float(out.stats["macs_linear"].sum()) == pytest.approx(macs_linear, rel=1e-9)
    if isinstance(policy, DToP) and policy.threshold[0] == 1.0:
        dense, dense_linear, _ = model.dense_macs(48, 64)
        assert dense * batch == pytest.approx(macs, rel=1e-9)
        assert dense_linear * batch == pytest.approx(macs_linear, rel=1e-9)
    else:
        assert float(out.stats["macs"].sum()) < model.dense_macs(48, 64)[0]


def test_input_not_multiple_of_patch_is_padded_and_cropped():
    model = make_model(img_size=(48, 64))
    images = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        scores, out = model.predict(images)
    assert scores.shape == (1, K, 45, 61)
    assert out.logits.shape == (1, K, 3, 4)


def test_segment_attention_padded_path_equals_per_segment_attention():
    torch.manual_seed(0)
    dense = torch.randn(3, 7, 8)
    stream = TokenStream.from_dense(dense, 1).select(torch.rand(21) > 0.4)
    T = stream.x.shape[0]
    q, k, v = (torch.randn(T, 2, 4) for _ in range(3))
    out = segment_attention(q, k, v, stream)
    cu = stream.cu_seqlens.tolist()
    for b in range(3):
        s = slice(cu[b], cu[b + 1])
        ref = F.scaled_dot_product_attention(*(t[s].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        torch.testing.assert_close(out[s], ref)


@pytest.mark.parametrize(
    "bad",
    [
        dict(prune=(2, 2)),
        dict(prune=(3, 1)),
        dict(prune=(0, 2)),
        dict(prune=(1, 4)),
    ],
)
def test_bad_prune_layers_raise(bad):
    with pytest.raises(ValueError, match="prune_layers"):
        make_model(**bad)


@pytest.mark.parametrize("thr", [-0.1, 1.5, [0.9, 2.0]])
def test_bad_threshold_raises(thr):
    with pytest.raises(ValueError, match="threshold"):
        DToP(thr)


def test_head_width_mismatch_raises():
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=(32, 32), depth=2)
    with pytest.raises(ValueError, match="input channels"):
        build_segmentor(backbone, partial(FCNHead, in_channels=384), K, partial(FCNHead), [1], DToP(0.9))


def test_canvas_layout_resize_and_cross_entropy_match_torch():
    """The canvas layout ([B, h, w, K] viewed as [B, K, h, w]) resizes and scores exactly like torch's ops."""
    from dtop.losses import cross_entropy
    from dtop.ops.resize import resize_bilinear

    x = torch.randn(3, 8, 6, 5, requires_grad=True)
    logits = x.permute(0, 3, 1, 2)  # class-last view
    up = resize_bilinear(logits, (24, 20))
    ref = F.interpolate(logits, (24, 20), mode="bilinear", align_corners=False)
    assert_reordered_close(up, ref)
    target = torch.randint(0, 5, (3, 24, 20))
    target[0, :4] = 255
    weight = torch.rand(5) + 0.5
    for w in (None, weight):
        got = torch.autograd.grad(cross_entropy(up, target, 255, w), x, retain_graph=True)[0]
        want = torch.autograd.grad(F.cross_entropy(ref, target, weight=w, ignore_index=255), x, retain_graph=True)[0]
        torch.testing.assert_close(
            cross_entropy(up, target, 255, w), F.cross_entropy(ref, target, weight=w, ignore_index=255)
        )
        assert_reordered_close(got, want)
    assert cross_entropy(up, torch.full_like(target, 255)).item() == 0.0


def test_factored_upsampling_crops_padding_and_feeds_the_loss_like_the_full_map():
    """``upsampled`` (token grid → padded input → crop → label size) equals F.interpolate's chain, and CE
    on the factored map equals CE on the materialised one (the CPU falls back to materialising)."""
    from dtop.losses import cross_entropy
    from dtop.ops.resize import Upsampled

    model = make_model(img_size=(48, 64))
    images = torch.randn(2, 3, 40, 60)  # padded to 48×64 on the patch grid
    out = model(images)
    for size in (None, (20, 33)):
        fac = model.upsampled(out.logits, out, size)
        assert isinstance(fac, Upsampled)
        ref = F.interpolate(out.logits, out.padded_size, mode="bilinear", align_corners=False)[..., :40, :60]
        if size is not None:
            ref = F.interpolate(ref, size, mode="bilinear", align_corners=False)
        assert_reordered_close(fac.dense(), ref)
        assert fac.shape == tuple(ref.shape)
        target = torch.randint(0, K, (2, *ref.shape[-2:]))
        target[0, :3] = 255
        got = torch.autograd.grad(cross_entropy(fac, target), out.logits, retain_graph=True)[0]
        want = torch.autograd.grad(F.cross_entropy(ref, target, ignore_index=255), out.logits, retain_graph=True)[0]
        assert_reordered_close(got, want)
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy(model.upsampled(out.logits, out), torch.zeros(2, 41, 60, dtype=torch.long))
