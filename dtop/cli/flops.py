"""``dtop-flops``: analytic GMACs of a model config, dense (and pruned on data with a checkpoint).

Three conventions (:mod:`dtop.models.macs`): ``gmacs`` (all MACs; DToP's GFLOPs), ``gmacs_linear`` and
``gmacs_mmcv`` (DoViT's FLOPs). With ``ckpt_path`` the pruned GMACs are the mean per image (slide windows
summed) and per crop window (``*_per_crop``, DToP's average). The last printed line is one JSON object for
scripts to parse.
"""

from __future__ import annotations

import json
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from dtop.cli.common import CONFIG_PATH, build, cli, evaluate_checkpoint, make_trainer
from dtop.errors import ConfigError
from dtop.models.engine import Segmentor


def breakdown(model: Segmentor, height: int, width: int) -> list[tuple[str, float, float, float]]:
    """(part, GMACs, GMACs linear, GMACs mmcv) of the dense model at inference (no aux heads), the blocks in
    one row."""
    parts = model.dense_macs_parts(height, width)
    blocks = [row for row in parts if row[0].startswith("block ")]
    tokens = blocks[0][0].split("(")[1].rstrip(")")
    rows = [parts[0], (f"{len(blocks)} blocks ({tokens})", *(sum(r[i] for r in blocks) for i in (1, 2, 3)))]
    rows += [row for row in parts[1:] if not row[0].startswith("block ")]
    return [(name, *(v / 1e9 for v in values)) for name, *values in rows]


def flops(cfg: DictConfig) -> dict[str, Any]:
    with open_dict(cfg):  # counting needs no weights: never download or read them
        cfg.model.backbone.pretrained = False
        if not cfg.get("ckpt_path"):
            cfg.model.backbone.weights = None
    model: Segmentor = instantiate(cfg.model)
    size = cfg.get("input_size") or cfg.data.get("image_size") or cfg.data.get("crop_size")
    if size is None or len(size) != 2:
        raise ConfigError("Give input_size=[H,W].")
    H, W = int(size[0]), int(size[1])
    table = Table(title=f"dense MACs at {H}×{W} · {model.backbone.name}")
    for col in ("part", "GMACs (all)", "GMACs (linear/conv)", "GMACs (mmcv)"):
        table.add_column(col, justify="right")
    for name, *values in breakdown(model, H, W):
        table.add_row(name, *(f"{v:.4f}" for v in values))
    gmacs, gmacs_lin, gmacs_mmcv = (v / 1e9 for v in model.dense_macs(H, W))
    table.add_row("[bold]total", *(f"[bold]{v:.4f}" for v in (gmacs, gmacs_lin, gmacs_mmcv)))
    Console().print(table)
    params = sum(p.numel() for p in model.parameters())
    aux = sum(p.numel() for p in model.aux_heads.parameters())
    result: dict[str, Any] = {
        "input_size": [H, W],
        "gmacs": round(gmacs, 4),
        "gmacs_linear": round(gmacs_lin, 4),
        "gmacs_mmcv": round(gmacs_mmcv, 4),
        "params_m": round(params / 1e6, 3),
        "params_dense_m": round((params - aux) / 1e6, 3),
        "backbone": model.backbone.name,
        "num_classes": model.num_classes,
    }
    if cfg.get("ckpt_path"):
        if cfg.get("single_pass"):  # DoViT's protocol: one whole-image pass on 100 random val images
            with open_dict(cfg):
                cfg.data.eval_mode = "whole"
                cfg.data.test_images = cfg.data.get("test_images") or 100
        L.seed_everything(cfg.seed)
        dm, module = build(cfg)
        metrics = evaluate_checkpoint(cfg, dm, module, make_trainer(cfg), cfg.ckpt_path, eval_dense=False)
        keys = (
            "gmacs",
            "gmacs_linear",
            "gmacs_mmcv",
            "gmacs_per_crop",
            "gmacs_mmcv_per_crop",
            "gmacs_dense",
            "keep_ratio_per_stage",
            "mIoU",
            "images",
        )
        result.update({f"pruned_{k}": metrics[k] for k in keys})
        result["protocol"] = (
            "single pass" if cfg.get("single_pass") else f"{cfg.data.get('eval_mode', 'whole')} windows"
        )
    print(json.dumps(result))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="flops")
def main(cfg: DictConfig) -> None:
    cli(flops)(cfg)


if __name__ == "__main__":
    main()
