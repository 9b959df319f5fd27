"""The user's commands end to end: config groups, train → eval round trip, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from dtop.checkpoint import CheckpointError, load_model_weights
from dtop.cli.common import CONFIG_PATH, checkpoint_overrides
from dtop.models.vit import ViTBackbone, WeightsError

TINY = [
    "logger=csv",
    "data.train_size=32",
    "data.val_size=8",
    "data.batch_size=8",
    "data.val_batch_size=4",
    "data.image_size=[64,64]",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "model.backbone.depth=4",
    "model.prune_layers=[2,3]",
]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"dtop.cli.{module}", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def newest_run(root: Path, task: str) -> Path:
    return sorted((root / "logs" / task / "runs").iterdir())[-1]


GROUP_EXTRAS = {"experiment": ["++teacher_ckpt=x", "++init_ckpt=x"], "regime": ["++init_ckpt=x"]}


@pytest.mark.parametrize(
    "group",
    ["data", "model", "module", "trainer", "logger", "callbacks", "paths", "hydra", "debug", "experiment", "regime"],
)
def test_every_option_of_every_group_composes(group):
    options = sorted(p.stem for p in (Path(CONFIG_PATH) / group).glob("*.yaml"))
    assert options
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        for option in options:
            override = f"hydra={option}" if group == "hydra" else f"{group}={option}"
            extras = [e for e in GROUP_EXTRAS.get(group, [])]
            cfg = compose("train", overrides=[override, *extras], return_hydra_config=group == "hydra")
            assert "model" in cfg and "data" in cfg, option
            for node in ("model", "data", "module"):  # every interpolation resolves (trainer needs the run dir)
                OmegaConf.to_container(cfg[node], resolve=True)


def test_wrong_key_and_missing_value_are_hydra_errors(tmp_path):
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose("train", overrides=["model.no_such_key=1"])
        cfg = compose("eval")
        with pytest.raises(MissingMandatoryValue):
            _ = cfg.ckpt_path
    proc = cli("train", "trainer.max_stepz=3", cwd=tmp_path)
    assert proc.returncode != 0 and "max_stepz" in proc.stderr and "Traceback" not in proc.stderr


def test_train_eval_round_trip_and_resume(tmp_path):
    out = ok(cli("train", *TINY, cwd=tmp_path)).stdout
    run = newest_run(tmp_path, "train")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "mIoU",
        "aAcc",
        "mAcc",
        "images",
        "gmacs",
        "gmacs_linear",
        "gmacs_dense",
        "gmacs_linear_dense",
        "tokens_per_stage",
        "keep_ratio_per_stage",
        "config",
        "dense",
    ):
        assert key in metrics, key
    assert metrics["images"] == 8 and metrics["config"]["trainer"]["max_steps"] == 4
    assert "pruned" in out and "dense" in out  # the closing summary table
    assert (run / "config.yaml").exists()
    table = pd.read_parquet(run / "per_image.parquet")
    assert len(table) == 8 and {"image_id", "tokens_s0", "exits_s0", "gmacs", "gmacs_linear", "pixel_acc"} <= set(table)
    names = ["road", "sidewalk", "building", "vegetation", "sky", "car", "pole", "sign"]
    assert list(metrics["per_class"]["IoU"]) == names and list(metrics["dense"]["per_class"]["Acc"]) == names
    assert {f"exits_s{s}.{n}" for s in range(3) for n in names} <= set(table)
    json.loads((run / "metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN

    evaluated = metrics["checkpoint"]  # the checkpoint dtop-train's own summary evaluated
    ok(cli("evaluate", *TINY, f"ckpt_path={evaluated}", "eval_dense=true", cwd=tmp_path))
    again = json.loads((newest_run(tmp_path, "eval") / "metrics.json").read_text())
    for key in ("mIoU", "aAcc", "mAcc", "images", "gmacs", "gmacs_linear", "tokens_per_stage"):
        assert again[key] == metrics[key], key
    assert again["dense"] == metrics["dense"]
    flops = json.loads(ok(cli("flops", *TINY, f"ckpt_path={evaluated}", cwd=tmp_path)).stdout.strip().splitlines()[-1])
    assert flops["pruned_gmacs"] == metrics["gmacs"] and flops["pruned_images"] == 8
    assert flops["gmacs"] == metrics["dense"]["gmacs"]  # analytic dense = measured dense forward

    ckpt = run / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert first["global_step"] == 4 and first["dtop"]["model"]["prune_layers"] == [2, 3]
    ok(cli("train", "trainer.max_steps=6", f"ckpt_path={ckpt}", cwd=tmp_path))  # its own config: no TINY needed
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # resumed in place
    assert state["global_step"] == 6
    assert state["lr_schedulers"][0]["last_epoch"] == 6


def test_bad_checkpoint_and_weights_give_one_clear_error(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_model_weights(model, bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_model_weights(model, tmp_path / "missing.ckpt")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="Could not read"):
        ViTBackbone("vit_tiny_patch16_224", img_size=32, depth=1, weights=str(weights))
    proc = cli("evaluate", *TINY, f"ckpt_path={bad}", cwd=tmp_path)
    assert proc.returncode != 0 and "unreadable or truncated" in proc.stderr


def test_flops_prints_json_last_line(tmp_path):
    proc = ok(
        cli(
            "flops",
            "input_size=[512,512]",
            "model.backbone.name=vit_base_patch16_224",
            "~model.backbone.depth",
            "data.num_classes=150",
            "model.prune_layers=[6,8]",
            cwd=tmp_path,
        )
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["gmacs"] == pytest.approx(107.27, abs=0.01)  # SETR ViT-B 512²: DToP Table 7 says 107.7 G
    assert result["gmacs_linear"] < result["gmacs"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: pure-bf16 inference copy, autocast training
def test_bench_runs_on_cpu(tmp_path, dtype):
    proc = ok(
        cli(
            "bench",
            "input_size=[128,128]",
            "model.backbone.depth=4",
            "model.prune_layers=[2,3]",
            "model.pruning.k=1",  # 64 tokens per image: top-5 of ~8 synthetic classes would keep them all
            "batch_size=2",
            "iters=2",
            "warmup=1",
            "keep=[0.6,0.4]",
            f"dtype={dtype}",
            cwd=tmp_path,
        )
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    inf = result["inference"]
    assert inf["gmacs_ratio"] < 0.9 and inf["efficiency"] > 0 and "train" in result
    # the headline runs the configured policy: real grading and top-k context on synthetic grades
    assert result["policy"] == "DToP" and result["context"] == "topk" and result["decisions"].startswith("synthetic")
    kept = inf["keep_ratio_per_stage"]
    assert kept[0] == 1.0 and 0.4 <= kept[1] < 1.0 and kept[2] < kept[1]  # ~0.6 ± 0.2 per image, plus context
    assert inf["recorded_pruned_ms"] > 0  # the ablation column: the same keep sets without grading
    assert inf["forward_efficiency"] == pytest.approx(
        inf["gmacs_ratio"] * inf["forward_dense_ms"] / inf["forward_pruned_ms"]
    )
    assert result["train"]["speedup"] > 0 and result["precision"] == "pure"
    saved = json.loads((newest_run(tmp_path, "bench") / "bench.json").read_text(), parse_constant=pytest.fail)
    assert saved["batch_size"] == 2 and saved["inference"]["dense_peak_mib"] is None  # no NaN on the CPU


@pytest.mark.skipif(
    not (SHARED / "data" / "camvid").is_dir() or not (SHARED / "weights").is_dir(),
    reason="../shared/data/camvid and ../shared/weights are not present",
)
def test_camvid_experiments_run_a_few_steps(tmp_path):
    """Each camvid_* experiment composes and trains 2 steps on the real data: dense → DToP finetune, DoViT."""
    common = [
        "trainer=default",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.crop_size=[140,196]",
        "data.stride=[98,98]",
        "logger=csv",
        "test=false",
        f"data.root={SHARED / 'data' / 'camvid'}",
        f"model.backbone.weights={SHARED / 'weights' / 'dinov2_vits14.safetensors'}",
        "+trainer.limit_val_batches=2",
    ]
    ok(cli("train", "experiment=camvid_dense_fcn", *common, cwd=tmp_path))
    dense = newest_run(tmp_path, "train") / "checkpoints" / "last.ckpt"
    ok(cli("train", "experiment=camvid_dtop_fcn", f"module.init_ckpt={dense}", *common, cwd=tmp_path))
    ok(cli("train", "experiment=camvid_dovit_fcn", f"teacher_ckpt={dense}", *common, cwd=tmp_path))
    assert len(list((tmp_path / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))) == 3


def test_progress_bar_and_model_summary_speak_of_steps_and_gmacs(capsys) -> None:
    from types import SimpleNamespace

    from dtop.lit.progress import SegModelSummary, SegProgressBar

    bar = SegProgressBar()
    bar._trainer = SimpleNamespace(max_steps=640, global_step=20, max_epochs=-1)
    assert bar._get_train_description(19).strip() == "step 20/640 · epoch 19"
    SegModelSummary.summarize(
        [
            (" ", ["0"]),
            ("Name", ["model"]),
            ("Type", ["Segmentor"]),
            ("Params", ["3.9 M"]),
            ("Mode", ["train"]),
            ("FLOPs", ["0"]),
        ],
        10,
        10,
        0.1,
        {"train": 1, "eval": 0},
        0,
    )
    out = capsys.readouterr().out
    assert "Segmentor" in out and "FLOPs" not in out


def test_checkpoint_commands_accept_keys_of_the_checkpoint_config():
    """``dtop-eval ckpt_path=X data.root=...``: the default data (synthetic) has no ``root``, the checkpoint's has."""
    args = ["ckpt_path=a.ckpt", "data.root=/d", "model.pruning.threshold=0.9,0.95", "+data.x=1", "seed=3", "-m"]
    assert checkpoint_overrides(args) == [
        "ckpt_path=a.ckpt",
        "++data.root=/d",
        "++model.pruning.threshold=0.9,0.95",
        "+data.x=1",
        "seed=3",
        "-m",
    ]
    assert checkpoint_overrides(["data.root=/d"]) == ["data.root=/d"]  # no checkpoint: Hydra's own rules
    chosen = ["ckpt_path=a.ckpt", "experiment=camvid_dense_fcn", "data.root=/d"]
    assert checkpoint_overrides(chosen) == chosen  # an explicit experiment composes its own config


@pytest.mark.parametrize(
    "override,message",
    [
        ("decisions=model", "decisions must be 'synthetic' or 'recorded' without a checkpoint"),
        ("pool=0", "pool and batch_size must be at least 1"),
        ("synthetic_threshold=2", "synthetic_threshold must be in (0, 1]"),
    ],
)
def test_bench_bad_settings_give_one_message(tmp_path, override, message):
    proc = cli(
        "bench", "input_size=[64,64]", "model.backbone.depth=4", "model.prune_layers=[2,3]", override, cwd=tmp_path
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bench_times_a_dense_model(tmp_path):
    """No pruning stages: no grades to synthesise, the dense and 'pruned' runs are the same model."""
    args = ("input_size=[64,64]", "model.backbone.depth=4", "model.prune_layers=[]", "keep=[]", "batch_size=2")
    proc = ok(cli("bench", *args, "iters=2", "warmup=1", "train_step=false", cwd=tmp_path))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["decisions"] == "none: a dense model" and result["inference"]["gmacs_ratio"] == pytest.approx(1.0)
