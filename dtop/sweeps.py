"""Hydra sweeps of dtop runs gathered into one trade-off table and plot.

- :func:`collect` / :func:`write`: every finished run's ``metrics.json`` of one or several multirun
  dirs → ``sweep.csv``, ``sweep.md``, ``sweep.png`` (mIoU vs GMACs, one curve per combination of the
  other swept overrides, each point labelled with its ξ; the dense model a star when known).
  ``python scripts/collect_sweep.py <multirun dir>`` runs :func:`main`.
- :func:`collect_dashboard_summaries` / :func:`plot_dashboard_sweep`: the dashboard's running view of
  a sweep while it goes on (each finished run's ``dashboard/test/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

RESULT_KEYS = (
    "mIoU",
    "aAcc",
    "mAcc",
    "gmacs",
    "gmacs_linear",
    "gmacs_mmcv",
    "gmacs_dense",
    "gmacs_linear_dense",
    "gmacs_mmcv_dense",
    "images",
)


def format_threshold(value: Any) -> Any:
    """ξ as one float when every stage shares it, else 'a/b/c' (a stable, plottable label)."""
    if isinstance(value, (list, tuple)):
        vals = [float(v) for v in value]
        if not vals:
            return math.nan
        return vals[0] if len(set(vals)) == 1 else "/".join(f"{v:g}" for v in vals)
    return value


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("- "):
            item = line[2:].strip().strip("'\"")
            if "=" in item:
                key, value = item.split("=", 1)
                out[key.lstrip("+~")] = value
    return out


def _job_key(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def collect(sweep_dirs: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per run (``<dir>/*/metrics.json``) of one or several multirun dirs."""
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else [Path(d) for d in sweep_dirs]
    rows: list[dict[str, Any]] = []
    for sweep in dirs:
        if not sweep.is_dir():
            raise FileNotFoundError(
                f"{sweep} is not a directory (give the multirun dir, e.g. logs/eval/multiruns/<time>)."
            )
        for path in sorted(sweep.glob("*/metrics.json"), key=_job_key):
            m = json.loads(path.read_text())
            run = path.parent
            cfg = m.get("config") or {}
            model = cfg.get("model") or {}
            row: dict[str, Any] = {
                "sweep": sweep.name,
                "run": run.name,
                "threshold": format_threshold(m.get("threshold")),
            }
            row.update({k: m.get(k) for k in RESULT_KEYS})
            dense = m.get("dense") or {}
            row["dense_mIoU"] = dense.get("mIoU")
            if row.get("gmacs_dense") is None:
                row["gmacs_dense"] = dense.get("gmacs")
            row["prune_layers"] = "/".join(str(p) for p in model.get("prune_layers", [])) or None
            keep = m.get("keep_ratio_per_stage") or []
            row.update({f"keep_s{s}": k for s, k in enumerate(keep)})
            row["checkpoint"] = m.get("checkpoint")
            for key, value in _overrides(run).items():
                if key != "model.pruning.threshold":
                    row[f"override:{key}"] = value
            rows.append(row)
    if not rows:
        raise FileNotFoundError(
            f"No */metrics.json under {', '.join(map(str, dirs))}: is this a finished multirun dir?"
        )
    table = pd.DataFrame(rows)
    numeric = pd.to_numeric(table["threshold"], errors="coerce")
    if numeric.notna().all():
        table["threshold"] = numeric
    # overrides that are the same in every run are not what the sweep varied
    for col in [c for c in table.columns if c.startswith("override:")]:
        if table[col].nunique(dropna=False) <= 1:
            table = table.drop(columns=col)
    table = table.dropna(axis=1, how="all")
    order = {"sweep": True, "threshold": False}  # per sweep, from dense-ish (high ξ) to sparse
    sort = [c for c in order if c in table and table[c].map(type).nunique() == 1]
    return table.sort_values(sort, ascending=[order[c] for c in sort], kind="stable").reset_index(drop=True)


def varied_columns(table: pd.DataFrame) -> list[str]:
    """Columns besides ξ that distinguish curves (other swept overrides, prune layers, sweeps)."""
    cols = [c for c in table.columns if c.startswith("override:")]
    for c in ("prune_layers", "sweep"):
        if c in table and table[c].nunique(dropna=False) > 1:
            cols.append(c)
    return cols


