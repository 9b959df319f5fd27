"""DoViT: dense equivalence at ξ = 1, frozen features of stopped tokens, reconstruction, cls merging,
the Segmenter decoder (packed ≡ per image, MACs), threshold annealing and self-distillation."""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dtop.lit.callbacks import ThresholdAnnealing, annealed_threshold
from dtop.lit.module import SegModule
from dtop.losses import kl_distillation
from dtop.models.build import build_segmentor
from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.heads.fcn import FCNHead
from dtop.models.heads.segmenter import SegmenterHead
from dtop.models.packed import TokenStream
from dtop.models.policies import DoViT, DToP
from dtop.models.state import RunState
from dtop.models.vit import ViTBackbone
from tests.tolerance import assert_reordered_close, rel_err, reorder_rel

K = 5
SIZE = (48, 64)
HEADS = {
    "fcn": partial(FCNHead),
    "fcn1x1": partial(FCNHead, channels=None),
    "segmenter": partial(SegmenterHead),
    "segmenter_aux": partial(SegmenterHead, num_layers=1, input_norm=True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is far faster than two on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(decode: str = "segmenter", aux: str = "fcn1x1", policy=None, prune=(1, 2), depth: int = 4, **kwargs):
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=SIZE, depth=depth, **kwargs)
    model = build_segmentor(backbone, HEADS[decode], K, HEADS[aux], list(prune), policy or DoViT(1.0))
    return model.eval()


def images_for(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, n).view(n, 1, 1, 1)
    return torch.randn(n, 3, *SIZE, generator=g) * scale


def segmenter_dense(head: SegmenterHead, tokens: torch.Tensor) -> torch.Tensor:
    """Segmenter's mask transformer the ordinary way on [B, N, C] (timm Block.forward, no packing)."""
    B = tokens.shape[0]
    x = head.proj_dec(head.norm(tokens))
    x = torch.cat([x, head.cls_emb.expand(B, -1, -1)], 1)
    for block in head.blocks:
        x = block(x)
    x = head.decoder_norm(x)
    patches = F.normalize(head.proj_patch(x[:, :-K]), dim=-1)
    classes = F.normalize(head.proj_classes(x[:, -K:]), dim=-1)
    return head.mask_norm(patches @ classes.transpose(1, 2))


def head_dense(head: SegHead, tokens: torch.Tensor) -> torch.Tensor:
    if isinstance(head, SegmenterHead):
        return segmenter_dense(head, tokens)
    B, N, C = tokens.shape
    return head.cls(head.conv(head.norm(tokens.reshape(B * N, C)))).view(B, N, -1)


def dense_features(model, images: torch.Tensor, upto: int) -> torch.Tensor:
    """Patch features after ``upto`` blocks of the plain ViT (pre-norm)."""
    vit = model.backbone.vit
    x = model.backbone.embed(images)
    for block in vit.blocks[:upto]:
        x = block(x)
    return x[:, vit.num_prefix_tokens :]


def canvas(logits: torch.Tensor) -> torch.Tensor:
    B, Kc, h, w = logits.shape
    return logits.permute(0, 2, 3, 1).reshape(B, h * w, Kc)


def _gap_threshold(conf: torch.Tensor, q: float) -> float:
    """A threshold near the ``q`` quantile that sits mid-way in a wide gap between confidences (so
    float noise between a packed and a per-image run cannot flip a decision)."""
    c = conf.flatten().double().sort().values
    n = c.numel()
    lo, hi = max(int(n * (q - 0.15)), 0), min(int(n * (q + 0.15)), n - 1)
    gaps = c[lo + 1 : hi + 1] - c[lo:hi]
    i = lo + int(gaps.argmax())
    return float((c[i] + c[i + 1]) / 2)


def calibrate(model, images: torch.Tensor, q: float = 0.5) -> list[float]:
    """Per-stage ξ that stop about a fraction ``q`` of the tokens still active at each stage.

    (Calibrated in train mode, which runs every aux head; the heads used here have no BatchNorm or
    active dropout, so their outputs are the same as in eval mode.)"""
    n_aux = len(model.aux_heads)
    thr = [1.0] * n_aux
    was_training = model.training
    model.train()  # inference skips the aux heads of stages that cannot prune; training runs them all
    for s in range(n_aux):
        model.pruning.set_threshold(thr)
        with torch.no_grad():
            out = model(images)
        logits = HeadOutput(canvas(out.stage_logits[s]).reshape(-1, K))
        conf = model.aux_heads[s].token_probs(logits, None).max(-1).values
        active = out.stats["exit_stage"].view(-1) >= s
        thr[s] = _gap_threshold(conf[active], q)
    model.pruning.set_threshold(thr)
    model.train(was_training)
    return thr


# ------------------------------------------------------------------------------------- ξ = 1 ≡ dense
@pytest.mark.parametrize(
    "decode,aux,kwargs",
    [
        ("fcn", "fcn1x1", {}),
        ("segmenter", "fcn1x1", {}),
        ("segmenter", "segmenter_aux", {"class_token": False}),
        ("segmenter", "fcn1x1", {"reg_tokens": 2, "no_embed_class": True}),
    ],
)
def test_threshold_one_reproduces_dense_model(decode, aux, kwargs):
    model = make_model(decode, aux, DoViT(1.0), **kwargs)
    vit = model.backbone.vit
    images = images_for(2)
    captured = {}
    hook = vit.blocks[-1].register_forward_hook(lambda m, i, o: captured.update(pre_norm=o))
    with torch.no_grad():
        out = model(images)
        normed = vit.forward_features(images)  # timm's own forward, ending in the final norm
        hook.remove()
        P = vit.num_prefix_tokens
        ref = head_dense(model.decode_head, normed[:, P:])
        aux_ref = head_dense(model.aux_heads[0], dense_features(model, images, model.prune_layers[0]))
        out_train = model.train()(images)  # training runs the aux heads even when no token can stop
        model.eval()
    assert out.stage_logits == []  # inference at ξ = 1 skips the aux heads (mmseg's dense model)
    assert rel_err(canvas(out.logits), ref) <= reorder_rel(torch.float32)
    assert rel_err(out.features, captured["pre_norm"][:, P:]) <= reorder_rel(torch.float32)
    assert rel_err(canvas(out_train.stage_logits[0]), aux_ref) <= reorder_rel(torch.float32)
    assert (out.stats["exits_per_stage"][:, :-1] == 0).all()
    assert (out.stats["tokens_per_stage"] == out.stats["tokens_per_stage"][:, :1]).all()


# ---------------------------------------------------------------------- stopped tokens are frozen
def test_stopped_tokens_keep_their_stop_layer_features_bit_identical():
    model = make_model("segmenter", "fcn1x1", prune=(1, 2), depth=4)
    images = images_for(2)
    calibrate(model, images, q=0.4)
    with torch.no_grad():
        out = model(images)
    stage = out.stats["exit_stage"].view(2, -1)
    for s in range(model.num_stages):
        assert (stage == s).any(), f"the test needs tokens that stop at stage {s}"
    with torch.no_grad():
        # Up to the first decision layer every token is active: stopped-at-0 features are the plain ViT's.
        ref = dense_features(model, images, model.prune_layers[0])
        assert_reordered_close(out.features[stage == 0], ref[stage == 0])
        # Stopped-at-s features are what aux head s graded (the reconstructed map at decision layer s).
        for s, aux in enumerate(model.aux_heads):
            graded = aux(out.features[stage == s], None).logits
            assert_reordered_close(graded, canvas(out.stage_logits[s])[stage == s])
        # Nothing after the stop touches them: change every later layer, the features stay bit-identical.
        for s, layer in enumerate(model.prune_layers):
            other = copy.deepcopy(model)
            g = torch.Generator().manual_seed(s)
            for p in other.backbone.blocks[layer:].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            out2 = other(images)
            stopped = stage <= s
            assert torch.equal(out2.stats["exit_stage"].view(2, -1)[stopped], stage[stopped])
            assert torch.equal(out2.features[stopped], out.features[stopped])
            assert (out2.features[~stopped] - out.features[~stopped]).abs().amax(-1).gt(1e-3).all()


# --------------------------------------------------------------------------------- reconstruction
def _state(B: int, grid: tuple[int, int], has_cls: bool = True) -> RunState:
    N = grid[0] * grid[1]
    return RunState(
        batch_size=B,
        grid=grid,
        num_classes=K,
        num_stages=2,
        canvas=torch.zeros(B * N + 1, K),
        exit_stage=torch.ones(B * N + 1, dtype=torch.long),
        lengths=torch.zeros(B, 2, dtype=torch.int32),
        has_cls=has_cls,
    )


def _decided(decision) -> TokenStream:
    stream, keep, extra = decision
    return stream.select(keep, extra)


def test_reconstruction_restores_exact_positions():
    B, grid, C = 3, (3, 4), 8
    N = grid[0] * grid[1]
    code = torch.zeros(B, 1 + N, C)
    code[:, 1:, 0] = torch.arange(B)[:, None].float()  # image
    code[:, 1:, 1] = torch.arange(N).float()  # position in the grid
    code[:, 0] = -7.0  # cls
    stream = TokenStream.from_dense(code, num_prefix=1)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(B * (1 + N), generator=g) > 0.5
    keep[stream.pos < 0] = True
    keep[1] = False  # image 0 loses at least one patch
    sub = stream.select(keep)
    assert not sub.uniform
    state = _state(B, grid)
    state.buffer = torch.full((B * N + 1, C), -1.0)  # what stopped tokens hold (then the trash row)
    full = state.scatter_features(sub)
    kept = keep.view(B, 1 + N)[:, 1:].reshape(-1)
    expect_b = torch.arange(B).repeat_interleave(N).float()
    expect_n = torch.arange(N).repeat(B).float()
    assert torch.equal(full[kept, 0], expect_b[kept]) and torch.equal(full[kept, 1], expect_n[kept])
    assert torch.equal(full[kept, 2:], torch.zeros(int(kept.sum()), C - 2))
    assert (full[~kept] == -1.0).all()  # the others keep the buffer's (stopped) features
    # From no buffer (first stage): the full map of a full stream is the stream in grid order.
    state.buffer = None
    assert torch.equal(state.scatter_features(stream), code[:, 1:].reshape(B * N, C))


# ------------------------------------------------------------------------------------ cls merging
def test_cls_merge_formula_eq8():
    """cls ← ½(cls + mean of all stopped tokens), only where more than agg_rate of the tokens stopped."""
    B, grid, C = 3, (2, 2), 2
    N = 4
    full = torch.tensor(
        [
            [1.0, 2.0],
            [3.0, 6.0],
            [5.0, 0.0],
            [7.0, 4.0],  # image 0: tokens 1, 3 stopped
            [2.0, 2.0],
            [4.0, 4.0],
            [6.0, 6.0],
            [8.0, 8.0],  # image 1: token 2 stopped
            [1.0, 1.0],
            [1.0, 1.0],
            [1.0, 1.0],
            [1.0, 1.0],
        ]
    )  # image 2: none stopped
    stopped = torch.zeros(B * N, dtype=torch.bool)
    stopped[[1, 3, 6]] = True
    cls = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    dense = torch.cat([cls[:, None], full.view(B, N, C)], 1)
    stream = TokenStream.from_dense(dense, num_prefix=1)
    stream = stream.select(torch.cat([torch.ones(B, 1, dtype=torch.bool), ~stopped.view(B, N)], 1).view(-1))
    state = _state(B, grid)
    state.stopped = F.pad(stopped, (0, 1))  # plus the trash row
    merged = DoViT(0.9, agg_rate=0.25)._merge_cls(stream, full, state, 0)
    first = stream.cu_seqlens[:-1].long()
    # image 0: 2/4 > 0.25 → ½([10, 20] + mean([3, 6], [7, 4]) = [5, 5]); image 1: 1/4 is not > 0.25; image 2: none
    expected = torch.tensor([[7.5, 12.5], [30.0, 40.0], [50.0, 60.0]])
    assert torch.equal(merged.x[first], expected)
    rest = torch.ones(stream.x.shape[0], dtype=torch.bool)
    rest[first] = False
    assert torch.equal(merged.x[rest], stream.x[rest])
    # a lower agg_rate merges image 1 too: ½([30, 40] + [6, 6])
    merged = DoViT(0.9, agg_rate=0.2)._merge_cls(stream, full, state, 0)
    assert torch.equal(merged.x[first][1], torch.tensor([18.0, 23.0]))


class _ChannelHead(SegHead):
    """Aux head whose logits are the first K channels ×100: the test decides who is confident."""

    in_channels, num_classes = 8, K

    def forward(self, x, stream):
        return HeadOutput(x[:, :K] * 100.0)

    def macs(self, n):
        return n.double() * 0, n.double() * 0


def test_stage_end_stops_confident_tokens_accumulates_and_merges():
    B, grid, C = 1, (2, 2), 8
    feats = torch.zeros(1, 5, C)
    feats[0, 0] = 1.0  # cls
    feats[0, 1, 0] = 1.0  # confident → stops at stage 0
    feats[0, 3, 0] = 1.0  # confident
    stream = TokenStream.from_dense(feats, 1)
    state = _state(B, grid)
    state.exit_stage = torch.full((5,), 2)  # 4 tokens, then the trash row
    policy = DoViT(0.5, agg_rate=0.1)
    out = _decided(policy.stage_end(0, 2, stream, _ChannelHead(), state))
    assert out.pos.tolist() == [-1, 1, 3] and state.stopped.tolist() == [True, False, True, False, False]
    assert state.exit_stage[:4].tolist() == [0, 2, 0, 2]
    mean = (feats[0, 1] + feats[0, 3]) / 2
    torch.testing.assert_close(out.x[0], 0.5 * (feats[0, 0] + mean))
    # Stage 1: token 1 becomes confident; stopped accumulate (Eq. 5), the earlier stop keeps its stage.
    x = out.x.clone()
    x[1, 0] = 1.0
    out2 = _decided(policy.stage_end(1, 2, out.with_x(x), _ChannelHead(), state))
    assert out2.pos.tolist() == [-1, 3] and state.stopped.tolist() == [True, True, True, False, False]
    assert state.exit_stage[:4].tolist() == [0, 1, 0, 2]
    full = state.buffer[:-1].view(4, C)
    torch.testing.assert_close(out2.x[0], 0.5 * (out.x[0] + full[:3].mean(0)))


# ---------------------------------------------------------------------------------- Segmenter head
def test_segmenter_head_on_packed_unequal_segments_equals_each_image_alone():
    torch.manual_seed(0)
    head = SegmenterHead(64, K).eval()
    x = torch.randn(3, 10, 64)
    stream = TokenStream.from_dense(x, 0)
    keep = torch.rand(30) > 0.4
    keep[10:20] = False
    keep[10] = True  # image 1 keeps a single token
    sub = stream.select(keep)
    with torch.no_grad():
        out = head(sub.x, sub).logits
    assert out.shape == (int(keep.sum()), K)
    for b in range(3):
        with torch.no_grad():
            ref = segmenter_dense(head, x[b][keep.view(3, 10)[b]][None])[0]
        assert_reordered_close(out[sub.cu_seqlens[b] : sub.cu_seqlens[b + 1]], ref)


def test_segmenter_defaults_and_gradients():
    head = SegmenterHead(192, 7)
    assert (head.d_model, head.num_heads, head.num_layers) == (192, 3, 2)
    assert head.blocks[0].mlp.fc1.out_features == 4 * 192
    assert head.proj_patch.bias is None and head.proj_classes.bias is None
    narrow = SegmenterHead(128, 3, d_model=64, num_layers=1)
    assert (narrow.num_heads, narrow.proj_dec.out_features, len(narrow.blocks)) == (1, 64, 1)
    assert SegmenterHead(128, 3, num_layers=1).num_heads == 2
    stream = TokenStream.from_dense(torch.randn(2, 6, 192), 0)
    head(stream.x, stream).logits.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("decode,aux", [("segmenter", "fcn1x1"), ("segmenter", "segmenter_aux")])
def test_packed_batch_equals_each_image_alone_dovit_segmenter(decode, aux):
    model = make_model(decode, aux)
    images = images_for(4)
    calibrate(model, images, q=0.4)
    with torch.no_grad():
        batched = model(images)
        singles = [model(images[i : i + 1]) for i in range(4)]
    tokens = batched.stats["tokens_per_stage"]
    assert tokens[:, -1].lt(tokens[:, 0]).all() and not (tokens[:, -1] == tokens[0, -1]).all(), (
        "the test must really stop tokens, unequally across images"
    )
    for i, single in enumerate(singles):
        assert_reordered_close(batched.logits[i], single.logits[0])
        assert_reordered_close(batched.features[i], single.features[0])
        for key in ("tokens_per_stage", "exits_per_stage", "exit_stage"):
            assert torch.equal(batched.stats[key][i], single.stats[key][0]), key
        torch.testing.assert_close(batched.stats["macs"][i], single.stats["macs"][0])


def test_packed_batch_equals_each_image_alone_dtop_segmenter():
    """With DToP the Segmenter heads see only the active tokens (class tokens attend to those)."""
    model = make_model("segmenter", "segmenter_aux", policy=DToP(1.0, context="remove"))
    images = images_for(3)
    calibrate(model, images, q=0.4)
    with torch.no_grad():
        batched = model(images)
        singles = [model(images[i : i + 1]) for i in range(3)]
    assert batched.stats["tokens_per_stage"][:, -1].lt(batched.stats["tokens_per_stage"][:, 0]).all()
    for i, single in enumerate(singles):
        assert_reordered_close(batched.logits[i], single.logits[0])
        assert torch.equal(batched.stats["exit_stage"][i], single.stats["exit_stage"][0])


def _counted(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        result = fn()
    counts = counter.get_flop_counts()["Global"]
    attn = sum(v for op, v in counts.items() if "attention" in str(op))
    return result, counter.get_total_flops() / 2, (counter.get_total_flops() - attn) / 2


@pytest.mark.parametrize("n", [1, 7, 12])
def test_segmenter_macs_match_flop_counter(n):
    head = SegmenterHead(64, K, num_layers=2).eval()
    stream = TokenStream.from_dense(torch.randn(1, n, 64), 0)
    _, macs, macs_linear = _counted(lambda: head(stream.x, stream))
    total, linear = head.macs(torch.tensor([n]))
    assert float(total) == macs and float(linear) == macs_linear
    assert float(total - linear) == 2 * 2 * (n + K) ** 2 * 64  # two layers' QKᵀ and AV over n + K tokens


@pytest.mark.parametrize("policy", [DoViT(1.0), DoViT(0.5), DToP(0.5, context="remove")])
def test_model_macs_with_segmenter_match_flop_counter(policy):
    model = make_model("segmenter", "segmenter_aux", policy=policy)
    images = images_for(1)
    if policy.threshold[0] < 1.0:
        calibrate(model, images, q=0.4)
    out, macs, macs_linear = _counted(lambda: model(images))
    assert float(out.stats["macs"].sum()) == pytest.approx(macs, rel=1e-9)
    assert float(out.stats["macs_linear"].sum()) == pytest.approx(macs_linear, rel=1e-9)
    dense, dense_linear, _ = model.dense_macs(*SIZE)
    if policy.threshold[0] == 1.0:
        assert dense == pytest.approx(macs, rel=1e-9) and dense_linear == pytest.approx(macs_linear, rel=1e-9)
    else:  # fewer MACs than running every aux head on top of the dense model
        N = out.logits.shape[-2] * out.logits.shape[-1]
        aux = sum(float(h.macs(torch.tensor([N]))[0]) for h in model.aux_heads)
        assert out.stats["tokens_per_stage"][0, -1] < N
        assert float(out.stats["macs"].sum()) < dense + aux


# ------------------------------------------------------------------------------------- annealing
def test_annealed_threshold_schedule():
    assert annealed_threshold(0, 100, 1.0, 0.9) == 1.0
    assert annealed_threshold(50, 100, 1.0, 0.9) == pytest.approx(0.95)
    assert annealed_threshold(25, 100, 1.0, 0.9) == pytest.approx(0.975)
    assert annealed_threshold(100, 100, 1.0, 0.9) == pytest.approx(0.9)
    assert annealed_threshold(10_000, 100, 1.0, 0.9) == pytest.approx(0.9)
    assert annealed_threshold(-5, 100, 1.0, 0.9) == 1.0
    assert annealed_threshold(3, 0, 1.0, 0.9) == 0.9
    per_stage = annealed_threshold(50, 100, 1.0, (0.9, 0.8, 0.6))
    assert per_stage == pytest.approx((0.95, 0.9, 0.8))
    assert annealed_threshold(200, 100, (1.0, 0.9), (0.9, 0.5)) == pytest.approx((0.9, 0.5))
    with pytest.raises(ValueError, match="stages"):
        annealed_threshold(0, 10, (1.0, 1.0), (0.9, 0.8, 0.7))


def test_threshold_annealing_callback_follows_global_step_and_restores_target():
    policy = DoViT((0.9, 0.8))
    logged = {}
    module = SimpleNamespace(model=SimpleNamespace(pruning=policy), log=lambda k, v, **kw: logged.update({k: v}))
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=40)
    cb = ThresholdAnnealing(ratio=0.5)
    cb.on_fit_start(trainer, module)
    assert cb.iters == 20 and cb.target == (0.9, 0.8)
    for step, expected in [(0, (1.0, 1.0)), (10, (0.95, 0.9)), (20, (0.9, 0.8)), (35, (0.9, 0.8))]:
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, None, 0)
        assert policy.threshold == pytest.approx(expected)
        assert logged["train/threshold"] == pytest.approx(sum(expected) / 2)
        assert logged["train/threshold_s1"] == pytest.approx(expected[1])
    trainer.global_step = 5
    cb.on_train_batch_start(trainer, module, None, 0)
    cb.on_validation_start(trainer, module)  # validation during fit scores the target ξ
    assert policy.threshold == (0.9, 0.8)
    cb.on_train_batch_start(trainer, module, None, 1)
    assert policy.threshold == pytest.approx((0.975, 0.95))
    cb.on_fit_end(trainer, module)
    assert policy.threshold == (0.9, 0.8)
    # Resume: a new callback at step 10 of the same schedule continues where the ramp was.
    cb = ThresholdAnnealing(iters=20)
    trainer.global_step = 10
    cb.on_fit_start(trainer, module)
    cb.on_train_batch_start(trainer, module, None, 0)
    assert policy.threshold == pytest.approx((0.95, 0.9))
    cb.on_exception(trainer, module, RuntimeError())
    assert policy.threshold == (0.9, 0.8)
    with pytest.raises(ValueError, match="exactly one"):
        ThresholdAnnealing(iters=10, ratio=0.5)


