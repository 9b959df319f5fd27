"""Bad input gets one clear message and exit code 2 from every command, never a buried traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from dtop.checkpoint import atomic_save
from dtop.cli.common import CONFIG_PATH, cli, known_error, make_trainer
from dtop.errors import ConfigError, DatasetLayoutError
from tests.test_datasets import make_ade, write_label

SMALL = [
    "logger=csv",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.crop_size=[32,32]",
    "data.stride=[16,16]",
    "data.scale=[40,60]",
    "trainer.max_steps=2",
    "model.backbone.depth=4",
    "model.prune_layers=[2,3]",
]


def run(module: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    module = {"eval": "evaluate"}.get(module, module)
    return subprocess.run(
        [sys.executable, "-m", f"dtop.cli.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def one_message(proc: subprocess.CompletedProcess, kind: str, *parts: str) -> str:
    """The process failed with exit code 2 and printed ``kind: ...`` holding every part, without a traceback."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and f"{kind}: " in err, err[-3000:]
    message = err[err.index(f"{kind}: ") :]
    for part in parts:
        assert part in message, (part, message)
    return message


def test_missing_dataset_and_wrong_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dtop.cli.evaluate import evaluate
    from dtop.cli.train import train

    proc = run("train", "data=ade20k", f"data.root={tmp_path / 'nowhere'}", *SMALL, cwd=tmp_path)
    one_message(
        proc,
        "DatasetLayoutError",
        f"root {tmp_path / 'nowhere'} does not exist",
        "images/{training,validation}",
        "data.root=<path>",
    )
    root = make_ade(tmp_path / "ade")
    shutil.rmtree(root / "annotations" / "validation")
    err = in_process(train, compose_cfg("train", tmp_path, "data=ade20k", f"data.root={root}", *SMALL), capsys)
    assert f"DatasetLayoutError: missing folder {root / 'annotations' / 'validation'}" in err
    err = in_process(evaluate, compose_cfg("eval", tmp_path, "ckpt_path=x.ckpt"), capsys)
    assert "CheckpointError: Checkpoint not found: x.ckpt" in err


def compose_cfg(name: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        return compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def in_process(task, cfg, capsys: pytest.CaptureFixture) -> str:
    """Run a CLI task in this process: it must exit with code 2 and one message on stderr."""
    with pytest.raises(SystemExit) as stop:
        cli(task)(cfg)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    return err


def test_dataset_checked_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dtop.cli.train import train

    root = make_ade(tmp_path / "ade")
    write_label(root / "annotations" / "validation" / "ADE_valid_00000001.png", [0, 1, 200])
    cfg = compose_cfg("train", tmp_path, "data=ade20k", f"data.root={root}", *SMALL)
    err = in_process(train, cfg, capsys)
    assert "DatasetLayoutError: " in err and "ADE_valid_00000001.png: label values [199]" in err
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before any step
    make_ade(root)
    Image.new("L", (61, 40)).save(root / "annotations" / "validation" / "ADE_valid_00000000.png")
    err = in_process(train, compose_cfg("train", tmp_path, "data=ade20k", f"data.root={root}", *SMALL), capsys)
    assert "ADE_valid_00000000.jpg is 60x40 but label" in err and "is 61x40" in err


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("model.pruning.threshold=1.5", ["ConfigError: model.pruning", "threshold ξ must lie in [0, 1]"]),
        ("model.prune_layers=[3,1]", ["prune_layers must be strictly increasing", "got [3, 1]"]),
        ("model.prune_layers=[1,8]", ["in [1, 7] for a 8-layer backbone"]),
        ("model.pruning.context=nearest", ["Unknown context policy 'nearest'"]),
    ],
)
def test_invalid_settings_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, override: str, parts: list[str]
) -> None:
    from dtop.cli.train import train

    err = in_process(train, compose_cfg("train", tmp_path, override), capsys)
    assert all(part in err for part in parts), err


