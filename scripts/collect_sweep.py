#!/usr/bin/env python
"""Gather a Hydra multirun of dtop-eval (or dtop-train) runs into one trade-off table and plot.

    dtop-eval -m model.pruning.threshold=0.8,0.9,0.95,0.98 ckpt_path=<run>/checkpoints/best.ckpt
    python scripts/collect_sweep.py logs/eval/multiruns/<time>

Reads every ``<multirun dir>/<job>/metrics.json`` (written by each run: threshold, mIoU, GMACs,
keep ratio per stage, ...) and ``.hydra/overrides.yaml`` (what the sweep varied) and writes, into
the multirun dir (or ``--out``):

- ``sweep.csv``: one row per run — ξ, mIoU, aAcc, mAcc, GMACs (all / linear), the dense GMACs (and
  dense mIoU when the runs evaluated it), keep ratio per stage, the other swept overrides;
- ``sweep.md``: the same as a Markdown table;
- ``sweep.png``: mIoU vs GMACs (the papers' trade-off curve), one curve per combination of the
  other swept parameters (e.g. prune layers), each point labelled with its ξ; the dense model is a
  star when known.

Several multirun dirs can be given; ``--gmacs gmacs_linear`` plots the linear/conv-only count
(DoViT's convention). Only pandas and matplotlib are needed (no torch), so notebooks can import it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

RESULT_KEYS = ("mIoU", "aAcc", "mAcc", "gmacs", "gmacs_linear", "gmacs_dense", "gmacs_linear_dense", "images")


def _threshold(value: Any) -> Any:
    """ξ as one float when every stage shares it, else 'a/b' (stable and plottable)."""
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
            raise FileNotFoundError(f"{sweep} is not a directory (give the multirun dir, e.g. logs/eval/multiruns/<time>).")
        for path in sorted(sweep.glob("*/metrics.json"), key=_job_key):
            m = json.loads(path.read_text())
            run = path.parent
            cfg = m.get("config") or {}
            model = cfg.get("model") or {}
            row: dict[str, Any] = {"sweep": sweep.name, "run": run.name,
                                   "threshold": _threshold(m.get("threshold"))}
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
        raise FileNotFoundError(f"No */metrics.json under {', '.join(map(str, dirs))}: is this a finished multirun dir?")
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
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    group = varied_columns(table)
    parts = [("", table)] if not group else list(table.groupby(group, dropna=False, sort=True))
    for name, part in parts:
        part = part.dropna(subset=[gmacs, "mIoU"]).sort_values(gmacs)
        if part.empty:
            continue
        label = None
        if group:
            values = name if isinstance(name, tuple) else (name,)
            label = ", ".join(f"{c.removeprefix('override:')}={v}" for c, v in zip(group, values))
        ax.plot(part[gmacs], part["mIoU"], "o-", label=label)
        for _, row in part.iterrows():
            ax.annotate(f"ξ={row['threshold']}", (row[gmacs], row["mIoU"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    dense_col = "gmacs_dense" if gmacs == "gmacs" else "gmacs_linear_dense"
    if "dense_mIoU" in table and dense_col in table:
        dense = table.dropna(subset=["dense_mIoU", dense_col])
        if not dense.empty:
            ax.plot(dense[dense_col].iloc[:1], dense["dense_mIoU"].iloc[:1], "k*", ms=12, label="dense")
    ax.set_xlabel("GMACs / image" + (" (linear/conv only)" if gmacs == "gmacs_linear" else ""))
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title or "mIoU vs GMACs", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path)


def write(table: pd.DataFrame, out_dir: str | Path, gmacs: str = "gmacs", title: str | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sweep.csv", "md": out / "sweep.md", "png": out / "sweep.png"}
    table.to_csv(paths["csv"], index=False)
    shown = [c for c in ("threshold", *varied_columns(table), "mIoU", "dense_mIoU", "gmacs", "gmacs_linear",
                         "gmacs_dense") if c in table]
    shown += [c for c in table.columns if c.startswith("keep_s")]
    paths["md"].write_text(f"# {title or 'Sweep'}\n\n" + to_markdown(table, shown))
    plot(table, paths["png"], gmacs=gmacs, title=title)
    return paths


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", help="Hydra multirun dir(s), e.g. logs/eval/multiruns/<time>")
    parser.add_argument("--out", default=None, help="output folder (default: the first multirun dir)")
    parser.add_argument("--gmacs", default="gmacs", choices=("gmacs", "gmacs_linear"),
                        help="GMACs convention of the plot (all MACs, or linear/conv only as mmcv/DoViT)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    table = collect(args.sweep_dirs)
    paths = write(table, args.out or args.sweep_dirs[0], gmacs=args.gmacs, title=args.title)
    print(to_markdown(table, [c for c in ("threshold", *varied_columns(table), "mIoU", "gmacs", "gmacs_linear")
                              if c in table] + [c for c in table.columns if c.startswith("keep_s")]))
    print("\n".join(f"{k}: {p}" for k, p in paths.items()))
    return table


if __name__ == "__main__":
    main()
