"""One tiny DoViT run on the synthetic data, trained once per test process for every test that needs a trained
checkpoint (predict, export): ξ = 0.3 so that its evaluation really prunes (keep ratios below 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtop.checkpoint import load_model_weights, read_checkpoint, run_config
from dtop.models.engine import Segmentor
from dtop.models.hub import instantiate, portable_model_config
from tests.test_cli import cli, newest_run, ok

TINY_DOVIT = [
    "experiment=synthetic_dovit",
    "logger=csv",
    "data.train_size=8",
    "data.val_size=4",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.image_size=[64,64]",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "model.backbone.depth=4",
    "model.prune_layers=[2,3]",
    "model.pruning.threshold=0.3",
]
_runs: dict[str, Path] = {}


def tiny_dovit_run(factory: pytest.TempPathFactory) -> Path:
    """The run folder (``checkpoints/best.ckpt``, ``metrics.json``) of the shared tiny DoViT training."""
    if "dovit" not in _runs:
        root = factory.mktemp("tiny_dovit")
        ok(cli("train", *TINY_DOVIT, cwd=root))
        _runs["dovit"] = newest_run(root, "train")
    return _runs["dovit"]


def checkpoint_model(path: Path) -> Segmentor:
    """The checkpoint's segmentor built from its stored config (eval mode), the reference for exports."""
    ckpt = read_checkpoint(path)
    model = instantiate(portable_model_config(run_config(ckpt)["model"]))
    load_model_weights(model, path, ckpt=ckpt)
    return model.eval()
