"""A trained checkpoint as a ready model with its data's metadata: what dtop-predict and dtop-export share.

Nothing but the checkpoint is needed: its stored model and data config (key overrides on top) build the
model, the weights come from the checkpoint (never from the backbone's original file or a download),
and the data config gives classes, palette, normalisation and the inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from dtop.checkpoint import load_model_weights
from dtop.cli.common import describe_cfg, use_checkpoint_config
from dtop.data.base import SegDataModule
from dtop.models.engine import Segmentor


@dataclass
class Trained:
    """The model (eval mode, on the CPU), its data module (metadata only: no split is set up) and checkpoint."""

    model: Segmentor
    data: SegDataModule
    ckpt: dict[str, Any]
    path: Path


def load_trained(cfg: DictConfig) -> Trained:
    """``cfg.ckpt_path``'s model and data module, built from the config the checkpoint stores."""
    ckpt = use_checkpoint_config(cfg)
    dm: SegDataModule = instantiate(cfg.data)
    backbone = cfg.model.backbone
    had_weights = bool(backbone.get("pretrained") or backbone.get("weights"))
    with open_dict(cfg):  # the checkpoint holds every weight: read no backbone file, download nothing
        backbone.pretrained, backbone.weights = False, None
    model: Segmentor = instantiate(cfg.model)
    if had_weights:  # a checkpoint that predates stored normalisation: as the run's weights expected
        dm.follow_weights(*model.backbone.mean_std, weights=model.backbone.name)
    load_model_weights(model, cfg.ckpt_path, ckpt=ckpt, configured=describe_cfg(cfg))
    return Trained(model.eval(), dm, ckpt, Path(cfg.ckpt_path))


def data_info(cfg: DictConfig, dm: SegDataModule) -> dict[str, Any]:
    """What a user of the model must know about its data: classes, colours, normalisation, inference mode."""
    mean, std = dm.normalisation

    def pair(value: Any) -> list[int] | None:
        return None if value is None else [int(v) for v in value]

    return {
        "dataset": cfg.data.get("_target_"),
        "num_classes": int(dm.num_classes),
        "class_names": [str(n) for n in dm.class_names],
        "palette": [[int(c) for c in rgb] for rgb in dm.palette],
        "ignore_index": int(dm.ignore_index),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "eval_mode": dm.eval_mode,
        "scale": pair(getattr(dm, "scale", None)),
        "crop_size": pair(dm.crop_size),
        "stride": pair(dm.stride),
        "image_size": pair(getattr(dm, "image_size", None)),
    }