def to_markdown(table: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    cols = list(columns or table.columns)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(row[c]) for c in cols) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: str | Path, gmacs: str = "gmacs", title: str | None = None) -> None:
    """mIoU vs GMACs, one curve per combination of the other varied columns; ξ labels; dense star."""
    from dtop.viz import plot_tradeoff

    dense_col = gmacs.replace("gmacs", "gmacs_dense") if gmacs == "gmacs" else f"{gmacs}_dense"
    dense = None
    if "dense_mIoU" in table and dense_col in table:
        known = table.dropna(subset=["dense_mIoU", dense_col])
        if not known.empty:
            dense = (float(known[dense_col].iloc[0]), float(known["dense_mIoU"].iloc[0]))
    plot_tradeoff(
        table,
        path,
        x=gmacs,
        y="mIoU",
        group=varied_columns(table),
        dense=dense,
        title=title or "mIoU vs GMACs",
        xlabel="GMACs / image" + {"gmacs_linear": " (linear/conv only)", "gmacs_mmcv": " (mmcv)"}.get(gmacs, ""),
    )


def write(table: pd.DataFrame, out_dir: str | Path, gmacs: str = "gmacs", title: str | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep.png"}
    table.to_csv(paths["csv"], index=False)
    shown = [
        c
        for c in ("threshold", *varied_columns(table), "mIoU", "dense_mIoU", "gmacs", "gmacs_linear", "gmacs_dense")
        if c in table
    ]
    shown += [c for c in table.columns if c.startswith("keep_s")]
    paths["md"].write_text(f"# {title or 'Sweep'}\n\n" + to_markdown(table, shown))
    plot(table, paths["png"], gmacs=gmacs, title=title)
    return paths


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        description="Gather a Hydra multirun of dtop-eval or dtop-train runs into one "
        "trade-off table and plot (sweep.csv, sweep.md, sweep.png)."
    )
    parser.add_argument("sweep_dirs", nargs="+", help="Hydra multirun dir(s), e.g. logs/eval/multiruns/<time>")
    parser.add_argument("--out", default=None, help="output folder (default: the first multirun dir)")
    parser.add_argument(
        "--gmacs",
        default="gmacs",
        choices=("gmacs", "gmacs_linear", "gmacs_mmcv"),
        help="GMACs convention of the plot: all MACs (DToP's), linear/conv only, or mmcv's (DoViT's)",
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    table = collect(args.sweep_dirs)
    paths = write(table, args.out or args.sweep_dirs[0], gmacs=args.gmacs, title=args.title)
    print(
        to_markdown(
            table,
            [c for c in ("threshold", *varied_columns(table), "mIoU", "gmacs", "gmacs_linear") if c in table]
            + [c for c in table.columns if c.startswith("keep_s")],
        )
    )
    print("\n".join(f"{k}: {p}" for k, p in paths.items()))
    return table


def hydra_sweep_dir(run_dir: Path) -> Path | None:
    """The multirun folder ``run_dir`` belongs to (Hydra wrote MULTIRUN in its .hydra/hydra.yaml)."""
    meta = run_dir / ".hydra" / "hydra.yaml"
    try:
        text = meta.read_text()
    except OSError:
        return None
    return run_dir.parent if re.search(r"^\s*mode:\s*MULTIRUN\s*$", text, re.M) else None


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


def plot_dashboard_sweep(table: pd.DataFrame, path: Path) -> None:
    """mIoU vs ξ and mIoU vs GMACs of a sweep's runs so far, side by side."""
    from dtop.viz import figure, plot_tradeoff

    fig = figure(10, 4)
    left, right = fig.subplots(1, 2)
    t = table.copy()
    numeric = pd.api.types.is_numeric_dtype(t["threshold"])
    t = t.sort_values("threshold" if numeric else "gmacs")
    x = t["threshold"] if numeric else list(range(len(t)))
    left.plot(x, t["mIoU"], "o-")
    if not numeric:
        left.set_xticks(x, t["threshold"], rotation=45, fontsize=7)
    left.set_xlabel("ξ")
    left.set_ylabel("mIoU")
    left.set_title("mIoU vs ξ", fontsize=10)
    left.grid(alpha=0.3)
    plot_tradeoff(t, None, ax=right)
    fig.savefig(path)
