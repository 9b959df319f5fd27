"""``dtop-train``: train, then evaluate the best checkpoint pruned and dense, and print a summary.

``ckpt_path=<run>/checkpoints/last.ckpt`` resumes a run exactly where it stopped (same steps, learning
rate, data order and augmentations), in its own folder; the checkpoint brings its own model, data,
module and trainer config unless the command line chooses an experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, open_dict

from dtop.checkpoint import check_fits, model_state
from dtop.cli.common import (
    STORED,
    build,
    cli,
    describe_cfg,
    evaluate_checkpoint,
    hydra_app,
    log,
    make_trainer,
    print_config_tree,
    print_summary,
    use_checkpoint_config,
)
from dtop.errors import CheckpointError


def resume_in_place(cfg: DictConfig) -> None:
    """A resumed run continues in its own folder (``<run>/checkpoints/last.ckpt`` → ``<run>``), so its
    best-checkpoint bookkeeping, logs and results stay together with the first part's."""
    ckpt = Path(cfg.ckpt_path).resolve()
    if ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "config.yaml").is_file():
        with open_dict(cfg):
            cfg.paths.output_dir = str(ckpt.parent.parent)
        log.info("Resuming the run in %s", cfg.paths.output_dir)


def train(cfg: DictConfig) -> dict[str, Any]:
    ckpt = use_checkpoint_config(cfg, STORED)
    if ckpt is not None and cfg.get("train", True):
        resume_in_place(cfg)
    L.seed_everything(cfg.seed, workers=True)
    print_config_tree(cfg, cfg.paths.output_dir)
    dm, module = build(cfg)
    trainer = make_trainer(cfg)
    if cfg.get("train", True):
        if ckpt is not None:  # resume: the checkpoint must fit and must have steps left
            check_fits(module.model, model_state(ckpt), cfg.ckpt_path, ckpt, configured=describe_cfg(cfg))
            step, last = int(ckpt.get("global_step", 0)), int(cfg.trainer.max_steps)
            if last > 0 and step >= last:
                raise CheckpointError(
                    f"{cfg.ckpt_path} finished its training (step {step} of trainer.max_steps={last}). Evaluate it "
                    f"with dtop-eval ckpt_path={cfg.ckpt_path}, or train on with a larger trainer.max_steps."
                )
        dm.check("fit")
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    if not cfg.get("test", True):
        return {}
    best = None
    if trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path or None
    log.info("Evaluating %s", best or "the final weights")
    keep = ("SegProgressBar", "RichProgressBar", "Dashboard")
    eval_trainer = make_trainer(cfg, callbacks=[c for c in trainer.callbacks if type(c).__name__ in keep])
    metrics = evaluate_checkpoint(cfg, dm, module, eval_trainer, best, cfg.get("eval_dense", True))
    print_summary(metrics, title=f"dtop-train · {Path(cfg.paths.output_dir).name}")
    return metrics


@hydra_app("train")
def main(cfg: DictConfig) -> float | None:
    metrics = cli(train)(cfg)
    return metrics.get("mIoU")


if __name__ == "__main__":
    main()
