"""``dtop-eval ckpt_path=...``: evaluate a checkpoint at the configured threshold (multirun-friendly).

The checkpoint brings the model and data config it was trained with: no ``experiment=`` needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from dtop.cli.common import (
    build,
    cli,
    evaluate_checkpoint,
    hydra_app,
    make_trainer,
    print_config_tree,
    print_summary,
    use_checkpoint_config,
)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    use_checkpoint_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    print_config_tree(cfg, cfg.paths.output_dir)
    dm, module = build(cfg)
    dm.check("test")
    trainer = make_trainer(cfg)
    metrics = evaluate_checkpoint(cfg, dm, module, trainer, cfg.ckpt_path, cfg.get("eval_dense", False))
    print_summary(metrics, title=f"dtop-eval · {Path(cfg.paths.output_dir).name}")
    return metrics


@hydra_app("eval")
def main(cfg: DictConfig) -> float:
    from dtop.cli.calibrate import objective  # mIoU (cfg.optimized_metric), penalised above cfg.gmacs_budget

    return objective(cli(evaluate)(cfg), cfg)


if __name__ == "__main__":
    main()
