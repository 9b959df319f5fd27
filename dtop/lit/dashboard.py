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

W&B (only when a ``WandbLogger`` is attached; ``wandb`` is imported only then): the scalars,
``wandb.Histogram`` s, ``wandb.Image`` s with prediction / ground-truth / exit-stage mask overlays,
and for sweeps a ``wandb.Table`` with line/scatter plots plus ``threshold``, ``mIoU`` and ``gmacs``
in the run summary, so runs grouped by ``logger.wandb.group`` plot against each other directly.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch

from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("dtop")

# ------------------------------------------------------------------ drawing helpers (no pyplot state)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def stage_colors(num_stages: int) -> np.ndarray:
    """[S, 3] uint8 colours: early exits dark/purple … tokens kept to the end yellow (viridis)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return (np.array([cmap(i / max(num_stages - 1, 1))[:3] for i in range(num_stages)]) * 255).astype(np.uint8)


def stage_names(prune_layers: Sequence[int], depth: int) -> list[str]:
    """Legend text per exit stage: where its tokens left the backbone."""
    return [f"exit after layer {p}" for p in prune_layers] + [f"to the end (layer {depth})"]


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes)]


def denormalize(image: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [3, H, W] → uint8 [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def colorize(label: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """Class map [H, W] → uint8 [H, W, 3]; ignored / unknown ids are black."""
    lab = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label).astype(np.int64)
    lut = np.zeros((max(256, ignore_index + 1, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[ignore_index] = 0
    return lut[np.clip(lab, 0, len(lut) - 1)]


def exit_map_pixels(exit_stage: torch.Tensor, patch: int, size: tuple[int, int]) -> np.ndarray:
    """Token-grid exit stages [h, w] → one stage per pixel [H, W] (each token covers patch × patch)."""
    grid = exit_stage.cpu().long()
    up = grid.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    return up[: size[0], : size[1]].numpy()


def token_classes(pred: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """The predicted class at each token's centre pixel: [H, W] → [h, w]."""
    H, W = pred.shape[-2:]
    ys = (torch.arange(grid[0]) * patch + patch // 2).clamp(max=H - 1)
    xs = (torch.arange(grid[1]) * patch + patch // 2).clamp(max=W - 1)
    return pred.cpu()[ys][:, xs]


def exit_overlay(image: np.ndarray, stages: np.ndarray, colors: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    return (image * (1 - alpha) + colors[stages] * alpha).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_exit_panel(visual: dict[str, Any], path: Path, *, patch: int, num_stages: int, legend: Sequence[str],
                    palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """Input | exit stages over the input | prediction | ground truth (+ legend) → ``path`` (PNG).

    Drawn with PIL at the image's own resolution (small images are enlarged by an integer factor),
    so every token is an exact patch × patch square; returns the overlay.
    """
    from PIL import Image, ImageDraw

    image = denormalize(visual["image"])
    H, W = image.shape[:2]
    colors = stage_colors(num_stages)
    stages = exit_map_pixels(visual["exit_stage"], patch, (H, W))
    overlay = exit_overlay(image, stages, colors)
    panels = [("input", image), ("exit stage per token", overlay),
              ("prediction", colorize(visual["pred"], palette, ignore_index)),
              ("ground truth", colorize(visual["label"], palette, ignore_index))]
    scale = max(1, -(-192 // max(W, 1)))  # at least ~192 px per panel, so the titles fit
    gap, head, font = 6, 22, _font(13)
    counts = np.bincount(visual["exit_stage"].reshape(-1).numpy(), minlength=num_stages)
    rows = -(-num_stages // 2)
    width = 4 * W * scale + 3 * gap
    canvas = Image.new("RGB", (width, head + H * scale + 8 + 20 * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, img) in enumerate(panels):
        x = i * (W * scale + gap)
        big = img.repeat(scale, 0).repeat(scale, 1) if scale > 1 else img
        canvas.paste(Image.fromarray(np.ascontiguousarray(big)), (x, head))
        draw.text((x + 2, 3), title if i else f"{title} · {visual['id']}"[: 40], fill="black", font=font)
    y0 = head + H * scale + 6
    for s in range(num_stages):
        x, y = (s % 2) * (width // 2) + 2, y0 + (s // 2) * 20
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=tuple(int(c) for c in colors[s]))
        draw.text((x + 20, y + 1), f"{legend[s]}: {counts[s]} tokens", fill="black", font=font)
    canvas.save(path, compress_level=1)
    return overlay


def plot_histograms(columns: dict[str, np.ndarray], path: Path, xlabel: str, title: str,
                    reference: float | None = None, reference_label: str = "") -> None:
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    values = [v for v in columns.values() if len(v)]
    if values:
        lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for name, v in columns.items():
            ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (mean {np.mean(v):.4g})")
    if reference is not None and math.isfinite(reference):
        ax.axvline(reference, color="k", ls="--", lw=1, label=reference_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_tradeoff(table: pd.DataFrame, path: str | Path, *, x: str = "gmacs", y: str = "mIoU",
                  label: str | None = "threshold", group: str | None = None, dense: tuple[float, float] | None = None,
                  title: str = "mIoU vs GMACs", xlabel: str | None = None) -> None:
    """One curve per ``group`` of (``x``, ``y``) points sorted by ``x``, annotated with ``label``;
    ``dense`` = (GMACs, mIoU) of the unpruned model as a star."""
    fig = _figure(6, 4.2)
    ax = fig.subplots()
    groups = [(None, table)] if group is None or group not in table else list(table.groupby(group, sort=True))
    for name, part in groups:
        part = part.dropna(subset=[x, y]).sort_values(x)
        if part.empty:
            continue
        ax.plot(part[x], part[y], "o-", label=None if name is None else f"{group}={name}")
        if label is not None and label in part:
            for _, row in part.iterrows():
                ax.annotate(f"ξ={row[label]}" if label == "threshold" else str(row[label]), (row[x], row[y]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    if dense is not None and all(v is not None and math.isfinite(v) for v in dense):
        ax.plot([dense[0]], [dense[1]], "k*", ms=11, label="dense")
    ax.set_xlabel(xlabel or ("GMACs / image" if x.startswith("gmacs") else x))
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path)


def format_threshold(value: Any) -> Any:
    """ξ as one float when all stages share it, else 'a/b/c' (a stable, plottable label)."""
    if isinstance(value, (list, tuple)):
        vals = [float(v) for v in value]
        return vals[0] if len(set(vals)) == 1 else "/".join(f"{v:g}" for v in vals)
    return value


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:80] or "image"


def hydra_sweep_dir(run_dir: Path) -> Path | None:
    """The multirun folder ``run_dir`` belongs to (Hydra wrote MULTIRUN in its .hydra/hydra.yaml)."""
    meta = run_dir / ".hydra" / "hydra.yaml"
    try:
        text = meta.read_text()
    except OSError:
        return None
    return run_dir.parent if re.search(r"^\s*mode:\s*MULTIRUN\s*$", text, re.M) else None


# ------------------------------------------------------------------------------------- the callback


class Dashboard(L.Callback):
    """Log token counts, GMACs, exit maps and predictions of every evaluation (see the module doc).

    Args:
        dirpath: where the files go (``<run dir>/dashboard``); ``None``: ``<default_root_dir>/dashboard``.
        max_images: exit-map panels per evaluation (at most the module's ``max_visuals``).
        log_images: draw/log exit maps and predictions (off: numbers and histograms only).
        sweep_summary: in a Hydra multirun, write/log the sweep's curves after each test run.
    """

    def __init__(self, dirpath: str | None = None, max_images: int = 8, log_images: bool = True,
                 sweep_summary: bool = True) -> None:
        super().__init__()
        self.dirpath = Path(dirpath) if dirpath else None
        self.max_images, self.log_images, self.sweep_summary = max_images, log_images, sweep_summary
        if self.dirpath is not None:
            finish_foreign_wandb_run(self.dirpath.parent)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "max_visuals"):
            pl_module.max_visuals = max(int(pl_module.max_visuals), self.max_images if self.log_images else 0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._safe_report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = getattr(getattr(pl_module, "model", None), "policy", None)
        self._safe_report(trainer, pl_module, "test" if policy is None or policy.enabled else "test_dense")

    def _safe_report(self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str) -> None:
        try:
            self.report(trainer, pl_module, phase)
        except Exception as err:  # noqa: BLE001 - a dashboard must never break a run
            log.warning("Dashboard: %s report failed (%s: %s); training/evaluation goes on.", phase,
                        type(err).__name__, err, exc_info=True)

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
            "phase": phase, "step": step, "threshold": format_threshold(list(model.policy.threshold)),
            "pruning": bool(model.policy.enabled), "images": int(len(rows)),
            **{k: ev.get(k) for k in ("mIoU", "aAcc", "mAcc") if k in ev},
            **{k: float(rows[k].mean()) for k in ("gmacs", "gmacs_linear", "gmacs_dense", "gmacs_linear_dense")
               if k in rows},
            "tokens_per_stage": [float(v.mean()) for v in tokens.values()],
        }
        first = summary["tokens_per_stage"][0] if summary["tokens_per_stage"] else 0.0
        summary["keep_ratio_per_stage"] = [t / first if first else math.nan for t in summary["tokens_per_stage"]]
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._append_history(root / "history.csv", summary)

        plot_histograms(tokens, out / "tokens_hist.png", "active patch tokens entering the stage",
                        f"{phase}: active tokens per stage ({len(rows)} images)")
        dense = summary.get("gmacs_dense")
        plot_histograms({"pruned" if model.policy.enabled else "dense": rows["gmacs"].to_numpy(float)},
                        out / "gmacs_hist.png", "GMACs / image", f"{phase}: GMACs per image",
                        reference=dense, reference_label=f"dense {dense:.4g}" if dense else "")
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
        folder = out / "exit_maps"
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        counts = np.zeros((K, S), dtype=np.int64)
        panels = []
        for i, v in enumerate(visuals):
            path = folder / f"{i:02d}_{_safe_name(v['id'])}.png"
            draw_exit_panel(v, path, patch=p, num_stages=S, legend=legend, palette=palette, ignore_index=ignore)
            grid = tuple(v["exit_stage"].shape)
            cls = token_classes(v["pred"], grid, p).reshape(-1).numpy()
            np.add.at(counts, (np.clip(cls, 0, K - 1), v["exit_stage"].reshape(-1).numpy()), 1)
            panels.append({**v, "path": path})
        table = pd.DataFrame([{"class_id": k, "class": names[k] if k < len(names) else str(k), "stage": s,
                               "exit": legend[s], "tokens": int(counts[k, s])}
                              for k in range(K) for s in range(S) if counts[k].sum() > 0])
        table.to_csv(out / "exit_class.csv", index=False)
        self._names, self._legend, self._patch, self._ignore = names, legend, p, ignore
        return panels

    # -------------------------------------------------------------- loggers
    def _log(self, trainer: L.Trainer, phase: str, step: int, summary: dict[str, Any], rows: pd.DataFrame,
             tokens: dict[str, np.ndarray], panels: list[dict[str, Any]], out: Path) -> None:
        scalars = {f"{phase}/tokens_s{s}": v for s, v in enumerate(summary["tokens_per_stage"])}
        scalars.update({f"{phase}/keep_s{s}": v for s, v in enumerate(summary["keep_ratio_per_stage"])
                        if math.isfinite(v)})
        if len(rows):
            scalars[f"{phase}/gmacs_p90"] = float(rows["gmacs"].quantile(0.9))
        for logger in trainer.loggers:
            try:
                logger.log_metrics(scalars, step=step)
                if _is_wandb(logger):
                    self._log_wandb(logger, phase, step, summary, rows, tokens, panels, out)
            except Exception as err:  # noqa: BLE001 - a dashboard must never break a run
                log.warning("Dashboard: logging to %s failed (%s: %s); the files in %s are complete.",
                            type(logger).__name__, type(err).__name__, err, out)

    def _log_wandb(self, logger: Any, phase: str, step: int, summary: dict[str, Any], rows: pd.DataFrame,
                   tokens: dict[str, np.ndarray], panels: list[dict[str, Any]], out: Path) -> None:
        import wandb

        data: dict[str, Any] = {f"{phase}/tokens_hist_s{s}": wandb.Histogram(v) for s, v in enumerate(tokens.values())}
        data[f"{phase}/gmacs_hist"] = wandb.Histogram(rows["gmacs"].to_numpy(float))
        data[f"{phase}/tokens_per_stage"] = wandb.Image(str(out / "tokens_hist.png"))
        if panels:
            classes = {k: n for k, n in enumerate(self._names)}
            stages = {s: n for s, n in enumerate(self._legend)}
            images = []
            for v in panels:
                img = denormalize(v["image"])
                H, W = img.shape[:2]
                label = v["label"].cpu().numpy().astype(np.int64)
                images.append(wandb.Image(img, caption=str(v["id"]), masks={
                    "prediction": {"mask_data": v["pred"].cpu().numpy().astype(np.int64), "class_labels": classes},
                    "ground_truth": {"mask_data": np.where(label == self._ignore, len(classes), label),
                                     "class_labels": {**classes, len(classes): "ignored"}},
                    "exit_stage": {"mask_data": exit_map_pixels(v["exit_stage"], self._patch, (H, W)),
                                   "class_labels": stages},
                }))
            data[f"{phase}/exit_maps"] = images
            data[f"{phase}/exit_panels"] = [wandb.Image(str(v["path"]), caption=str(v["id"])) for v in panels]
            exit_class = out / "exit_class.csv"
            if exit_class.exists():
                data[f"{phase}/exit_per_class"] = wandb.Table(dataframe=pd.read_csv(exit_class))
        logger.log_metrics(data, step=step)
        if phase == "test":
            logger.experiment.summary.update({k: summary[k] for k in ("threshold", "mIoU", "gmacs", "gmacs_linear",
                                                                       "gmacs_dense") if k in summary})

    # ----------------------------------------------------------------- sweeps
    def _sweep(self, trainer: L.Trainer, root: Path) -> None:
        sweep = hydra_sweep_dir(root.parent)
        if sweep is None:
            return
        table = collect_dashboard_summaries(sweep)
        if table.empty:
            return
        table.to_csv(sweep / "dashboard_sweep.csv", index=False)
        _plot_sweep(table, sweep / "dashboard_sweep.png")
        for logger in trainer.loggers:
            if not _is_wandb(logger):
                continue
            try:
                import wandb

                t = wandb.Table(dataframe=table.astype({"threshold": str}) if "threshold" in table else table)
                plots = {"sweep/table": t,
                         "sweep/miou_vs_gmacs": wandb.plot.scatter(t, "gmacs", "mIoU", title="sweep: mIoU vs GMACs")}
                if pd.api.types.is_numeric_dtype(table["threshold"]):
                    tn = wandb.Table(dataframe=table[["threshold", "mIoU", "gmacs"]].sort_values("threshold"))
                    plots["sweep/miou_vs_threshold"] = wandb.plot.line(tn, "threshold", "mIoU",
                                                                       title="sweep: mIoU vs ξ")
                logger.log_metrics(plots, step=int(trainer.global_step))
            except Exception as err:  # noqa: BLE001
                log.warning("Dashboard: sweep logging to W&B failed (%s: %s).", type(err).__name__, err)


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


def collect_dashboard_summaries(sweep_dir: Path) -> pd.DataFrame:
    """One row per finished run of a sweep (its ``dashboard/test/summary.json``)."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/dashboard/test/summary.json")):
        s = json.loads(path.read_text())
        row = {"run": path.parents[2].name, **{k: v for k, v in s.items() if not isinstance(v, list)}}
        row.update({f"keep_s{i}": v for i, v in enumerate(s.get("keep_ratio_per_stage", []))})
        rows.append(row)
    table = pd.DataFrame(rows)
    if "threshold" in table:
        numeric = pd.to_numeric(table["threshold"], errors="coerce")
        if numeric.notna().all():
            table["threshold"] = numeric
    return table


def _plot_sweep(table: pd.DataFrame, path: Path) -> None:
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    t = table.copy()
    numeric = pd.api.types.is_numeric_dtype(t["threshold"])
    t = t.sort_values("threshold" if numeric else "gmacs")
    x = t["threshold"] if numeric else np.arange(len(t))
    left.plot(x, t["mIoU"], "o-")
    if not numeric:
        left.set_xticks(x, t["threshold"], rotation=45, fontsize=7)
    left.set_xlabel("ξ")
    left.set_ylabel("mIoU")
    left.set_title("mIoU vs ξ", fontsize=10)
    left.grid(alpha=0.3)
    t = t.sort_values("gmacs")
    right.plot(t["gmacs"], t["mIoU"], "o-")
    for _, r in t.iterrows():
        right.annotate(f"ξ={r['threshold']}", (r["gmacs"], r["mIoU"]), textcoords="offset points", xytext=(4, 4),
                       fontsize=7)
    right.set_xlabel("GMACs / image")
    right.set_ylabel("mIoU")
    right.set_title("mIoU vs GMACs", fontsize=10)
    right.grid(alpha=0.3)
    fig.savefig(path)
