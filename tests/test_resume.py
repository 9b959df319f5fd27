"""No lost work: Ctrl-C saves a resumable checkpoint, resuming reproduces the uninterrupted run bit for bit,
and a crash while a checkpoint is written leaves the previous one loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from dtop.data.sampler import EpochSeededRandomSampler, ResumableDataLoader, SeededSamples

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "logger=csv",
    "data.train_size=32",
    "data.val_size=8",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.image_size=[64,64]",
    "model.backbone.depth=4",
    "model.prune_layers=[2,3]",
    "model.backbone.drop_path_rate=0.2",  # the model's own randomness must resume exactly too
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "callbacks.dashboard.log_images=false",
]


class _Noisy(Dataset):
    """Each item draws from torch's global RNG, as the augmentations do."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)]) + torch.rand(1)


def test_loader_resumes_mid_epoch_with_the_same_samples_and_augmentations() -> None:
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(SeededSamples(_Noisy()), batch_size=2, sampler=EpochSeededRandomSampler(10, 3))

    whole = loader()
    whole.sampler.set_epoch(1)
    epoch = [b.clone() for b in whole]
    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    for i, batch in enumerate(interrupted):
        assert torch.equal(batch, epoch[i])
        if i == 2:
            state = interrupted.state_dict()
            break
    assert state == {"epoch": 1, "batches": 3}
    torch.rand(5)  # whatever else draws from the global RNG in between must not matter
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in epoch[3:]]
    assert [b.tolist() for b in resumed] == [b.tolist() for b in epoch]  # the next pass starts at the beginning


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dtop.cli.train", *TINY, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _result(run: Path) -> dict:
    """Every metric of a run, less what differs between two runs of the same computation (wall clock)."""

    def measured(d: dict) -> dict:
        timing = ("images_per_s", "images_per_s_wall")
        return {k: measured(v) if isinstance(v, dict) else v for k, v in d.items() if k not in timing}

    metrics = json.loads((run / "metrics.json").read_text())
    return measured({k: v for k, v in metrics.items() if k not in ("config", "checkpoint", "train_speed")})


@pytest.mark.slow
def test_interrupted_and_resumed_training_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = _train("hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    def interrupt_at(step: int) -> list[str]:
        return ["+callbacks.sigint._target_=tests.interrupt.SigintAt", f"+callbacks.sigint.step={step}"]

    run, last = tmp_path / "part", tmp_path / "part" / "checkpoints" / "last.ckpt"
    first = _train("hydra.run.dir=part", *interrupt_at(2), cwd=tmp_path)  # before the first validation
    assert first.returncode != 0 and f"Interrupted at step 3. Resumable checkpoint: {last}" in first.stdout
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    second = _train("hydra.run.dir=resume1", f"ckpt_path={last}", *interrupt_at(8), cwd=tmp_path)
    assert second.returncode != 0 and "Interrupted at step 9" in second.stdout, second.stderr[-3000:]
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 9  # 8 batches per epoch: the second epoch (1) had handed out one batch
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    third = _train("hydra.run.dir=resume2", f"ckpt_path={last}", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]

    assert _result(run) == _result(tmp_path / "whole")  # every metric, pruned and dense, per class
    for name in ("best.ckpt", "last.ckpt"):
        a, b = (
            torch.load(r / "checkpoints" / name, map_location="cpu", weights_only=False)
            for r in (tmp_path / "whole", run)
        )
        assert a["global_step"] == b["global_step"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
    assert state["lr_schedulers"][0]["last_epoch"] == 9

    finished = _train("hydra.run.dir=again", f"ckpt_path={last}", cwd=tmp_path)
    assert finished.returncode == 2 and "finished its training (step 12 of trainer.max_steps=12)" in finished.stderr
    assert "Traceback" not in finished.stderr


_WRITER = """
import os, sys, time, torch
from pathlib import Path
from dtop.checkpoint import atomic_save

path, marker = sys.argv[1], Path(sys.argv[2])
real_fsync = os.fsync

def hang(fd):  # the new file is fully written but not yet renamed: the worst moment to die
    marker.write_text("writing")
    time.sleep(60)

os.fsync = hang
atomic_save({"version": 2, "weights": torch.ones(1000)}, path)
"""


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path: Path) -> None:
    from dtop.checkpoint import atomic_save

    path, marker = tmp_path / "last.ckpt", tmp_path / "marker"
    atomic_save({"version": 1, "weights": torch.zeros(1000)}, path)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never got to its write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["version"] == 1 and torch.equal(ckpt["weights"], torch.zeros(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("last.ckpt", "marker")]
    assert all(name.startswith(".last.ckpt.") and name.endswith(".tmp") for name in leftovers)
