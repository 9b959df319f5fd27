"""Portable artifacts: the hub folder (from_pretrained reproduces the checkpoint's logits exactly, only model
callables are instantiated) and the ONNX graphs (onnxruntime = PyTorch, dense and at a fixed capacity; the
fixed-capacity computation makes the engine's own decisions given its token counts)."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dtop.cli.common import CONFIG_PATH
from dtop.cli.export import export
from dtop.data.synthetic import SyntheticSegDataset
from dtop.errors import CheckpointError, ConfigError
from dtop.models.build import build_segmentor
from dtop.models.engine import Segmentor
from dtop.models.heads.fcn import FCNHead
from dtop.models.hub import instantiate, locate
from dtop.models.policies import DoViT, DToP
from dtop.models.static import StaticSegmentor, capacity_tokens, export_onnx
from dtop.models.vit import ViTBackbone
from tests.test_cli import cli, ok
from tests.tolerance import assert_reordered_close
from tests.trained_run import checkpoint_model, tiny_dovit_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dovit_run(tmp_path_factory)


def val_images(n: int, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    data = SyntheticSegDataset("val", size=n, image_size=size, seed=42)
    return torch.stack([data[i]["image"] for i in range(n)])


def maybe_dense(model: Segmentor, dense: bool) -> AbstractContextManager:
    return model.dense_mode() if dense else nullcontext()


def test_hub_folder_reproduces_the_checkpoint_exactly(run: Path, tmp_path: Path) -> None:
    ckpt, hub = run / "checkpoints" / "best.ckpt", tmp_path / "hub"
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):  # in-process: the ONNX test runs the command
        cfg = compose("export", overrides=[f"ckpt_path={ckpt}", "format=hub", f"output={hub}"])
    export(cfg)
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((hub / "config.json").read_text())
    assert config["model"]["_target_"] == "dtop.models.build.build_segmentor"
    assert config["model"]["backbone"]["pretrained"] is False and config["data"]["num_classes"] == 8
    assert config["data"]["mean"] == [0.485, 0.456, 0.406] and config["dtop_version"]
    assert config["provenance"]["metrics"]["mIoU"] == json.loads((run / "metrics.json").read_text())["mIoU"]
    card = (hub / "README.md").read_text()
    assert "library_name: dtop" in card and "DoViT" in card and "GMACs" in card
    assert "dtop-train experiment=synthetic_dovit" in card and "| pruned (ξ = 0.3) |" in card

    loaded, reference = Segmentor.from_pretrained(hub), checkpoint_model(ckpt)
    assert not loaded.training and loaded.pruning.threshold == (0.3,)
    images = val_images(4)
    with torch.no_grad():
        for dense in (False, True):
            with maybe_dense(loaded, dense), maybe_dense(reference, dense):
                mine, theirs = loaded(images, keep_stages=False), reference(images, keep_stages=False)
            assert torch.equal(mine.logits, theirs.logits), dense
            assert torch.equal(mine.stats["tokens_per_stage"], theirs.stats["tokens_per_stage"]), dense
    with pytest.raises(CheckpointError, match="not a folder"):
        Segmentor.from_pretrained(tmp_path / "missing")
    again = loaded.save_pretrained(tmp_path / "again")  # a loaded model saves the same artifact
    assert json.loads((again / "config.json").read_text()) == config


def test_configs_may_only_name_model_callables() -> None:
    for bad in (
        "os.system",
        "dtop.models.vit.os.system",
        "dtop.checkpoint.read_checkpoint",
        "torch.load",
        "builtins.eval",
    ):
        with pytest.raises(ConfigError, match="not allowed|not a class or function"):
            locate(bad)
    head = instantiate({"_target_": "dtop.models.heads.fcn.FCNHead", "_partial_": True, "channels": None})
    assert head.func is FCNHead and head(in_channels=4, num_classes=2).cls.in_features == 4
    assert isinstance(
        instantiate({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}), torch.nn.Linear
    )
    with pytest.raises(ConfigError, match="not supported"):
        instantiate({"_target_": "torch.nn.Identity", "_recursive_": False})


def tiny_model(policy: DoViT | DToP) -> Segmentor:
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_tiny_patch16_224", img_size=(64, 64), depth=4)
    return build_segmentor(backbone, partial(FCNHead, channels=32), 8, partial(FCNHead, channels=None), [2, 3], policy)


@pytest.mark.parametrize(
    "policy",
    [DoViT(0.3), DoViT(0.3, grade_upsample=2), DToP(0.22, context="remove")],
    ids=["dovit", "dovit-upsampled-grading", "dtop-no-context"],
)
def test_fixed_capacity_makes_the_engines_decisions(policy: DoViT | DToP) -> None:
    """Given one image and the token counts the engine kept at ξ, the fixed-capacity computation keeps the very
    same tokens (the least confident ones), so the maps agree; without capacities it is the dense model."""
    model = tiny_model(policy).eval()
    x = torch.randn(1, 3, 60, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels, out = model.segment(x)
        tokens = out.stats["tokens_per_stage"][0].tolist()
        assert tokens[0] > tokens[1] >= tokens[2] >= 1  # the engine pruned, and kept something
        logits, static_labels, exits = StaticSegmentor(model, (60, 70), tokens[1:])(x)
        assert_reordered_close(logits, out.logits)
        assert torch.equal(static_labels, labels) and torch.equal(exits, out.stats["exit_stage"])
        with model.dense_mode():
            labels, out = model.segment(x)
        logits, static_labels, exits = StaticSegmentor(model, (60, 70))(x)
        assert_reordered_close(logits, out.logits)
        assert torch.equal(static_labels, labels) and bool((exits == 2).all())
    assert capacity_tokens([0.5, 0.6, 0.1], 20) == [10, 10, 2]
    with pytest.raises(ConfigError):
        capacity_tokens([0.0], 20)


def test_onnx_graphs_match_pytorch(run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt, out = run / "checkpoints" / "best.ckpt", tmp_path / "onnx"
    ok(cli("export", f"ckpt_path={ckpt}", "format=onnx", f"output={out}", "batch_size=2", cwd=tmp_path))
    description = json.loads((out / "export.json").read_text())
    measured = json.loads((run / "metrics.json").read_text())["keep_ratio_per_stage"]
    capacity = description["graphs"]["pruned"]["capacity"]
    assert capacity["ratios"] == measured[1:]  # the default: what the run measured at its ξ
    assert capacity["tokens"][-1] < description["patch_tokens"]  # the pruned graph prunes
    model, images = checkpoint_model(ckpt), val_images(2)
    references = {
        "dense": StaticSegmentor(model, (64, 64)),
        "pruned": StaticSegmentor(model, (64, 64), capacity["tokens"]),
    }
    with torch.no_grad(), model.dense_mode():
        dense_labels, dense_out = model.segment(images)
    for name, reference in references.items():
        graph = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        assert json.loads(graph.get_modelmeta().custom_metadata_map["dtop"])["graph"] == name
        logits, labels, exits = (torch.from_numpy(a) for a in graph.run(None, {"images": images.numpy()}))
        with torch.no_grad():
            ref_logits, ref_labels, ref_exits = reference(images)
        assert_reordered_close(logits, ref_logits)
        assert torch.equal(labels, ref_labels) and torch.equal(exits, ref_exits), name
        if name == "dense":  # and the dense graph is the model itself
            assert_reordered_close(logits, dense_out.logits)
            assert torch.equal(labels, dense_labels)


def test_onnx_export_of_an_exiting_policy(tmp_path: Path) -> None:
    """DToP's exits (logits scattered into the map at a stage end) run in onnxruntime as in PyTorch."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module = StaticSegmentor(tiny_model(DToP(0.9)).eval(), (48, 80), [8, 5])
    path = export_onnx(module, tmp_path / "dtop.onnx")
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = module(x)
    assert_reordered_close(torch.from_numpy(got[0]), expected[0])
    assert all(torch.equal(torch.from_numpy(g), e) for g, e in zip(got[1:], expected[1:]))
    assert set(expected[2].unique().tolist()) == {0, 1, 2}  # tokens exited at both stages and reached the end
