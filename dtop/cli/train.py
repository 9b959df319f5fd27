"""``dtop-train``: train, then evaluate the best checkpoint pruned and dense, and print a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from dtop.cli.common import CONFIG_PATH, build, evaluate_checkpoint, log, make_trainer, print_config_tree, print_summary


def train(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    print_config_tree(cfg, cfg.paths.output_dir)
    dm, module = build(cfg)
    trainer = make_trainer(cfg)
    if cfg.get("train", True):
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    if not cfg.get("test", True):
        return {}
    best = None
    if trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path or None
    log.info("Evaluating %s", best or "the final weights")
    keep = ("RichProgressBar", "Dashboard")
    eval_trainer = make_trainer(cfg, callbacks=[c for c in trainer.callbacks if type(c).__name__ in keep])
    metrics = evaluate_checkpoint(cfg, dm, module, eval_trainer, best, cfg.get("eval_dense", True))
    print_summary(metrics, title=f"dtop-train · {Path(cfg.paths.output_dir).name}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("mIoU")


if __name__ == "__main__":
    main()
