"""The one reader of dtop checkpoints: every path that loads one (eval, resume, init, teacher, bench,
calibrate) comes through here and fails with one :class:`CheckpointError` that says what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the configured model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}. Pass ckpt_path=<run dir>/checkpoints/last.ckpt or best.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - every read failure means the same to the user
        raise CheckpointError(f"Checkpoint {path} is unreadable or truncated ({type(err).__name__}: {err}). "
                              "Use another checkpoint (e.g. last.ckpt vs the best one) or re-train.") from err


def model_state(ckpt: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """The segmentor's weights from a Lightning checkpoint of :class:`SegModule`."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a dtop Lightning checkpoint (no 'state_dict').")
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def load_model_weights(model: nn.Module, ckpt_path: str | Path, skip_aux: bool = False) -> list[str]:
    """Load a checkpoint's segmentor weights; with ``skip_aux``, aux heads may differ (returns skipped keys).

    A distillation teacher and a fine-tuning start only need the backbone and decode head: their
    aux heads (e.g. DoViT's 1×1 heads at other layers than the dense model's) start fresh.
    """
    state = model_state(read_checkpoint(ckpt_path), ckpt_path)
    own = model.state_dict()
    skipped: list[str] = []
    if skip_aux:
        skipped = [k for k in set(state) | set(own) if k.startswith("aux_heads.")
                   and (k not in state or k not in own or state[k].shape != own[k].shape)]
        state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path} does not fit the configured model (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}). Compose the same model/experiment as at training "
                              "(see the run's .hydra/overrides.yaml).")
    return skipped
