"""Threshold sweeps: dtop-eval multirun + dtop.sweeps (scripts/collect_sweep.py), the budget-penalised sweep
objective, dtop-calibrate's choice of ξ, and the Optuna search config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dtop import sweeps
from dtop.cli.calibrate import choose, objective, penalized, run_calibration
from dtop.cli.common import CONFIG_PATH, build

REPO = Path(CONFIG_PATH).parent
DATA = ["data.val_size=8", "data.val_batch_size=4", "data.image_size=[64,64]"]


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    with initialize_config_dir(CONFIG_PATH, version_base="1.3"):
        yield


def _compose(name: str, overrides: list[str], **kwargs):
    return compose(name, overrides=overrides, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(hydra_context, tmp_path_factory) -> Path:
    """A dtop Lightning-style checkpoint of the default tiny model (untrained: enough to sweep ξ)."""
    cfg = _compose("train", DATA)
    torch.manual_seed(0)
    _, module = build(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def multirun(checkpoint, tmp_path_factory):
    """dtop-eval -m over two thresholds through the CLI, started in the background (the other tests
    of this module run meanwhile; test_eval_multirun_and_collect_sweep waits for it)."""
    cwd = tmp_path_factory.mktemp("multirun")
    # untrained 8-class heads are barely above uniform (1/8): ξ = 0.13 prunes, ξ = 0.9 does not
    cmd = [
        sys.executable,
        "-m",
        "dtop.cli.evaluate",
        "-m",
        "model.pruning.threshold=0.13,0.9",
        f"ckpt_path={checkpoint}",
        *DATA,
        "eval_dense=true",
        "callbacks=[eval,dashboard]",
        "callbacks.dashboard.max_images=1",
        "hydra.sweep.dir=sweep",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"},
    )
    yield cwd, proc, cmd
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_objective_penalises_runs_over_the_gmacs_budget(multirun):
    # (requesting multirun starts the CLI sweep now, so it runs while the in-process tests do)
    metrics = {"mIoU": 47.0, "gmacs": 90.0, "gmacs_linear": 70.0, "dense": {"mIoU": 48.0}}
    assert objective(metrics, {}) == 47.0  # no budget: the plain mIoU (dtop-eval's default return)
    assert objective(metrics, {"gmacs_budget": 100}) == 47.0
    over = objective(metrics, {"gmacs_budget": 80})
    assert over < 0 and over == pytest.approx(-100 * (90 / 80 - 1))
    assert objective(metrics, {"gmacs_budget": 80, "gmacs_metric": "gmacs_linear"}) == 47.0
    assert objective(metrics, {"optimized_metric": "dense.mIoU"}) == 48.0
    # further over budget is worse, and every over-budget value is below any feasible one
    assert penalized(0.0, 81, 80) > penalized(0.0, 95, 80) and penalized(0.0, 81, 80) < 0.0 <= penalized(0.0, 80, 80)
    assert penalized(30.0, math.nan, 80) < 0
    with pytest.raises(KeyError):
        objective(metrics, {"optimized_metric": "nope"})


def test_collect_sweep_groups_other_swept_overrides(tmp_path):
    for job, (xi, layers, miou, gm) in enumerate(
        [
            (0.9, "[4,6]", 40.0, 80.0),
            (0.95, "[4,6]", 41.0, 85.0),
            (0.9, "[2,6]", 38.0, 70.0),
            (0.95, "[2,6]", 39.0, 75.0),
        ]
    ):
        run = tmp_path / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(
            f"- model.pruning.threshold={xi}\n- model.prune_layers={layers}\n- ckpt_path=x.ckpt\n"
        )
        (run / "metrics.json").write_text(
            json.dumps(
                {
                    "threshold": [xi],
                    "mIoU": miou,
                    "gmacs": gm,
                    "gmacs_linear": gm - 5,
                    "gmacs_dense": 100.0,
                    "keep_ratio_per_stage": [1.0, 0.8, 0.6],
                    "config": {"model": {"prune_layers": json.loads(layers)}},
                }
            )
        )
    cs = sweeps
    table = cs.collect(tmp_path)
    assert list(table["threshold"]) == [0.95, 0.95, 0.9, 0.9]
    assert "override:model.prune_layers" in table and "override:ckpt_path" not in table
    assert cs.varied_columns(table)[0] == "override:model.prune_layers"
    cs.write(table, tmp_path / "out", gmacs="gmacs_linear")
    assert (tmp_path / "out" / "sweep.png").exists()


def test_choose_threshold_rules():
    table = pd.DataFrame(
        {
            "threshold": [0.7, 0.8, 0.9, 0.95, 1.0],
            "xi_min": [0.7, 0.8, 0.9, 0.95, 1.0],
            "mIoU": [44.0, 46.5, 47.2, 47.6, 47.7],
            "drop": [3.7, 1.2, 0.5, 0.1, 0.0],
            "gmacs_target": [70.0, 75.0, 80.0, 90.0, 107.0],
        }
    )
    assert choose(table.copy(), max_drop=1.0, gmacs_budget=None)["threshold"] == 0.9  # lowest ξ within 1 point
    assert choose(table.copy(), max_drop=0.2, gmacs_budget=None)["threshold"] == 0.95
    assert choose(table.copy(), max_drop=None, gmacs_budget=85.0)["threshold"] == 0.9  # best mIoU within budget
    assert choose(table.copy(), max_drop=1.0, gmacs_budget=78.0) is None
    marked = table.copy()
    choose(marked, max_drop=1.0, gmacs_budget=None)
    assert list(marked["feasible"]) == [False, False, True, True, True] and marked["chosen"].sum() == 1
    with pytest.raises(ValueError):
        choose(table.copy(), None, None)


def test_calibrate_loads_once_and_writes_the_table(tmp_path, checkpoint):
    cfg = _compose(
        "calibrate",
        [
            f"ckpt_path={checkpoint}",
            *DATA,
            "calibrate.max_images=6",
            "calibrate.thresholds=[0.13,0.3,[0.13,1.0],0.9]",
            "calibrate.max_drop=100",
            f"paths.output_dir={tmp_path}",
            f"paths.root_dir={tmp_path}",
        ],
    )
    result = run_calibration(cfg)
    assert result["images"] == 6
    table = pd.read_csv(tmp_path / "calibration.csv")
    assert [str(t) for t in table["threshold"]] == ["0.13", "0.3", "0.13/1", "0.9"]
    assert {"mIoU", "drop", "gmacs", "gmacs_linear", "saving", "keep_s0", "feasible", "chosen"} <= set(table)
    # every candidate is within a 100-point drop: the lowest ξ wins
    assert result["chosen_threshold"] == 0.13 and table["chosen"].sum() == 1
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["chosen_threshold"] == 0.13 and len(saved["table"]) == 4 and "dense" in saved
    assert (tmp_path / "calibration.png").exists()
    # ξ = 0.13 removes tokens, ξ = 0.9 does not
    assert table.loc[0, "keep_s2"] < 1.0 == table.loc[3, "keep_s2"]


def test_optuna_search_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    for name, stages, key in (("dtop_optuna", 2, "gmacs"), ("dovit_optuna", 3, "gmacs_linear")):
        model = "dtop_fcn_tiny" if stages == 2 else "dovit_fcn_tiny"
        cfg = _compose(
            "eval",
            [f"hparams_search={name}", f"model={model}", "ckpt_path=x", "gmacs_budget=80"],
            return_hydra_config=True,
        )
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert sorted(cfg.hydra.sweeper.params) == [f"search.xi_s{s}" for s in range(stages)]
        assert cfg.optimized_metric == "mIoU" and cfg.gmacs_budget == 80 and cfg.gmacs_metric == key
        cfg.search.xi_s0 = 0.85
        assert OmegaConf.to_container(cfg.model.pruning, resolve=True)["threshold"][:2] == [0.85, 0.95]
        # without a budget the search refuses to start (the study name needs it)
        bare = _compose("eval", [f"hparams_search={name}", "ckpt_path=x"], return_hydra_config=True)
        with pytest.raises(Exception, match="gmacs_budget"):
            OmegaConf.to_container(bare.hydra.sweeper, resolve=True, throw_on_missing=True)


def test_eval_multirun_and_collect_sweep(multirun):
    tmp_path, proc, cmd = multirun
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-4000:]}"
    sweep = tmp_path / "sweep"
    runs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert runs == ["0", "1"]
    for job, xi in (("0", 0.13), ("1", 0.9)):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert m["threshold"] == [xi]
        assert {"mIoU", "gmacs", "keep_ratio_per_stage", "dense"} <= set(m)
        assert len(m["keep_ratio_per_stage"]) == 3

    cs = sweeps
    table = cs.main([str(sweep)])
    assert sorted(table["threshold"]) == [0.13, 0.9]
    assert {"mIoU", "gmacs", "gmacs_linear", "gmacs_dense", "dense_mIoU", "keep_s0", "keep_s1", "keep_s2"} <= set(table)
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (sweep / name).stat().st_size > 0
    csv = pd.read_csv(sweep / "sweep.csv")
    assert len(csv) == 2 and (csv["keep_s0"] == 1.0).all()
    assert "| threshold | mIoU |" in (sweep / "sweep.md").read_text()
    sparse, dense = (table.set_index("threshold").loc[x] for x in (0.13, 0.9))
    assert sparse["keep_s2"] < 1.0 and sparse["gmacs"] < dense["gmacs"]
    # the dashboard collected the same sweep as it went
    dash = pd.read_csv(sweep / "dashboard_sweep.csv")
    assert sorted(dash["threshold"]) == [0.13, 0.9] and (sweep / "dashboard_sweep.png").exists()
    assert (sweep / "0" / "dashboard" / "test" / "summary.json").exists()
    assert (sweep / "0" / "dashboard" / "test_dense" / "summary.json").exists()
