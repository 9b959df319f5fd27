"""The training step as ``dtop-train`` runs it: no host sync per step, and a non-finite step is skipped on the
device and reported with its step number, the weights and the resumable checkpoint left finite."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from dtop.cli.common import CONFIG_PATH, cli
from dtop.cli.train import train
from dtop.lit.guard import NonFiniteGuard
from dtop.lit.module import SegModule

SMALL = [
    "logger=csv",
    "data.train_size=32",
    "data.val_size=4",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.num_workers=0",
    "data.image_size=[32,32]",
    "model.backbone.depth=4",
    "model.prune_layers=[2,3]",
    "callbacks.dashboard.log_images=false",
    "test=false",
]
# what reads a device value on the host: .item(), float(t), bool(t), int(t)
READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default)


class _HostReads(TorchDispatchMode):
    """Counts host reads of tensor values per training step, outside the optimiser's own bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer = None
        self.per_step: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS and self.trainer is not None and self.trainer.training:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/_" not in f.filename.replace("\\", "/")]
            if "torch/optim/" not in frames[-1].filename.replace("\\", "/"):
                self.per_step[self.trainer.global_step] += 1
        return func(*args, **(kwargs or {}))


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        return compose("train", overrides=[*SMALL, *overrides, f"paths.output_dir={tmp_path}"])


def test_training_steps_read_nothing_from_the_device_between_logging_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _HostReads()
    fit_start = SegModule.on_fit_start

    def on_fit_start(self: SegModule) -> None:
        reads.trainer = self.trainer
        fit_start(self)

    monkeypatch.setattr(SegModule, "on_fit_start", on_fit_start)
    cfg = _cfg(tmp_path, "trainer.max_steps=9", "trainer.log_every_n_steps=4", "trainer.val_check_interval=8")
    with reads:
        train(cfg)
    assert reads.trainer is not None and reads.trainer.global_step == 9
    # the non-finite check and the progress bar read at logging steps (4, 8) and at the first step only
    quiet = {step: n for step, n in reads.per_step.items() if step % 4 and step not in (0, 1, 9)}
    assert quiet == {}, f"host reads per training step: {dict(reads.per_step)}"
    assert reads.per_step[4] > 0  # the counter sees the reads that do happen
    # training throughput: timed from logging step 4 to 8 (not 8 → 9: validation ran after step 8)
    assert reads.trainer.lightning_module.train_speed["steps"] == 4


@pytest.mark.parametrize(("optimizer", "bad_step"), [("adamw", 3), ("sgd", 0)])
def test_a_non_finite_loss_is_skipped_and_reported_with_its_step(
    optimizer: str, bad_step: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Skipped by the fused optimiser, the weights, moments and last.ckpt stay finite; SGD's first step too,
    whose momentum buffers fused SGD would otherwise leave uninitialised."""
    loss = SegModule._loss

    def nan_at(self: SegModule, out, target, images):
        terms = loss(self, out, target, images)
        if self.global_step == bad_step:
            terms["decode/ce"] = terms["decode/ce"] * float("nan")
        return terms

    monkeypatch.setattr(SegModule, "_loss", nan_at)
    cfg = _cfg(
        tmp_path,
        f"module.optimizer={optimizer}",
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=5",
        "trainer.val_check_interval=20",
    )
    with pytest.raises(SystemExit) as stop:
        cli(train)(cfg)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"Non-finite loss at step {bad_step}: {{'decode/ce': nan" in err and "skips steps" in err
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5  # stopped at the first logging step after the bad one
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    state = ckpt["optimizer_states"][0]["state"].values()
    assert all(torch.isfinite(v).all() for s in state for v in s.values() if torch.is_tensor(v))
    if optimizer == "adamw":
        assert {float(s["step"]) for s in state} == {4.0}  # five steps taken, one skipped by the fused optimiser


def test_training_speed_counts_optimiser_steps_under_gradient_accumulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules: list[SegModule] = []
    fit_start = SegModule.on_fit_start

    def on_fit_start(self: SegModule) -> None:
        modules.append(self)
        fit_start(self)

    monkeypatch.setattr(SegModule, "on_fit_start", on_fit_start)
    accumulate = ["+trainer.accumulate_grad_batches=2", "trainer.max_steps=8", "trainer.log_every_n_steps=2"]
    train(_cfg(tmp_path, *accumulate, "trainer.val_check_interval=6"))  # validation after batch 6 (step 3)
    # logging steps 2, 4, 6, 8: six optimiser steps of two batches of two images timed, validation left out
    speed = modules[0].train_speed
    assert (speed["steps"], speed["images"]) == (6, 24) and speed["seconds"] > 0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_guard_skips_non_finite_gradients_of_a_finite_loss(optimizer: str) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = (
        torch.optim.AdamW([w], lr=0.1, fused=True)
        if optimizer == "adamw"
        else torch.optim.SGD([w], lr=0.1, momentum=0.9, fused=True)
    )
    guard = NonFiniteGuard()
    for step, grad in enumerate([1.0, float("inf"), 1.0]):
        loss = guard.loss(torch.stack([(w * 0).sum() + 1.0]), step)
        loss.backward()
        w.grad = torch.full_like(w, grad)
        before = w.detach().clone()
        guard.before_step(opt, step, skip=True)
        opt.step()
        opt.zero_grad()
        assert torch.equal(w.detach(), before) == (step == 1)
    with pytest.raises(FloatingPointError, match=r"Non-finite gradients at step 1 \(the loss was finite\)"):
        guard.check(["ce"])


def test_guard_without_a_non_finite_step_does_not_raise() -> None:
    guard = NonFiniteGuard()
    guard.check(["ce"])
    guard.loss(torch.tensor([0.5, 0.25]), 0)
    guard.check(["ce", "aux"])


def test_guard_leaves_inf_gradients_to_a_grad_scaler() -> None:
    """Without ``skip`` (fp16: the GradScaler skips inf-gradient steps as part of its scaling) only the loss counts."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    guard = NonFiniteGuard()
    guard.loss(torch.stack([(w * 0).sum() + 1.0]), 0).backward()
    w.grad = torch.full_like(w, float("inf"))
    guard.before_step(opt, 0, skip=False)
    assert getattr(opt, "found_inf", None) is None
    guard.check(["ce"])
    guard.loss(torch.stack([(w * 0).sum() + float("nan")]), 1)
    guard.before_step(opt, 1, skip=False)
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 1"):
        guard.check(["ce"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_with_the_guard_never_syncs() -> None:
    """Forward, loss, backward, guard and fused AdamW of the unpruned model: no host sync at all
    (``torch.cuda.set_sync_debug_mode('error')`` raises on any)."""
    from functools import partial

    from dtop.losses import cross_entropy
    from dtop.models.build import build_segmentor
    from dtop.models.heads.fcn import FCNHead
    from dtop.models.policies import DToP
    from dtop.models.vit import ViTBackbone

    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=64, depth=4)
    head = partial(FCNHead, channels=32)
    model = build_segmentor(backbone, head, 5, head, [2], DToP(1.0)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.randn(2, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 5, (2, 64, 64), device="cuda")
    guard = NonFiniteGuard()

    def step(i: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
            maps = [out.logits, *out.stage_logits]
            terms = torch.stack([cross_entropy(model.upsampled(m, out), labels) for m in maps])
        guard.loss(terms, i).backward()
        guard.before_step(opt, i, skip=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # first-call work (allocations, kernel compilation) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 3):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.check(["ce", "aux"])