# ------------------------------------------------------------------------------- self-distillation
def test_kl_distillation_zero_for_identical_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, K, 6, 8, generator=g)
    t = torch.randn(2, K, 6, 8, generator=g)
    target = torch.randint(0, K, (2, 6, 8), generator=g)
    assert float(kl_distillation(s, s, target)) == 0.0
    kl = kl_distillation(s, t, target)
    p_s, p_t = s.softmax(1), t.softmax(1)
    ref = (p_s * (p_s.log() - p_t.log())).sum(1).mean()  # Eq. 11: KL(p_s ‖ p_t) averaged over pixels
    assert float(kl) > 0 and float(kl) == pytest.approx(float(ref), rel=1e-5)
    target[0] = 255  # ignored pixels do not count
    ref_valid = (p_s * (p_s.log() - p_t.log())).sum(1)[1].mean()
    assert float(kl_distillation(s, t, target)) == pytest.approx(float(ref_valid), rel=1e-5)


def _write_ckpt(path, model) -> None:
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)


def test_segmodule_teacher_frozen_excluded_and_distills(tmp_path):
    teacher_src = make_model("segmenter", "fcn1x1")
    with torch.no_grad():  # a teacher with weights of its own
        for p in teacher_src.parameters():
            p.add_(0.01)
    ckpt = tmp_path / "dense.ckpt"
    _write_ckpt(ckpt, teacher_src)
    student = make_model("segmenter", "fcn1x1", policy=DoViT(0.5))
    module = SegModule(student, K, kl_weight=0.4, mse_weight=0.5, aux_weight=1.0, teacher_ckpt=str(ckpt))
    teacher = module._teacher[0]
    assert teacher.pruning.enabled is False and module.model.pruning.enabled is True
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for (name, p), q in zip(teacher.named_parameters(), teacher_src.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(teacher.decode_head.cls_emb, module.model.decode_head.cls_emb)
    # not in the checkpoint, not in the optimizer
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in teacher.parameters()}
    assert in_opt == {id(p) for p in module.model.parameters()}
    # one training-step loss: the teacher runs without autograd, the student gets gradients
    grad_modes = []
    teacher.register_forward_hook(lambda m, i, o: grad_modes.append(torch.is_grad_enabled()))
    module.train()
    images = images_for(2)
    calibrate(module.model, images, q=0.4)
    target = torch.randint(0, K, (2, *SIZE))
    out = module.model(images)
    terms = module._loss(out, target, images)
    assert grad_modes == [False]
    assert {"decode/ce", "aux0/ce", "aux1/ce", "kl", "mse"} <= set(terms)
    assert terms["kl"].item() > 0 and terms["mse"].item() > 0
    torch.stack(list(terms.values())).sum().backward()
    assert module.model.decode_head.cls_emb.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_kl_term_vanishes_when_student_is_the_dense_teacher(tmp_path):
    student = make_model("segmenter", "fcn1x1", policy=DoViT(1.0))
    ckpt = tmp_path / "self.ckpt"
    _write_ckpt(ckpt, student)
    module = SegModule(student, K, kl_weight=0.4, mse_weight=0.5, teacher_ckpt=str(ckpt)).eval()
    images = images_for(2)
    target = torch.randint(0, K, (2, *SIZE))
    with torch.no_grad():
        terms = module._loss(module.model(images), target, images)
    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-7) and float(terms["mse"]) == pytest.approx(0.0, abs=1e-10)


