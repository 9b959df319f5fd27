"""W&B that works with no account (offline unless the user configured W&B), and the dashboard's W&B panels.

``wandb`` is imported only when a W&B logger is asked for, so ``logger=csv`` runs need no wandb.
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dtop.viz import denormalize, exit_map_pixels

log = logging.getLogger("dtop")


def wandb_configured() -> bool:
    """True when an API key is available (env var or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return (
            netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators("api.wandb.ai") is not None
        )
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, **kwargs: Any):
    """A Lightning ``WandbLogger``; wandb is imported only when this logger is asked for.

    ``WANDB_MODE`` wins when set; otherwise the run is online only if W&B is configured, and offline
    (sync later with ``wandb sync <run dir>/wandb/offline-run-*``) if not.
    """
    from lightning.pytorch.loggers import WandbLogger

    if "WANDB_MODE" not in os.environ and not wandb_configured():
        kwargs.setdefault("offline", True)
    kwargs.setdefault("log_model", False)
    return WandbLogger(save_dir=save_dir, **kwargs)


def log_eval(
    logger: Any,
    phase: str,
    step: int,
    summary: dict[str, Any],
    rows: pd.DataFrame,
    tokens: dict[str, np.ndarray],
    panels: list[dict[str, Any]],
    out: Path,
    names: list[str],
    legend: list[str],
    patch: int,
    ignore_index: int,
    normalisation: tuple[Any, Any],
) -> None:
    """One evaluation on a ``WandbLogger``: token and GMACs histograms, exit maps with prediction /
    ground-truth / exit-stage mask overlays, the exit stage per class, and the run summary."""
    import wandb

    data: dict[str, Any] = {f"{phase}/tokens_hist_s{s}": wandb.Histogram(v) for s, v in enumerate(tokens.values())}
    data[f"{phase}/gmacs_hist"] = wandb.Histogram(rows["gmacs"].to_numpy(float))
    data[f"{phase}/tokens_per_stage"] = wandb.Image(str(out / "tokens_hist.png"))
    if panels:
        classes = {k: n for k, n in enumerate(names)}
        stages = {s: n for s, n in enumerate(legend)}
        images = []
        for v in panels:
            img = denormalize(v["image"], *normalisation)
            H, W = img.shape[:2]
            label = v["label"].cpu().numpy().astype(np.int64)
            images.append(
                wandb.Image(
                    img,
                    caption=str(v["id"]),
                    masks={
                        "prediction": {"mask_data": v["pred"].cpu().numpy().astype(np.int64), "class_labels": classes},
                        "ground_truth": {
                            "mask_data": np.where(label == ignore_index, len(classes), label),
                            "class_labels": {**classes, len(classes): "ignored"},
                        },
                        "exit_stage": {
                            "mask_data": exit_map_pixels(v["exit_stage"], patch, (H, W)),
                            "class_labels": stages,
                        },
                    },
                )
            )
        data[f"{phase}/exit_maps"] = images
        data[f"{phase}/exit_panels"] = [wandb.Image(str(v["path"]), caption=str(v["id"])) for v in panels]
        exit_class = out / "exit_class.csv"
        if exit_class.exists():
            data[f"{phase}/exit_per_class"] = wandb.Table(dataframe=pd.read_csv(exit_class))
    logger.log_metrics(data, step=step)
    if phase == "test":
        logger.experiment.summary.update(
            {
                k: summary[k]
                for k in ("threshold", "mIoU", "gmacs", "gmacs_linear", "gmacs_mmcv", "gmacs_dense")
                if k in summary
            }
        )


def log_sweep(logger: Any, table: pd.DataFrame, step: int) -> None:
    """A sweep's runs so far on a ``WandbLogger``: the table, mIoU vs GMACs and (numeric ξ) mIoU vs ξ."""
    import wandb

    t = wandb.Table(dataframe=table.astype({"threshold": str}) if "threshold" in table else table)
    plots = {
        "sweep/table": t,
        "sweep/miou_vs_gmacs": wandb.plot.scatter(t, "gmacs", "mIoU", title="sweep: mIoU vs GMACs"),
    }
    if pd.api.types.is_numeric_dtype(table["threshold"]):
        tn = wandb.Table(dataframe=table[["threshold", "mIoU", "gmacs"]].sort_values("threshold"))
        plots["sweep/miou_vs_threshold"] = wandb.plot.line(tn, "threshold", "mIoU", title="sweep: mIoU vs ξ")
    logger.log_metrics(plots, step=step)


def is_wandb(logger: Any) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return False
    return isinstance(logger, WandbLogger)


def finish_foreign_wandb_run(run_dir: Path) -> None:
    """Close a W&B run that an earlier job of this process left open (Hydra multirun).

    Hydra's basic launcher runs every job of a sweep in one process, and ``WandbLogger`` silently
    reuses an active ``wandb.run``: without this, every ξ of a sweep would log into the first job's
    run. The callback is built before the job's loggers (``make_trainer``), so here — and only if
    wandb is already imported — an active run whose files are not under this job's ``run_dir`` is
    finished, and the job's logger starts its own run in its own dir.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    try:
        ours = Path(run.dir).resolve().is_relative_to(Path(run_dir).resolve())
    except Exception:  # noqa: BLE001 - when in doubt, leave the run alone
        ours = True
    if not ours:
        log.info("Dashboard: finishing W&B run %s of an earlier job so this job logs to its own run.", run.name)
        wandb.finish()


def _is_wandb(logger: Any) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return False
    return isinstance(logger, WandbLogger)
