"""The paper experiments as the official code ran them: each check fails on what the configs did before."""

from __future__ import annotations

import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dtop.cli.common import CONFIG_PATH, build
from dtop.lit.module import SegModule
from dtop.losses import kl_distillation
from dtop.models.heads.atm import ATMHead
from dtop.models.heads.fcn import FCNHead
from dtop.models.policies import DoViT
from dtop.models.state import RunState
from dtop.models.vit import ViTBackbone
from tests.test_experiments import tiny_model_cfg, weights_on_meta


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        yield


@pytest.mark.parametrize("name", ["dtop_atm_vit_b_ade20k", "dtop_atm_vit_l_ade20k_640"])
def test_dtop_aux_heads_are_the_decode_head(name: str) -> None:
    """Official DToP: the decode head and both aux heads are the same 3-layer ATM head, dropout 0.1."""
    cfg = compose("train", [f"experiment={name}", "model.backbone.pretrained=false"])
    with weights_on_meta():
        model = instantiate(cfg.model)
    decode = sum(p.numel() for p in model.decode_head.parameters())
    for aux in model.aux_heads:
        assert sum(p.numel() for p in aux.parameters()) == decode and aux.num_layers == 3
        assert aux.layers[0].dropout == 0.1 and aux.mask_loss_pixels == "all"
    assert model.decode_head.num_heads == (6 if "vit_b" in name else 8)
    assert isinstance(model.backbone.norm, torch.nn.Identity)  # final_norm=False


def test_pretrained_class_token_free_vit_loads_from_a_local_file(tmp_path) -> None:
    """timm's own loader cannot reshape a cls-token position embedding for a model without one."""
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "tiny.pth"
    torch.save(reference.state_dict(), path)
    backbone = ViTBackbone(
        "vit_tiny_patch16_224",
        img_size=64,
        pretrained=True,
        class_token=False,
        final_norm=False,
        pretrained_cfg_overlay={"file": str(path)},
    )
    assert backbone.vit.cls_token is None and backbone.vit.pos_embed.shape == (1, 16, 192)
    assert torch.equal(backbone.vit.blocks[5].attn.qkv.weight, reference.blocks[5].attn.qkv.weight)
    assert backbone.has_weights and backbone.mean_std == ((0.5,) * 3, (0.5,) * 3)  # AugReg weights' normalisation