def test_distillation_without_teacher_ckpt_raises():
    with pytest.raises(ValueError, match="teacher_ckpt"):
        SegModule(make_model(), K, kl_weight=0.4)


# ----------------------------------------------------------------------------------------- configs
def test_configs_compose_segmenter_model_annealing_and_distillation():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    from dtop.cli.common import CONFIG_PATH

    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=synthetic_dovit_distill",
                "model=dovit_segmenter_tiny",
                "module.teacher_ckpt=/dense.ckpt",
            ],
        )
        bare = compose("train", overrides=["experiment=synthetic_dovit_distill"])
    assert (cfg.module.aux_weight, cfg.module.kl_weight, cfg.module.mse_weight) == (1.0, 0.4, 0.0)
    assert cfg.module.teacher_ckpt == "/dense.ckpt"
    with pytest.raises(OmegaConfBaseException, match="Missing mandatory value: teacher_ckpt"):
        bare.module.teacher_ckpt  # noqa: B018 - the experiment refuses to run without a teacher
    assert {"model_checkpoint", "lr_monitor", "threshold_annealing"} <= set(cfg.callbacks)
    cb = instantiate(cfg.callbacks.threshold_annealing)
    assert isinstance(cb, ThresholdAnnealing) and (cb.start, cb.ratio, cb.iters) == (1.0, 0.5, None)
    model = instantiate(cfg.model)
    assert isinstance(model.decode_head, SegmenterHead) and isinstance(model.pruning, DoViT)
    assert model.decode_head.num_heads == 3 and model.prune_layers == [2, 4, 6]
