"""Token-pruning dashboard: W&B panels, and the same artefacts as files in the run dir.

After every validation (not the sanity check) and every test run, :class:`Dashboard` reads what the
:class:`~dtop.lit.module.SegModule` kept of that evaluation — ``per_image`` (one row per image:
tokens entering each stage, exits, GMACs), ``visuals`` (a few images with their exit-stage token
grid and prediction) and ``last_eval`` (mIoU, mean GMACs, keep ratios) — and produces:

- per-stage active-token counts: means (and keep ratios) as scalars, histograms per stage;
- a histogram of the per-image GMACs (with the dense model's GMACs for reference);
- exit maps (which token exited at which stage, drawn over the input — DToP Fig. 4 / DoViT Fig. 5)
  next to the prediction and the ground truth, plus the exit stage per predicted class;
- in a Hydra multirun (e.g. ``dtop-eval -m model.pruning.threshold=0.8,0.9 ...``): the sweep's
  mIoU-vs-ξ and mIoU-vs-GMACs curves so far, over all runs of the sweep that have finished.

Files (always, W&B or not) under ``dirpath`` (``<run dir>/dashboard``)::

    history.csv                       one row per evaluation: phase, step, ξ, mIoU, GMACs, keep ratios
    <phase>/summary.json              that evaluation's numbers (phase: val, test, test_dense)
    <phase>/per_image.csv             the per-image table
    <phase>/tokens_hist.png, gmacs_hist.png, exit_class.csv, exit_maps/<n>_<image id>.png
    <sweep dir>/dashboard_sweep.csv, dashboard_sweep.png    (multiruns only)

Every logger gets the scalars; a ``WandbLogger`` also the panels of :mod:`dtop.lit.wandb_logger`.
Drawing lives in :mod:`dtop.viz`, sweep aggregation in :mod:`dtop.sweeps`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd

from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD
from dtop.lit import wandb_logger as wandb_panels
from dtop.sweeps import collect_dashboard_summaries, format_threshold, hydra_sweep_dir, plot_dashboard_sweep
from dtop.viz import default_palette, draw_exit_panel, plot_histograms, stage_names, token_classes

log = logging.getLogger("dtop")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "image"


class Dashboard(L.Callback):
    """Log token counts, GMACs, exit maps and predictions of every evaluation (see the module doc).

    Args:
        dirpath: where the files go (``<run dir>/dashboard``); ``None``: ``<default_root_dir>/dashboard``.
        max_images: exit-map panels per evaluation (at most the module's ``max_visuals``).
        log_images: draw/log exit maps and predictions (off: numbers and histograms only).
        sweep_summary: in a Hydra multirun, write/log the sweep's curves after each test run.
    """

    def __init__(
        self, dirpath: str | None = None, max_images: int = 8, log_images: bool = True, sweep_summary: bool = True
    ) -> None:
        super().__init__()
        self.dirpath = Path(dirpath) if dirpath else None
        self.max_images, self.log_images, self.sweep_summary = max_images, log_images, sweep_summary
        if self.dirpath is not None:
            wandb_panels.finish_foreign_wandb_run(self.dirpath.parent)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "max_visuals"):
            pl_module.max_visuals = max(int(pl_module.max_visuals), self.max_images if self.log_images else 0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._safe_report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = getattr(getattr(pl_module, "model", None), "pruning", None)
        self._safe_report(trainer, pl_module, "test" if policy is None or policy.enabled else "test_dense")

    def _safe_report(self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str) -> None:
        try:
            self.report(trainer, pl_module, phase)
        except Exception as err:  # noqa: BLE001 - a dashboard must never break a run
            log.warning(
                "Dashboard: %s report failed (%s: %s); training/evaluation goes on.",
                phase,
                type(err).__name__,
                err,
                exc_info=True,
            )

    # ---------------------------------------------------------------- report
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str) -> dict[str, Any]:
        """Write (and log) everything about the evaluation that just ended; returns its summary."""
        if not trainer.is_global_zero or not getattr(pl_module, "per_image", None):
            return {}
        root = self.dirpath or Path(trainer.default_root_dir) / "dashboard"
        out = root / phase
        out.mkdir(parents=True, exist_ok=True)
        model = pl_module.model
        S = model.num_stages
        step = int(trainer.global_step)
        rows = pd.DataFrame(pl_module.per_image)
        rows.to_csv(out / "per_image.csv", index=False)
        ev = dict(getattr(pl_module, "last_eval", {}) or {})
        tokens = {f"stage {s}": rows[f"tokens_s{s}"].to_numpy(float) for s in range(S) if f"tokens_s{s}" in rows}
        summary: dict[str, Any] = {
            "phase": phase,
            "step": step,
            "threshold": format_threshold(list(model.pruning.threshold)),
            "pruning": bool(model.pruning.enabled),
            "images": int(len(rows)),
            **{k: ev.get(k) for k in ("mIoU", "aAcc", "mAcc") if k in ev},
            **{
                k: float(rows[k].mean())
                for k in (
                    "gmacs",
                    "gmacs_linear",
                    "gmacs_mmcv",
                    "gmacs_dense",
                    "gmacs_linear_dense",
                    "gmacs_mmcv_dense",
                )
                if k in rows
            },
            "tokens_per_stage": [float(v.mean()) for v in tokens.values()],
        }
        first = summary["tokens_per_stage"][0] if summary["tokens_per_stage"] else 0.0
        summary["keep_ratio_per_stage"] = [t / first if first else math.nan for t in summary["tokens_per_stage"]]
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._append_history(root / "history.csv", summary)

        plot_histograms(
            tokens,
            out / "tokens_hist.png",
            "active patch tokens entering the stage",
            f"{phase}: active tokens per stage ({len(rows)} images)",
        )
        dense = summary.get("gmacs_dense")
        plot_histograms(
            {"pruned" if model.pruning.enabled else "dense": rows["gmacs"].to_numpy(float)},
            out / "gmacs_hist.png",
            "GMACs / image",
            f"{phase}: GMACs per image",
            reference=dense,
            reference_label=f"dense {dense:.4g}" if dense else "",
        )
        panels = self._exit_maps(trainer, pl_module, out) if self.log_images else []
        self._log(trainer, phase, step, summary, rows, tokens, panels, out)
        if phase == "test" and self.sweep_summary:
            self._sweep(trainer, root)
        return summary

    @staticmethod
    def _append_history(path: Path, summary: dict[str, Any]) -> None:
        row = {k: v for k, v in summary.items() if not isinstance(v, list)}
        row.update({f"keep_s{s}": v for s, v in enumerate(summary["keep_ratio_per_stage"])})
        row.update({f"tokens_s{s}": v for s, v in enumerate(summary["tokens_per_stage"])})
        new = pd.DataFrame([row])
        if path.exists():
            new = pd.concat([pd.read_csv(path), new], ignore_index=True)
        new.to_csv(path, index=False)

    def _exit_maps(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path) -> list[dict[str, Any]]:
        """Draw the exit-map panels and the exit stage per predicted class of the kept images."""
        visuals = list(getattr(pl_module, "visuals", []) or [])[: self.max_images]
        if not visuals:
            return []
        model = pl_module.model
        S, K, p = model.num_stages, model.num_classes, model.backbone.patch_size
        hp = getattr(pl_module, "hparams", {})
        ignore = int(hp.get("ignore_index", 255))
        names = list(hp.get("class_names") or [str(k) for k in range(K)])
        palette = getattr(trainer.datamodule, "palette", None) if trainer.datamodule is not None else None
        palette = list(palette) if palette is not None and len(palette) >= K else default_palette(K)
        legend = stage_names(model.prune_layers, model.backbone.depth)
        norm = trainer.datamodule.normalisation if hasattr(trainer.datamodule, "normalisation") else None
        norm = norm or (IMAGENET_MEAN, IMAGENET_STD)
        folder = out / "exit_maps"
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        counts = np.zeros((K, S), dtype=np.int64)
        panels = []
        for i, v in enumerate(visuals):
            path = folder / f"{i:02d}_{_safe_name(v['id'])}.png"
            draw_exit_panel(
                v, path, patch=p, num_stages=S, legend=legend, palette=palette, ignore_index=ignore, normalisation=norm
            )
            grid = tuple(v["exit_stage"].shape)
            cls = token_classes(v["pred"], grid, p).reshape(-1).numpy()
            np.add.at(counts, (np.clip(cls, 0, K - 1), v["exit_stage"].reshape(-1).numpy()), 1)
            panels.append({**v, "path": path})
        table = pd.DataFrame(
            [
                {
                    "class_id": k,
                    "class": names[k] if k < len(names) else str(k),
                    "stage": s,
                    "exit": legend[s],
                    "tokens": int(counts[k, s]),
                }
                for k in range(K)
                for s in range(S)
                if counts[k].sum() > 0
            ]
        )
        table.to_csv(out / "exit_class.csv", index=False)
        self._labels = (names, legend, p, ignore, norm)
        return panels

    # -------------------------------------------------------------- loggers
    def _log(
        self,
        trainer: L.Trainer,
        phase: str,
        step: int,
        summary: dict[str, Any],
        rows: pd.DataFrame,
        tokens: dict[str, np.ndarray],
        panels: list[dict[str, Any]],
        out: Path,
    ) -> None:
        scalars = {f"{phase}/tokens_s{s}": v for s, v in enumerate(summary["tokens_per_stage"])}
        scalars.update(
            {f"{phase}/keep_s{s}": v for s, v in enumerate(summary["keep_ratio_per_stage"]) if math.isfinite(v)}
        )
        if len(rows):
            scalars[f"{phase}/gmacs_p90"] = float(rows["gmacs"].quantile(0.9))
        for logger in trainer.loggers:
            try:
                logger.log_metrics(scalars, step=step)
                if wandb_panels.is_wandb(logger):
                    wandb_panels.log_eval(logger, phase, step, summary, rows, tokens, panels, out, *self._labels)
            except Exception as err:  # noqa: BLE001 - a dashboard must never break a run
                log.warning(
                    "Dashboard: logging to %s failed (%s: %s); the files in %s are complete.",
                    type(logger).__name__,
                    type(err).__name__,
                    err,
                    out,
                )

    # ----------------------------------------------------------------- sweeps
    def _sweep(self, trainer: L.Trainer, root: Path) -> None:
        sweep = hydra_sweep_dir(root.parent)
        if sweep is None:
            return
        table = collect_dashboard_summaries(sweep)
        if table.empty:
            return
        table.to_csv(sweep / "dashboard_sweep.csv", index=False)
        plot_dashboard_sweep(table, sweep / "dashboard_sweep.png")
        for logger in trainer.loggers:
            if wandb_panels.is_wandb(logger):
                try:
                    wandb_panels.log_sweep(logger, table, int(trainer.global_step))
                except Exception as err:  # noqa: BLE001 - a dashboard must never break a run
                    log.warning("Dashboard: sweep logging to W&B failed (%s: %s).", type(err).__name__, err)
