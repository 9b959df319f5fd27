"""notebooks/token_counts.ipynb runs top to bottom on the output of a tiny default run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtop.cli.common import CONFIG_PATH

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(CONFIG_PATH).parent
NOTEBOOK = REPO / "notebooks" / "token_counts.ipynb"


def _fake_sweep(root: Path) -> Path:
    """A two-run multirun dir as dtop-eval -m writes it (metrics.json per job)."""
    for job, (xi, miou, gm) in enumerate([(0.9, 40.0, 0.20), (0.98, 41.0, 0.24)]):
        run = root / str(job)
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(
            json.dumps(
                {
                    "threshold": [xi],
                    "mIoU": miou,
                    "gmacs": gm,
                    "gmacs_linear": gm * 0.9,
                    "gmacs_dense": 0.26,
                    "keep_ratio_per_stage": [1.0, 0.7, 0.5],
                    "dense": {"mIoU": 41.2, "gmacs": 0.26},
                }
            )
        )
    return root


def test_notebook_runs_on_a_tiny_default_run(tmp_path, monkeypatch):
    cmd = [
        sys.executable,
        "-m",
        "dtop.cli.train",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "data.train_size=32",
        "data.val_size=8",
        "logger=csv",
        # smaller still, for a fast test
        "data.batch_size=8",
        "data.val_batch_size=8",
        "data.image_size=[64,64]",
        "callbacks.dashboard.max_images=2",
    ]
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = next((tmp_path / "logs" / "train" / "runs").iterdir())
    assert (run / "per_image.parquet").exists() and list((run / "dashboard" / "val" / "exit_maps").glob("*.png"))

    monkeypatch.setenv("DTOP_RUN_DIRS", str(run))
    monkeypatch.setenv("DTOP_SWEEP_DIR", str(_fake_sweep(tmp_path / "sweep")))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(run) in text and "exit maps shown" in text and "No sweep dir" not in text
    assert "per_image.parquet (all images)" in text  # exit stage per class from the parquet's exits_s*.<class> columns
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    # tokens per stage, GMACs, exit stage per class, 2 exit maps, the sweep curve
    assert len(figures) >= 6
