"""``dtop-calibrate ckpt_path=...``: choose the pruning threshold ξ of a trained model on a val subset.

The model is loaded once; the first ``calibrate.max_images`` validation images are evaluated once
with pruning off (the dense reference) and once per candidate in ``calibrate.thresholds``. The
target is

- ``calibrate.max_drop``: at most this many mIoU points below dense → the **lowest** ξ that meets
  it (the most computation saved within the accuracy tolerance); and/or
- ``calibrate.gmacs_budget``: mean GMACs per image (``calibrate.gmacs_key``: ``gmacs`` — all MACs,
  DToP's convention — ``gmacs_linear`` or ``gmacs_mmcv``, DoViT's) at most this → with a budget alone, the ξ with
  the best mIoU among those within budget (the lowest ξ always meets a budget that any ξ meets, so
  "lowest" would simply pick the least accurate candidate); with both, the lowest ξ meeting both.

The table it considered (ξ, mIoU, drop, GMACs, keep ratio per stage, which targets each meets) is
printed and written to ``<run dir>/calibration.{csv,json,png}``; ``main`` returns the chosen ξ.

Also here: :func:`objective`, the value ``dtop-eval`` returns to Hydra sweepers (Optuna): the
``optimized_metric`` (default mIoU), or — when the run's GMACs exceed ``gmacs_budget`` — a
penalised value below any feasible one (see :func:`penalized`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Subset

from dtop.checkpoint import load_model_weights
from dtop.cli.common import (
    build,
    cli,
    describe_cfg,
    hydra_app,
    log,
    make_trainer,
    print_config_tree,
    use_checkpoint_config,
)

# ------------------------------------------------------------------------- sweep objective


def penalized(value: float, gmacs: float, budget: float | None) -> float:
    """``value`` if ``gmacs`` ≤ ``budget`` (or no budget), else ``-100 · (gmacs / budget - 1)``.

    The penalty is negative, so below any feasible mIoU/accuracy (percentages ≥ 0), and it grows with
    the excess, so a sampler still learns which over-budget settings are closer to feasible.
    """
    if budget is None:
        return float(value)
    budget = float(budget)
    if budget <= 0:
        raise ValueError(f"gmacs_budget must be > 0, got {budget}.")
    if not math.isfinite(gmacs) or gmacs > budget:
        return -100.0 * ((gmacs if math.isfinite(gmacs) else 1e9) / budget - 1.0)
    return float(value)


def _lookup(metrics: Mapping[str, Any], key: str) -> Any:
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(f"Metric {key!r} not in the evaluation results (have {sorted(metrics)}).")
        value = value[part]
    return value


def objective(metrics: Mapping[str, Any], cfg: DictConfig | Mapping[str, Any]) -> float:
    """What ``dtop-eval`` returns: ``cfg.optimized_metric`` (default ``mIoU``; dotted keys such as
    ``dense.mIoU`` work), penalised by :func:`penalized` when ``cfg.gmacs_budget`` is set and the mean
    GMACs (``cfg.gmacs_metric``, default ``gmacs``) exceed it."""
    name = cfg.get("optimized_metric") or "mIoU"
    value = float(_lookup(metrics, name))
    budget = cfg.get("gmacs_budget")
    if budget is None:
        return value
    gmacs = float(_lookup(metrics, cfg.get("gmacs_metric") or "gmacs"))
    result = penalized(value, gmacs, float(budget))
    if result != value:
        log.info(
            "GMACs %.4g exceed the budget %.4g: objective %s = %.4g instead of %.4g.",
            gmacs,
            float(budget),
            name,
            result,
            value,
        )
    return result


# ------------------------------------------------------------------------------ calibration


def choose(table: pd.DataFrame, max_drop: float | None, gmacs_budget: float | None) -> dict[str, Any] | None:
    """Mark which rows meet the targets (in place) and return the chosen row (None if none fits)."""
    if max_drop is None and gmacs_budget is None:
        raise ValueError("Give a target: calibrate.max_drop (mIoU points below dense) and/or calibrate.gmacs_budget.")
    feasible = pd.Series(True, index=table.index)
    if max_drop is not None:
        table["meets_drop"] = table["drop"] <= float(max_drop) + 1e-9
        feasible &= table["meets_drop"]
    if gmacs_budget is not None:
        table["meets_budget"] = table["gmacs_target"] <= float(gmacs_budget)
        feasible &= table["meets_budget"]
    table["feasible"] = feasible
    table["chosen"] = False
    ok = table[feasible]
    if ok.empty:
        return None
    if max_drop is not None:
        idx = ok["xi_min"].idxmin()
    else:
        idx = ok.sort_values(["mIoU", "gmacs_target"], ascending=[False, True]).index[0]
    table.loc[idx, "chosen"] = True
    return table.loc[idx].to_dict()


def calibration_loader(dm: Any, max_images: int | None, seed: int | None = None) -> DataLoader:
    """The first ``max_images`` validation images (a seeded random subset when ``seed`` is given)."""
    dm.setup("validate")
    dataset = dm.val_dataset
    if dataset is None:
        raise RuntimeError(f"{type(dm).__name__} has no validation split to calibrate on.")
    n = len(dataset)
    count = n if not max_images else min(int(max_images), n)
    if seed is None:
        indices = list(range(count))
    else:
        indices = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:count].tolist())
    return dm.eval_loader(Subset(dataset, indices), "calibration")


def _thresholds(values: Sequence[Any]) -> list[Any]:
    out = []
    for v in values:
        out.append([float(x) for x in v] if isinstance(v, (list, tuple)) or OmegaConf.is_list(v) else float(v))
    if not out:
        raise ValueError("calibrate.thresholds is empty.")
    return out


def _label(xi: Any) -> Any:
    if isinstance(xi, list):
        return xi[0] if len(set(xi)) == 1 else "/".join(f"{v:g}" for v in xi)
    return xi


def run_calibration(cfg: DictConfig) -> dict[str, Any]:
    c = cfg.calibrate
    L.seed_everything(cfg.seed, workers=True)
    dm, module = build(cfg)
    if cfg.get("ckpt_path"):
        load_model_weights(module.model, cfg.ckpt_path, configured=describe_cfg(cfg))
    loader = calibration_loader(dm, c.get("max_images"), c.get("subset_seed"))
    trainer = make_trainer(cfg, logger=False, enable_model_summary=False, enable_progress_bar=False)
    policy = module.model.pruning
    key = c.get("gmacs_key") or "gmacs"

    def run() -> dict[str, Any]:
        trainer.test(module, dataloaders=loader, verbose=False)
        return dict(module.last_eval)

    with module.model.dense_mode():
        dense = run()
    rows = []
    for xi in _thresholds(c.thresholds):
        policy.set_threshold(xi)
        ev = run()
        row = {
            "threshold": _label(xi),
            "xi_min": min(xi) if isinstance(xi, list) else xi,
            "mIoU": ev["mIoU"],
            "drop": round(dense["mIoU"] - ev["mIoU"], 4),
            "gmacs": ev["gmacs"],
            "gmacs_linear": ev["gmacs_linear"],
            "gmacs_mmcv": ev["gmacs_mmcv"],
            "gmacs_target": ev[key],
            "saving": round(1 - ev[key] / dense[key], 4) if dense[key] else math.nan,
        }
        row.update({f"keep_s{s}": k for s, k in enumerate(ev.get("keep_ratio_per_stage", []))})
        rows.append(row)
        log.info("ξ=%s: mIoU %.2f (dense %.2f), %s %.4g", row["threshold"], ev["mIoU"], dense["mIoU"], key, ev[key])
    table = pd.DataFrame(rows)
    chosen = choose(table, c.get("max_drop"), c.get("gmacs_budget"))
    result = {
        "checkpoint": cfg.get("ckpt_path"),
        "images": int(dense.get("images", 0)),
        "gmacs_key": key,
        "target": {"max_drop": c.get("max_drop"), "gmacs_budget": c.get("gmacs_budget")},
        "dense": {k: dense[k] for k in ("mIoU", "aAcc", "mAcc", "gmacs", "gmacs_linear", "gmacs_mmcv") if k in dense},
        "chosen_threshold": None if chosen is None else chosen["threshold"],
        "chosen": chosen,
        "table": table.drop(columns=["xi_min", "gmacs_target"]).to_dict(orient="records"),
    }
    write_outputs(Path(cfg.paths.output_dir), table, result)
    print_table(table, result)
    return result


def write_outputs(out: Path, table: pd.DataFrame, result: dict[str, Any]) -> None:
    from dtop.viz import plot_tradeoff

    out.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["xi_min", "gmacs_target"]).to_csv(out / "calibration.csv", index=False)
    (out / "calibration.json").write_text(json.dumps(result, indent=2, default=str))
    key = result["gmacs_key"]
    dense = result["dense"]
    plot_tradeoff(
        table,
        out / "calibration.png",
        x=key,
        y="mIoU",
        label="threshold",
        dense=(dense.get(key, math.nan), dense.get("mIoU", math.nan)),
        title=f"calibration on {result['images']} val images (chosen ξ = {result['chosen_threshold']})",
    )


def print_table(table: pd.DataFrame, result: dict[str, Any]) -> None:
    key = result["gmacs_key"]
    t = Table(
        title=f"dtop-calibrate · dense mIoU {result['dense']['mIoU']:.2f}, "
        f"{key} {result['dense'].get(key, float('nan')):.4g} · {result['images']} images"
    )
    keep = [c for c in table.columns if c.startswith("keep_s")]
    cols = (
        ["ξ", "mIoU", "drop", key, "saving", "keep / stage"]
        + [c for c in ("meets_drop", "meets_budget") if c in table]
        + ["chosen"]
    )
    for col in cols:
        t.add_column(col, justify="right")
    for _, r in table.iterrows():
        cells = [
            str(r["threshold"]),
            f"{r['mIoU']:.2f}",
            f"{r['drop']:+.2f}",
            f"{r['gmacs_target']:.4g}",
            f"{100 * r['saving']:.1f}%",
            " / ".join(f"{r[k]:.2f}" for k in keep),
        ]
        cells += ["✓" if r[c] else "✗" for c in ("meets_drop", "meets_budget") if c in table]
        cells.append("◀" if r["chosen"] else "")
        t.add_row(*cells)
    Console().print(t)
    if result["chosen_threshold"] is None:
        Console().print(
            "[bold red]No candidate ξ meets the target[/]: keep ξ = 1 (no pruning), relax the target or "
            "add candidates (calibrate.thresholds)."
        )
    else:
        Console().print(
            f"[bold]chosen ξ = {result['chosen_threshold']}[/]  (use model.pruning.threshold="
            f"{result['chosen_threshold']})"
        )
        if result["chosen"]["saving"] <= 0:
            Console().print(
                "[yellow]At this ξ pruning saves nothing on the subset (the aux heads cost more than the "
                "tokens they remove): the dense model (ξ = 1) is as cheap.[/]"
            )


def calibrate(cfg: DictConfig) -> dict[str, Any]:
    use_checkpoint_config(cfg)
    print_config_tree(cfg, cfg.paths.output_dir)
    return run_calibration(cfg)


@hydra_app("calibrate")
def main(cfg: DictConfig) -> Any:
    return cli(calibrate)(cfg)["chosen_threshold"]


if __name__ == "__main__":
    main()