def test_normalisation_follows_the_weights_unless_the_experiment_chose(tmp_path, caplog, monkeypatch) -> None:
    import dtop.models.vit as vit

    fake = timm.create_model("vit_tiny_patch16_224", depth=8).state_dict()  # the default model, 8 layers
    monkeypatch.setattr(vit, "_pretrained_state", lambda name, cfg: (fake, "test"))
    base = ["model.backbone.pretrained=true", "data.train_size=4", "data.val_size=2", f"paths.output_dir={tmp_path}"]
    dm, module = build(compose("train", base))
    assert dm.normalisation == ((0.5,) * 3, (0.5,) * 3)  # vit_tiny_patch16_224's AugReg weights
    assert module.run_config["data"]["mean"] == [0.5] * 3  # stored with the checkpoint
    with caplog.at_level(logging.WARNING, logger="dtop"):
        dm, _ = build(compose("train", [*base, "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]))
    assert dm.normalisation[0] == (0.485, 0.456, 0.406) and "were trained with mean (0.5, 0.5, 0.5)" in caplog.text
    dm.setup("fit")
    assert dm.train_dataset.mean.ravel().tolist() == pytest.approx([0.485, 0.456, 0.406])
    dm, _ = build(compose("train", [f"paths.output_dir={tmp_path}"]))  # random weights: the data's default
    assert dm.normalisation[0] == (0.485, 0.456, 0.406)


def test_dovit_b_decides_after_blocks_2_5_8() -> None:
    cfg = compose("train", ["experiment=dovit_setr_vit_b_cityscapes", "model.backbone.pretrained=false"])
    with weights_on_meta():
        model = instantiate(cfg.model)
    assert [len(model.stage_blocks(s)) for s in range(4)] == [2, 3, 3, 4]
    assert model.pruning.grade_upsample == 4 and model.decode_head.classifier_scale == 4


def test_setr_grading_averages_the_upsampled_confidence() -> None:
    """do_vit.py: conf = avg_pool(max(softmax(×4 bilinear logits)), 4) per token."""
    torch.manual_seed(0)
    B, h, w, K = 2, 3, 4, 5
    logits = torch.randn(B * h * w, K) * 3
    state = RunState(
        batch_size=B,
        grid=(h, w),
        num_classes=K,
        num_stages=2,
        canvas=torch.zeros(B * h * w + 1, K),
        exit_stage=torch.zeros(B * h * w + 1, dtype=torch.long),
        lengths=torch.zeros(B, 2),
    )
    fs = state.full_stream(torch.zeros(B * h * w, 1))
    from dtop.models.heads.base import HeadOutput

    head = FCNHead(1, K)
    conf = DoViT(0.9, grade_upsample=4)._confidence(HeadOutput(logits), head, fs, state)
    maps = logits.view(B, h, w, K).permute(0, 3, 1, 2)
    up = F.interpolate(maps, size=(4 * h, 4 * w), mode="bilinear", align_corners=False).softmax(1).amax(1)
    expected = up.view(B, h, 4, w, 4).mean((2, 4)).reshape(-1)
    torch.testing.assert_close(conf, expected)
    plain = DoViT(0.9)._confidence(HeadOutput(logits), head, fs, state)
    assert not torch.allclose(conf, plain)  # blending with neighbours lowers confidence at class borders


def test_kl_directions() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    official = F.kl_div(F.log_softmax(rows(s), 1), F.softmax(rows(t), 1), reduction="batchmean")  # PixelKL, τ = 1
    assert float(kl_distillation(s, t, direction="teacher_student")) == pytest.approx(float(official), rel=1e-5)
    paper = F.kl_div(F.log_softmax(rows(t), 1), F.softmax(rows(s), 1), reduction="batchmean")  # KL(p_s ‖ p_t)
    assert float(kl_distillation(s, t)) == pytest.approx(float(paper), rel=1e-5)
    assert float(kl_distillation(s, t)) != pytest.approx(float(official), rel=1e-3)


def test_atm_mask_loss_over_every_pixel_counts_unlabelled_ones_as_negatives() -> None:
    torch.manual_seed(0)
    logits, presence = torch.randn(1, 3, 8, 8), torch.randn(1, 3)
    target = torch.randint(0, 3, (1, 8, 8))
    target[0, :4] = 255
    labelled = ATMHead(16, 3, num_layers=1).loss(logits, presence, target)
    every = ATMHead(16, 3, num_layers=1, mask_loss_pixels="all").loss(logits, presence, target)
    assert float(every["presence"]) == float(labelled["presence"])
    assert float(every["focal"]) != pytest.approx(float(labelled["focal"]), rel=1e-3)
    full = target.clone()
    full[0, :4] = 0  # no unlabelled pixel: both read the same
    a, b = (
        ATMHead(16, 3, num_layers=1).loss(logits, presence, full),
        ATMHead(16, 3, num_layers=1, mask_loss_pixels="all").loss(logits, presence, full),
    )
    assert float(a["dice"]) == pytest.approx(float(b["dice"]))


def test_official_dtop_schedule_and_weight_decay() -> None:
    """mmengine LinearLR(1500) + PolyLR(begin=1500, end=160000) over a 40k run, wd on every parameter."""
    cfg = compose("train", ["experiment=dtop_atm_vit_b_ade20k", "model.backbone.pretrained=false"])
    assert cfg.trainer.max_steps == 40000 and cfg.module.poly_iters == 160000 and cfg.trainer.gradient_clip_val is None
    model = instantiate(tiny_model_cfg(cfg))
    module = instantiate(cfg.module)(model=model, num_classes=model.num_classes)
    factor = module.lr_factor
    assert factor(0, 40000) == pytest.approx(1e-6) and factor(1500, 40000) == pytest.approx(1.0)
    assert factor(40000, 40000) == pytest.approx((1 - (40000 - 1500) / (160000 - 1500)) ** 0.9)
    finetune = compose("train", ["experiment=dtop_atm_vit_b_ade20k", "regime=finetune", "init_ckpt=x"])
    assert finetune.module.poly_iters is None and finetune.trainer.max_steps == 40000
    opt = SegModule(model, model.num_classes, decay_all=True, weight_decay=0.01)
    opt.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    groups = opt.configure_optimizers()["optimizer"].param_groups
    assert all(g["weight_decay"] == 0.01 for g in groups)


@pytest.mark.parametrize("name", ["dtop_atm_vit_l_pcontext59_480", "dtop_atm_vit_l_ade20k_640"])
def test_dtop_vit_l_data_as_the_official_configs(name: str) -> None:
    cfg = compose("train", [f"experiment={name}"])
    assert list(cfg.data.mean) == [0.5] * 3 and cfg.trainer.max_steps == 160000
    assert list(cfg.data.scale) == ([520, 2048] if "pcontext" in name else [640, 2560])
    assert list(cfg.data.stride) == [320, 320]
    assert math.isclose(cfg.model.aux_head.dropout, 0.1)
