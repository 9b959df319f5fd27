"""``dtop-flops``: analytic GMACs of a model config, dense (and pruned on data with a checkpoint).

The last printed line is one JSON object (``gmacs``, ``gmacs_linear``, ...) for scripts to parse.
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
from dtop.models.engine import Segmentor


def breakdown(model: Segmentor, height: int, width: int) -> list[tuple[str, float, float]]:
    """(part, GMACs, GMACs linear) of the dense model at inference (no aux heads), blocks in one row."""
    parts = model.dense_macs_parts(height, width)
    blocks = [row for row in parts if row[0].startswith("block ")]
    tokens = blocks[0][0].split("(")[1].rstrip(")")
    rows = [
        parts[0],
        (f"{len(blocks)} blocks ({tokens})", sum(a for _, a, _ in blocks), sum(b for _, _, b in blocks)),
        parts[-1],
    ]
    return [(name, a / 1e9, b / 1e9) for name, a, b in rows]


def flops(cfg: DictConfig) -> dict[str, Any]:
    with open_dict(cfg):  # counting needs no weights: never download or read them
        cfg.model.backbone.pretrained = False
        if not cfg.get("ckpt_path"):
            cfg.model.backbone.weights = None
    model: Segmentor = instantiate(cfg.model)
    size = cfg.get("input_size") or cfg.data.get("image_size") or cfg.data.get("crop_size")
    if size is None or len(size) != 2:
        raise ValueError("Give input_size=[H,W].")
    H, W = int(size[0]), int(size[1])
    rows = breakdown(model, H, W)
    table = Table(title=f"dense MACs at {H}×{W} · {model.backbone.name}")
    for col in ("part", "GMACs (all)", "GMACs (linear/conv)"):
        table.add_column(col, justify="right")
    for name, a, b in rows:
        table.add_row(name, f"{a:.4f}", f"{b:.4f}")
    gmacs, gmacs_lin = (v / 1e9 for v in model.dense_macs(H, W))
    table.add_row("[bold]total", f"[bold]{gmacs:.4f}", f"[bold]{gmacs_lin:.4f}")
    Console().print(table)
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "input_size": [H, W],
        "gmacs": round(gmacs, 4),
        "gmacs_linear": round(gmacs_lin, 4),
        "params_m": round(params / 1e6, 3),
        "backbone": model.backbone.name,
        "num_classes": model.num_classes,
    }
    if cfg.get("ckpt_path"):
        L.seed_everything(cfg.seed)
        dm, module = build(cfg)
        metrics = evaluate_checkpoint(cfg, dm, module, make_trainer(cfg), cfg.ckpt_path, eval_dense=False)
        result.update(
            {
                f"pruned_{k}": metrics[k]
                for k in ("gmacs", "gmacs_linear", "gmacs_dense", "keep_ratio_per_stage", "mIoU", "images")
            }
        )
    print(json.dumps(result))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="flops")
def main(cfg: DictConfig) -> None:
    cli(flops)(cfg)


if __name__ == "__main__":
    main()
