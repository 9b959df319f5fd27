"""A trained checkpoint on its own: dtop-eval reproduces its run's metrics with no experiment=, dtop-predict
segments a folder of user images (PNG/JPEG, mixed sizes, grayscale, RGBA), bad input is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from dtop.cli.common import CONFIG_PATH, cli
from dtop.cli.predict import predict
from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD
from dtop.data.synthetic import PALETTE, render_scene
from dtop.viz import stage_colors
from tests.test_cli import cli as run_cli
from tests.test_cli import newest_run, ok
from tests.trained_run import checkpoint_model, tiny_dovit_run

# name → (size, PIL mode, suffix): mixed sizes, a JPEG, grayscale, RGBA, and two of one size (one batch)
IMAGES = {
    "a": ((64, 64), "RGB", ".png"),
    "b": ((48, 80), "RGB", ".jpg"),
    "sub/gray": ((40, 90), "L", ".png"),
    "sub/rgba": ((64, 64), "RGBA", ".png"),
    "sub/c": ((64, 64), "RGB", ".png"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dovit_run(tmp_path_factory)


def scene(size: tuple[int, int], index: int) -> np.ndarray:
    """A synthetic street scene as uint8 RGB [H, W, 3], something the tiny model has seen the like of."""
    rgb, _ = render_scene(7, index, *size)
    return (rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def write_images(folder: Path) -> None:
    for i, (name, (size, mode, suffix)) in enumerate(IMAGES.items()):
        path = folder / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(size, i)).convert(mode).save(path)


def test_eval_reproduces_the_runs_metrics_from_the_checkpoint_alone(run: Path, tmp_path: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["keep_ratio_per_stage"][-1] < 1  # the run prunes: pruned and dense metrics differ
    ok(run_cli("evaluate", f"ckpt_path={metrics['checkpoint']}", "eval_dense=true", cwd=tmp_path))
    again = json.loads((newest_run(tmp_path, "eval") / "metrics.json").read_text())
    for key in ("mIoU", "aAcc", "mAcc", "images", "gmacs", "gmacs_linear", "tokens_per_stage", "keep_ratio_per_stage"):
        assert again[key] == metrics[key], key
    assert again["dense"] == metrics["dense"] and again["threshold"] == [0.3]


def test_predict_writes_labels_overlays_exits_and_a_table(run: Path, tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images)
    ckpt = run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={ckpt}", f"input={images}", f"output={out}", "model.pruning.threshold=0.5", "batch_size=2"]
    ok(run_cli("predict", *args, cwd=tmp_path))

    table = pd.read_parquet(out / "predictions.parquet")
    summary = json.loads((out / "predictions.json").read_text())
    assert sorted(table["image_id"]) == sorted(IMAGES) and len(summary["images"]) == len(IMAGES)
    assert summary["threshold"] == [0.5] and summary["device"] == "cpu" and summary["data"]["class_names"][0] == "road"
    for name, ((H, W), _, _) in IMAGES.items():
        labels = Image.open(out / "labels" / f"{name}.png")
        exits = Image.open(out / "exits" / f"{name}.png")
        overlay = Image.open(out / "overlays" / f"{name}.png")
        assert labels.mode == "P" and exits.mode == "P" and overlay.mode == "RGB"
        assert labels.size == exits.size == overlay.size == (W, H)
        assert labels.getpalette()[:24] == [c for rgb in PALETTE for c in rgb]
        assert exits.getpalette()[:9] == stage_colors(3).reshape(-1).tolist()
        assert np.array(labels).max() < 8 and np.array(exits).max() < 3
        row = table.set_index("image_id").loc[name]
        assert row["tokens_s0"] == -(-H // 16) * -(-W // 16) and row["windows"] == 1
        assert row["tokens_s0"] >= row["tokens_s1"] >= row["tokens_s2"] and row["ms"] > 0
        assert row["gmacs"] > 0 and row["gmacs_dense"] > 0 and (row["height"], row["width"]) == (H, W)

    # the 64×64 RGB image, segmented in Python at the same ξ: the same labels and tokens as the command
    model = checkpoint_model(ckpt)
    model.pruning.set_threshold(0.5)
    rgb = torch.from_numpy(np.array(Image.open(images / "a.png"))).permute(2, 0, 1).float() / 255
    x = ((rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]
    with torch.no_grad():
        labels, result = model.segment(x)
    assert np.array_equal(np.array(Image.open(out / "labels" / "a.png")), labels[0].numpy())
    row = table.set_index("image_id").loc["a"]
    assert [row[f"tokens_s{s}"] for s in range(3)] == result.stats["tokens_per_stage"][0].tolist()


@pytest.mark.parametrize("kind", ["no images", "unreadable image"])
def test_bad_input_is_one_clear_error(run: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    if kind == "no images":
        spec, message = str(folder / "*.jpg"), "names no image"
    else:
        Image.fromarray(scene((32, 32), 0)).save(folder / "good.png")
        (folder / "broken.png").write_bytes(b"not an image")
        spec, message = str(folder), "Cannot read image"
    overrides = [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"input={spec}", f"output={tmp_path / 'out'}"]
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        cfg = compose("predict", overrides=overrides)
    with pytest.raises(SystemExit) as exit_:
        cli(predict)(cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "ImageInputError" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
