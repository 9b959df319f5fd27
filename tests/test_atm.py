"""ATM head: shapes on packed streams, losses, dense equivalence at ξ = 1, packed ≡ per image, frozen
canvas of exited tokens, analytic MACs vs FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dtop.losses import dice_loss, presence_loss, sigmoid_focal_loss
from dtop.models.engine import Segmentor
from dtop.models.heads.atm import ATMHead
from dtop.models.packed import TokenStream
from dtop.models.policies import DToP
from dtop.models.vit import ViTBackbone
from tests.tolerance import assert_reordered_close, reorder_rel

K = 5


def _lively(head: ATMHead, seed: int) -> ATMHead:
    """Re-initialise with PyTorch's default (larger) weights so logits are spread, not all ≈ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
    return head.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.fixture(scope="module")
def backbone() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone("vit_tiny_patch16_224", img_size=(64, 96), depth=4).eval()


def _segmentor(backbone: ViTBackbone, policy: DToP) -> Segmentor:
    C = backbone.embed_dim
    heads = [_lively(ATMHead(C, K, num_layers=2), seed) for seed in range(3)]
    return Segmentor(backbone, heads[0], heads[1:], [2, 3], policy).eval()


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 96, generator=g)
    return x


def _packed_stream(C: int, lengths: list[int], seed: int = 0) -> TokenStream:
    """A packed stream with unequal segments, built by dropping tokens of a dense one."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    dense = TokenStream.from_dense(torch.randn(len(lengths), L, C, generator=g), 0)
    keep = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keep[b, torch.randperm(L, generator=g)[:n]] = True
    return dense.select(keep.view(-1))


# --- shapes and per-image cross-attention -------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 3, 19])
@pytest.mark.parametrize("lengths", [[12, 12], [7, 1, 15], [5]])
def test_shapes_and_packed_equals_per_image(num_classes: int, lengths: list[int]) -> None:
    C = 64
    head = _lively(ATMHead(C, num_classes, num_layers=2), 3)
    assert (head.dim, head.num_heads) == (32, 1)
    stream = _packed_stream(C, lengths)
    out = head(stream.x, stream)
    T, B = sum(lengths), len(lengths)
    assert out.logits.shape == (T, num_classes) and out.presence.shape == (B, num_classes)
    probs = head.token_probs(out, stream)
    assert probs.shape == (T, num_classes) and bool(((probs >= 0) & (probs <= 1)).all())
    # every image alone (the uniform, unpadded path) gives the same numbers
    for b in range(B):
        sel = stream.batch == b
        single = TokenStream.from_dense(stream.x[sel][None], 0)
        ref = head(single.x, single)
        assert_reordered_close(out.logits[sel], ref.logits)
        assert_reordered_close(out.presence[b], ref.presence[0])
    layers = head.forward_layers(stream.x, stream)
    assert len(layers) == 2 and torch.equal(layers[-1].logits, out.logits)


def test_default_width_and_heads() -> None:
    head = ATMHead(768, 150, num_layers=1)
    assert (head.dim, head.num_heads) == (384, 6)
    head = ATMHead(1024, 150, num_layers=1)
    assert (head.dim, head.num_heads, head.in_channels, head.num_classes) == (512, 8, 1024, 150)


def test_image_without_tokens_stays_finite() -> None:
    C = 64
    head = _lively(ATMHead(C, 4), 4)
    dense = TokenStream.from_dense(torch.randn(2, 6, C), 0)
    keep = torch.tensor([True] * 6 + [False] * 6)
    stream = dense.select(keep)
    out = head(stream.x, stream)
    assert out.logits.shape == (6, 4) and bool(torch.isfinite(out.presence).all())


def test_scores() -> None:
    head = ATMHead(64, 3)
    logits, presence = torch.randn(2, 3, 4, 5), torch.randn(2, 3)
    expect = presence.sigmoid()[:, :, None, None] * logits.sigmoid()
    torch.testing.assert_close(head.scores(logits, presence), expect)


# --- losses ----------------------------------------------------------------------------------


def _target(seed: int = 0, classes: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, (2, 16, 20), generator=g)
    t[:, :3] = 255
    return t


def test_perfect_prediction_has_near_zero_loss() -> None:
    head = ATMHead(64, 4)
    target = _target(classes=3)
    onehot = torch.stack([target == c for c in range(4)], 1)
    logits = torch.where(onehot, 20.0, -20.0).requires_grad_()
    present = onehot.flatten(2).any(-1)
    presence = torch.where(present, 20.0, -20.0)
    loss = head.loss(logits, presence, target)
    assert set(loss) == {"presence", "focal", "dice"}
    assert all(float(v.detach()) < 1e-6 for v in loss.values()), loss
    sum(loss.values()).backward()
    assert logits.grad is not None
    # a wrong prediction is clearly penalised
    bad = head.loss(-logits.detach(), -presence, target)
    assert all(float(v) > 0.1 for v in bad.values()), bad


def test_absent_class_only_through_presence() -> None:
    head = ATMHead(64, 4)
    target = _target(classes=2)  # classes 2 and 3 are absent
    g = torch.Generator().manual_seed(5)
    logits, presence = torch.randn(2, 4, 16, 20, generator=g), torch.randn(2, 4, generator=g)
    base = head.loss(logits, presence, target)
    logits2 = logits.clone()
    logits2[:, 2:] = torch.randn(2, 2, 16, 20, generator=g) * 10
    logits2[:, :, :3] = 99.0  # ignored pixels do not count either
    moved = head.loss(logits2, presence, target)
    for key in ("focal", "dice", "presence"):
        torch.testing.assert_close(moved[key], base[key], rtol=0, atol=0)
    presence2 = presence.clone()
    presence2[:, 3] += 5.0
    assert float(head.loss(logits, presence2, target)["presence"]) != float(base["presence"])


def test_loss_normalisation_by_hand() -> None:
    x = torch.tensor([[2.0, -1.0, 0.5]])
    t = torch.tensor([[True, False, False]])
    bce = nn.functional.binary_cross_entropy_with_logits(x, t.float(), reduction="none")[0]
    expect = (bce[0] + 0.1 * bce[1] + 0.1 * bce[2]) / 1.2
    torch.testing.assert_close(presence_loss(x, t, 0.1), expect)
    # focal: mean over valid pixels; dice: over valid pixels
    m = torch.tensor([[3.0, -2.0, 50.0]])
    tm = torch.tensor([[1.0, 0.0, 0.0]])
    v = torch.tensor([[True, True, False]])
    p = m.sigmoid()[0, :2]
    ce = nn.functional.binary_cross_entropy_with_logits(m[0, :2], tm[0, :2], reduction="none")
    pt = torch.tensor([p[0], 1 - p[1]])
    fl = torch.tensor([0.25, 0.75]) * ce * (1 - pt) ** 2
    torch.testing.assert_close(sigmoid_focal_loss(m, tm, v), fl.mean()[None])
    torch.testing.assert_close(dice_loss(m, tm, v), 1 - (2 * p[0] + 1) / (p.sum() + 1 + 1)[None])
    # the head: weights 20 / 1 and DETR's "divide by the number of present masks"
    head = ATMHead(64, 3)
    target = torch.tensor([[[0, 0], [1, 255]]])
    logits = torch.randn(1, 3, 2, 2)
    loss = head.loss(logits, torch.zeros(1, 3), target)
    masks = logits.flatten(2)[0, :2]
    tgt = torch.stack([target.flatten() == 0, target.flatten() == 1])
    valid = (target.flatten() != 255).expand(2, -1)
    torch.testing.assert_close(loss["focal"], 20 * sigmoid_focal_loss(masks, tgt, valid).mean())
    torch.testing.assert_close(loss["dice"], dice_loss(masks, tgt, valid).mean())


def test_loss_without_labels_is_zero() -> None:
    head = ATMHead(64, 3)
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = head.loss(logits, torch.zeros(1, 3), torch.full((1, 4, 4), 255))
    assert float(loss["focal"].detach()) == 0.0 and float(loss["dice"].detach()) == 0.0
    sum(loss.values()).backward()


# --- in the segmentor ------------------------------------------------------------------------


def test_xi_one_equals_dense(backbone: ViTBackbone) -> None:
    model = _segmentor(backbone, DToP(1.0))
    x = _images()
    P = backbone.num_prefix_tokens
    with torch.no_grad():
        out = model(x)
        stage_logits = model.train()(x).stage_logits  # inference at ξ = 1 skips aux heads; training runs them
        model.eval()
        feats = backbone.vit.forward_features(x)
        mid = backbone.embed(x)
        for blk in backbone.blocks[:2]:
            mid = blk(mid)
        for b in range(x.shape[0]):
            final = TokenStream.from_dense(feats[b : b + 1, P:], 0)
            ref = model.decode_head(final.x, final)
            assert _rel(out.logits[b].flatten(1).T, ref.logits) <= reorder_rel(torch.float32)
            assert _rel(out.presence[b], ref.presence[0]) <= reorder_rel(torch.float32)
            aux = TokenStream.from_dense(mid[b : b + 1, P:], 0)
            ref0 = model.aux_heads[0](aux.x, aux)
            assert _rel(stage_logits[0][b].flatten(1).T, ref0.logits) <= reorder_rel(torch.float32)
    assert bool((out.stats["exit_stage"] == 2).all())


def _pruned(backbone: ViTBackbone) -> tuple[Segmentor, torch.Tensor]:
    """A model whose threshold (the median stage-1 confidence of a dense run) makes tokens exit."""
    model = _segmentor(backbone, DToP(1.0, k=1))
    x = _images()
    with torch.no_grad():
        dense = model.train()(x)  # training mode runs the aux heads even at ξ = 1
        model.eval()
        conf = model.decode_head.scores(dense.stage_logits[0], dense.stage_presence[0]).amax(1).flatten(1)
    model.pruning.set_threshold(float(conf.quantile(0.6, dim=1).min()))
    return model, x


def test_packed_batch_equals_per_image(backbone: ViTBackbone) -> None:
    model, x = _pruned(backbone)
    with torch.no_grad():
        out = model(x)
        exits = out.stats["exits_per_stage"]
        assert bool((exits[:, 0] > 0).all()) and exits[0, 0] != exits[1, 0], exits
        for b in range(x.shape[0]):
            single = model(x[b : b + 1])
            assert torch.equal(single.stats["exit_stage"][0], out.stats["exit_stage"][b])
            assert _rel(out.logits[b], single.logits[0]) <= reorder_rel(torch.float32)
            assert _rel(out.presence[b], single.presence[0]) <= reorder_rel(torch.float32)
            for s in range(2):
                assert _rel(out.stage_logits[s][b], single.stage_logits[s][0]) <= reorder_rel(torch.float32)
            torch.testing.assert_close(out.stats["macs"][b], single.stats["macs"][0], rtol=0, atol=0)


def test_exited_tokens_keep_stage_logits(backbone: ViTBackbone) -> None:
    model, x = _pruned(backbone)
    with torch.no_grad():
        out = model(x)
        scores, _ = model.predict(x)
    exit_stage = out.stats["exit_stage"]  # [B, h, w]
    assert bool((exit_stage == 0).any())
    final = out.logits.permute(0, 2, 3, 1)
    for s in range(2):
        sel = exit_stage == s
        assert torch.equal(final[sel], out.stage_logits[s].permute(0, 2, 3, 1)[sel])
    assert not torch.equal(final[exit_stage == 2], out.stage_logits[0].permute(0, 2, 3, 1)[exit_stage == 2])
    assert scores.shape == (2, K, 64, 96)


# --- MACs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("C,num_classes,n,layers,heads", [(64, 3, 10, 1, None), (192, 7, 24, 3, 2), (128, 1, 1, 2, 4)])
def test_macs_match_flop_counter(C: int, num_classes: int, n: int, layers: int, heads: int | None) -> None:
    head = ATMHead(C, num_classes, num_heads=heads, num_layers=layers, mlp_ratio=3.0).eval()
    stream = TokenStream.from_dense(torch.randn(1, n, C), 0)
    with FlopCounterMode(display=False) as counter:
        head(stream.x, stream)
    counts = counter.get_flop_counts()["Global"]
    linear_flops = sum(v for op, v in counts.items() if "mm" in str(op) and "bmm" not in str(op))
    macs, macs_linear = head.macs(torch.tensor([n]))
    assert macs.dtype == torch.float64 and macs.shape == (1,)
    assert counter.get_total_flops() == 2 * int(macs[0])
    assert linear_flops == 2 * int(macs_linear[0])
    # per image, vectorised
    many = head.macs(torch.tensor([n, 2 * n]))
    assert float(many[0][0]) == float(macs[0]) and float(many[0][1]) > float(macs[0])