def test_config_error_from_the_command_line(tmp_path: Path) -> None:
    one_message(run("train", "model.pruning.threshold=-1", cwd=tmp_path), "ConfigError", "threshold ξ must lie")


def test_bad_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dtop.cli import bench, calibrate, evaluate, train

    truncated = tmp_path / "truncated.ckpt"
    atomic_save({"state_dict": {"model.x": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    one_message(
        run("train", f"ckpt_path={truncated}", cwd=tmp_path),
        "CheckpointError",
        f"Checkpoint {truncated} is unreadable or truncated",
    )
    for name, task in (("eval", evaluate.evaluate), ("calibrate", calibrate.calibrate), ("bench", bench.run)):
        err = in_process(task, compose_cfg(name, tmp_path, f"ckpt_path={truncated}"), capsys)
        assert f"CheckpointError: Checkpoint {truncated} is unreadable or truncated" in err, name
    for key in ("module.init_ckpt", "module.teacher_ckpt"):
        cfg = compose_cfg("train", tmp_path, f"{key}={truncated}", "module.kl_weight=1")
        assert "unreadable or truncated" in in_process(train.train, cfg, capsys), key


@pytest.fixture(scope="module")
def dtop_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("ckpt")
    proc = run(
        "train",
        "logger=csv",
        "data.train_size=8",
        "data.val_size=4",
        "data.batch_size=4",
        "data.image_size=[64,64]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "test=false",
        "hydra.run.dir=run",
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run" / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_model_names_both_configs(
    tmp_path: Path, dtop_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    proc = run("eval", "experiment=synthetic_dovit", f"ckpt_path={dtop_checkpoint}", cwd=tmp_path)
    one_message(
        proc,
        "CheckpointError",
        "does not fit the configured model (experiment=synthetic_dovit",
        "The checkpoint was trained with experiment=none (backbone vit_tiny_patch16_224",
        "Leave out experiment= and model=",
    )
    from dtop.cli.train import train

    cfg = compose_cfg("train", tmp_path, "experiment=synthetic_dovit", f"ckpt_path={dtop_checkpoint}")
    assert "CheckpointError: " in in_process(train, cfg, capsys)


def test_pretrained_weights_offline(tmp_path: Path) -> None:
    proc = run(
        "train", "model.backbone.pretrained=true", cwd=tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")
    )
    one_message(
        proc,
        "WeightsError",
        "model.backbone.pretrained=true needs timm's 'vit_tiny_patch16_224' weights",
        "model.backbone.weights=<file>",
        "model.backbone.pretrained=false",
    )


def test_worker_errors_come_out_as_their_own_message() -> None:
    try:
        raise DatasetLayoutError(
            "Caught DatasetLayoutError in DataLoader worker process 1.\nOriginal Traceback "
            "(most recent call last):\n  File x\ndtop.errors.DatasetLayoutError: a.png: bad"
        )
    except DatasetLayoutError as err:
        known = known_error(err)
    assert isinstance(known, DatasetLayoutError)
    from dtop.cli.common import _message

    assert _message(known) == "a.png: bad"
    assert known_error(RuntimeError("a bug")) is None and isinstance(known_error(ConfigError("x")), ConfigError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without a GPU")
def test_gpu_trainer_without_a_gpu_falls_back_to_the_cpu() -> None:
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "trainer=gpu",
                "logger=none",
                "callbacks=none",
                "trainer.default_root_dir=/tmp/dtop-gpu-fallback",
            ],
        )
    trainer = make_trainer(cfg)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator" and trainer.precision == "32-true"


def test_cpu_trainer_on_a_machine_with_a_gpu_says_how_to_use_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        overrides = ["ckpt_path=x.ckpt", "logger=none", "callbacks=none", "trainer.default_root_dir=/tmp/dtop-cpu"]
        cfg = compose("eval", overrides=overrides)
    with caplog.at_level("WARNING", logger="dtop"):
        trainer = make_trainer(cfg)
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert "Add trainer=gpu" in caplog.text
