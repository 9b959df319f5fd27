"""The one reader and writer of dtop checkpoints.

Every path that loads one (evaluation, resume, ``init_ckpt``, ``teacher_ckpt``, bench, calibrate,
predict, export) comes through :func:`read_checkpoint` / :func:`load_model_weights` and fails with
one :class:`CheckpointError` that says what the checkpoint is and what to do. Every checkpoint
carries, under ``"dtop"``, the resolved model and data config it was trained with
(:func:`describe` names them), so a checkpoint is self-describing.

Writes are atomic (:func:`atomic_save`, which training uses through
:class:`~dtop.lit.checkpointing.AtomicCheckpointIO`): a crash while writing leaves the previous file
intact, never a truncated one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtop.errors import CheckpointError

KEY = "dtop"  # where a checkpoint keeps its config, the dtop version and the experiment name


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, or one clear :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint not found: {path}. Pass ckpt_path=<run dir>/checkpoints/last.ckpt (or best.ckpt)."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - every read failure means the same to the user
        raise CheckpointError(
            f"Checkpoint {path} is unreadable or truncated ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Use another checkpoint of the run (last.ckpt or best.ckpt) or re-train."
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a dtop checkpoint (no 'state_dict'): was it written by dtop-train?")
    return ckpt


def run_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint says about how it was made: ``version``, ``experiment``, ``model``, ``data`` configs
    (resolved) and ``overrides``; empty for checkpoints written before dtop stored it."""
    info = ckpt.get(KEY)
    return info if isinstance(info, dict) else {}


def describe_config(info: dict[str, Any]) -> str:
    """One line naming an experiment and its model and data (a checkpoint's :func:`run_config`, or a
    composed config's), for messages that set two of them side by side."""
    if not info:
        return "a checkpoint that does not record its config"
    model = info.get("model") or {}
    backbone = (model.get("backbone") or {}).get("name", "?")
    heads = "/".join(
        str((model.get(k) or {}).get("_target_", "?")).rsplit(".", 1)[-1] for k in ("decode_head", "aux_head")
    )
    policy = str((model.get("pruning") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    data = str((info.get("data") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    return (
        f"experiment={info.get('experiment') or 'none'} (backbone {backbone}, heads {heads}, "
        f"prune layers {model.get('prune_layers')}, {policy}; data {data}; {model.get('num_classes')} classes)"
    )


def describe(ckpt: dict[str, Any]) -> str:
    """:func:`describe_config` of what a checkpoint was trained with."""
    return describe_config(run_config(ckpt))


def model_state(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """The segmentor's weights from a checkpoint of :class:`~dtop.lit.module.SegModule`."""
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def check_fits(
    model: nn.Module,
    state: dict[str, Tensor],
    path: str | Path,
    ckpt: dict[str, Any],
    skip_aux: bool = False,
    configured: str | None = None,
) -> list[str]:
    """Raise a :class:`CheckpointError` naming the checkpoint's config if ``state`` does not fit ``model``.

    With ``skip_aux`` the aux heads may differ (returns their keys, which then start fresh).
    """
    own = model.state_dict()
    skipped: list[str] = []
    if skip_aux:
        skipped = sorted(
            k
            for k in set(state) | set(own)
            if k.startswith("aux_heads.") and (k not in state or k not in own or state[k].shape != own[k].shape)
        )
    missing = sorted(k for k in own if k not in state and k not in skipped)
    unexpected = sorted(k for k in state if k not in own and k not in skipped)
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and k not in skipped and state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [
            f"{len(x)} {name} (e.g. {', '.join(x[:3])})"
            for name, x in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches, checkpoint vs configured", shapes),
            )
            if x
        ]
        mine = f" ({configured})" if configured else ""
        raise CheckpointError(
            f"{path} does not fit the configured model{mine}: {'; '.join(parts)}. The checkpoint was trained with "
            f"{describe(ckpt)}. Leave out experiment= and model= so that its own config is used, or compose "
            "the experiment it was trained with."
        )
    return skipped


def load_model_weights(
    model: nn.Module,
    path: str | Path,
    skip_aux: bool = False,
    ckpt: dict[str, Any] | None = None,
    configured: str | None = None,
) -> list[str]:
    """Load a checkpoint's segmentor weights into ``model``; with ``skip_aux``, aux heads may differ.

    A distillation teacher and a fine-tuning start only need the backbone and decode head: their aux
    heads (e.g. DoViT's at other layers than the dense model's) start fresh. Returns the skipped keys.
    ``configured`` describes the composed config, for the error when the two do not fit.
    """
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    state = model_state(ckpt)
    skipped = check_fits(model, state, path, ckpt, skip_aux, configured)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=not skipped)
    return skipped


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
