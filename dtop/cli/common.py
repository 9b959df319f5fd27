"""What every Hydra entry point shares: building objects, running an evaluation, writing results."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from dtop.checkpoint import load_model_weights
from dtop.data.base import SegDataModule
from dtop.lit.module import SegModule
from dtop.models.engine import Segmentor

log = logging.getLogger("dtop")
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None) -> None:
    """Print the resolved config as a Rich tree and save it (resolved YAML) in the run dir."""
    tree = Tree("config", guide_style="dim")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, value in resolved.items():
        branch = tree.add(f"[bold]{key}")
        branch.add(
            OmegaConf.to_yaml(
                OmegaConf.create({key: value}) if not isinstance(value, dict) else OmegaConf.create(value)
            ).rstrip()
        )
    Console().print(tree)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / "config.yaml").write_text(OmegaConf.to_yaml(resolved))


def build(cfg: DictConfig) -> tuple[SegDataModule, SegModule]:
    """Instantiate the DataModule, the Segmentor and the LightningModule that joins them."""
    dm: SegDataModule = instantiate(cfg.data)
    model: Segmentor = instantiate(cfg.model)
    module: SegModule = instantiate(cfg.module)(
        model=model,
        num_classes=dm.num_classes,
        ignore_index=dm.ignore_index,
        eval_mode=dm.eval_mode,
        crop_size=dm.crop_size,
        stride=dm.stride,
        class_names=list(dm.class_names),
    )
    return dm, module


def make_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]
    if not loggers:  # nothing to log the learning rate to: Lightning would refuse the monitor
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)


def evaluate(trainer: L.Trainer, module: SegModule, dm: SegDataModule) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the test loop; return the metrics dict and the per-image table."""
    trainer.test(module, datamodule=dm, verbose=False)
    return dict(module.last_eval), pd.DataFrame(module.per_image)


def evaluate_checkpoint(
    cfg: DictConfig, dm: SegDataModule, module: SegModule, trainer: L.Trainer, ckpt_path: str | None, eval_dense: bool
) -> dict[str, Any]:
    """Evaluate pruned (and dense) after loading ``ckpt_path``; write metrics.json and per_image.parquet."""
    if ckpt_path:
        load_model_weights(module.model, ckpt_path)
    metrics, table = evaluate(trainer, module, dm)
    out_dir = Path(cfg.paths.output_dir)
    # Under DDP every rank holds the same gathered table and metrics (dtop.lit.distributed); rank 0 writes them.
    writer = trainer.is_global_zero
    if writer:
        table.to_parquet(out_dir / "per_image.parquet", index=False)
    metrics["threshold"] = list(module.model.pruning.threshold)
    if eval_dense:
        with module.model.dense_mode():
            dense, dense_table = evaluate(trainer, module, dm)
        if writer:
            dense_table.to_parquet(out_dir / "per_image_dense.parquet", index=False)
        metrics["dense"] = {k: dense[k] for k in ("mIoU", "aAcc", "mAcc", "gmacs", "gmacs_linear")}
    metrics["checkpoint"] = ckpt_path
    if writer:
        write_metrics(out_dir, metrics, cfg)
    return metrics


def write_metrics(out_dir: Path, metrics: dict[str, Any], cfg: DictConfig) -> None:
    payload = {k: v for k, v in metrics.items() if k not in ("IoU", "Acc")}
    for key in ("IoU", "Acc"):
        if key in metrics:
            payload[f"per_class_{key}"] = metrics[key]
    payload["config"] = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2, default=str))


def print_summary(metrics: dict[str, Any], title: str = "dtop") -> None:
    """The closing table: pruned (and dense) mIoU/aAcc/mAcc, GMACs and keep ratios."""
    table = Table(title=title)
    for col in ("model", "mIoU", "aAcc", "mAcc", "GMACs", "GMACs (linear)", "keep ratio / stage", "images"):
        table.add_column(col, justify="right")
    keep = " / ".join(f"{k:.2f}" for k in metrics.get("keep_ratio_per_stage", []))
    thr = metrics.get("threshold")
    label = f"pruned (ξ={thr[0] if thr and len(thr) == 1 else thr})"
    table.add_row(
        label,
        *(f"{metrics[k]:.2f}" for k in ("mIoU", "aAcc", "mAcc")),
        f"{metrics['gmacs']:.4f}",
        f"{metrics['gmacs_linear']:.4f}",
        keep,
        str(metrics["images"]),
    )
    dense = metrics.get("dense")
    if dense:
        table.add_row(
            "dense",
            *(f"{dense[k]:.2f}" for k in ("mIoU", "aAcc", "mAcc")),
            f"{dense['gmacs']:.4f}",
            f"{dense['gmacs_linear']:.4f}",
            "1.00",
            str(metrics["images"]),
        )
    Console().print(table)
