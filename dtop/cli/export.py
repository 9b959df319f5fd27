"""``dtop-export ckpt_path=... format=hub|onnx output=<folder>``: a checkpoint as a portable artifact.

- ``format=hub``: ``config.json`` + ``model.safetensors`` + ``README.md`` model card, loadable anywhere
  with ``Segmentor.from_pretrained(folder)`` (no Hydra, no run folder; huggingface_hub's layout).
- ``format=onnx``: ``dense.onnx`` (the unpruned model) and ``pruned.onnx`` (pruning at a fixed token
  capacity per stage: :mod:`dtop.models.static`, docs/export.md) at one fixed input size and batch,
  with ``export.json`` (and the same in each file's metadata) describing inputs, outputs and capacities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dtop.checkpoint import run_config
from dtop.cli.common import cli, hydra_app, log, task_overrides, write_json
from dtop.cli.trained import Trained, data_info, load_trained
from dtop.errors import ConfigError
from dtop.models.static import StaticSegmentor, capacity_tokens, export_onnx
from dtop.version import dtop_version

FORMATS = ("hub", "onnx")
METRIC_KEYS = ("mIoU", "aAcc", "mAcc", "gmacs", "gmacs_linear", "keep_ratio_per_stage", "images", "threshold")


def run_metrics(path: Path) -> dict[str, Any] | None:
    """The metrics.json of the training run that evaluated exactly this checkpoint (``<run>/checkpoints/x.ckpt``
    → ``<run>/metrics.json``), else None: another checkpoint's metrics are never attributed to this one."""
    path = path.resolve()
    file = path.parent.parent / "metrics.json"
    if not file.is_file():
        return None
    metrics = json.loads(file.read_text())
    evaluated = metrics.get("checkpoint")
    return metrics if evaluated and Path(evaluated).resolve() == path else None


def hub_config(cfg: DictConfig, trained: Trained) -> dict[str, Any]:
    """config.json: the model's ``_target_`` tree, its data's metadata, and how it was made."""
    stored = run_config(trained.ckpt)
    metrics = run_metrics(trained.path)
    if metrics is not None:
        dense = {k: v for k, v in (metrics.get("dense") or {}).items() if k in METRIC_KEYS}
        metrics = {**{k: metrics[k] for k in METRIC_KEYS if k in metrics}, "dense": dense or None}
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": data_info(cfg, trained.data),
        "provenance": {
            "experiment": stored.get("experiment"),
            "checkpoint": str(trained.path.resolve()),
            "train_command": " ".join(["dtop-train", *stored.get("overrides", [])]) if stored else None,
            "export_command": " ".join(["dtop-export", *task_overrides()]),
            "metrics": metrics,
        },
    }


def onnx_input_size(cfg: DictConfig, info: dict[str, Any]) -> tuple[int, int]:
    """The fixed [H, W] of the graphs: ``input_size``, else the data's slide window or image size."""
    size = cfg.get("input_size") or info["crop_size"] or info["image_size"]
    if not size or len(size) != 2:
        raise ConfigError("Give the graphs' fixed input size: input_size=[H,W].")
    return int(size[0]), int(size[1])


def capacity_ratios(cfg: DictConfig, trained: Trained) -> list[float]:
    """``capacity`` (one share of the patch tokens per pruning stage), else the mean keep ratios the training
    run measured for this checkpoint at the model's current ξ."""
    num_aux = len(trained.model.aux_heads)
    ratios = cfg.get("capacity")
    if ratios is None:
        metrics = run_metrics(trained.path) or {}
        measured = metrics.get("keep_ratio_per_stage") or []
        same_threshold = list(metrics.get("threshold") or []) == list(trained.model.pruning.threshold)
        if not same_threshold or len(measured) != num_aux + 1:
            raise ConfigError(
                f"Give the pruned graph's capacity: capacity=[r1,...] with {num_aux} shares of the patch tokens "
                "kept after each pruning stage (dtop-eval prints the keep ratio / stage of a threshold). "
                "No training-run metrics of this checkpoint at this threshold were found to take them from."
            )
        ratios = measured[1:]
        log.info("capacity=%s: the keep ratios the training run measured at ξ=%s", ratios, metrics["threshold"])
    ratios = [float(r) for r in ([ratios] if isinstance(ratios, (int, float)) else ratios)]
    if len(ratios) != num_aux:
        raise ConfigError(f"capacity needs one ratio per pruning stage ({num_aux}); got {ratios}.")
    return ratios


def export_onnx_pair(cfg: DictConfig, trained: Trained, output: Path) -> dict[str, Any]:
    """dense.onnx, pruned.onnx (if the model prunes) and export.json describing both."""
    import onnx

    model, info = trained.model, data_info(cfg, trained.data)
    size = onnx_input_size(cfg, info)
    dense = StaticSegmentor(model, size)
    N = dense.grid[0] * dense.grid[1]
    batch, opset = int(cfg.batch_size), int(cfg.opset)
    graphs = {"dense": (dense, None)}
    if model.aux_heads:
        ratios = capacity_ratios(cfg, trained)
        tokens = capacity_tokens(ratios, N)
        graphs["pruned"] = (StaticSegmentor(model, size, tokens), {"ratios": ratios, "tokens": tokens})
    description = {
        "dtop_version": dtop_version(),
        "checkpoint": str(trained.path.resolve()),
        "input": {"name": "images", "shape": [batch, 3, *size], "dtype": "float32"},
        "outputs": {
            "logits": f"[B, {model.num_classes}, {dense.grid[0]}, {dense.grid[1]}] float32 token-grid logits",
            "labels": f"[B, {size[0]}, {size[1]}] int64 class per pixel",
            "exit_stage": f"[B, {dense.grid[0]}, {dense.grid[1]}] int64 stage each token left at "
            f"({model.num_stages - 1}: reached the decode head)",
        },
        "preprocessing": "RGB in [0, 1], (x - mean) / std, resized as data.scale says, [B, 3, H, W]",
        "patch_tokens": N,
        "opset": opset,
        "data": info,
        "graphs": {},
    }
    for name, (module, capacity) in graphs.items():
        path = export_onnx(module, output / f"{name}.onnx", batch, opset)
        description["graphs"][name] = {"file": path.name, "capacity": capacity}
        proto = onnx.load(str(path), load_external_data=False)
        onnx.helper.set_model_props(proto, {"dtop": json.dumps({**description, "graph": name})})
        onnx.save(proto, str(path))
        log.info("Wrote %s (%s)", path, "dense" if capacity is None else f"capacity {capacity['tokens']} of {N}")
    write_json(output / "export.json", description)
    return description


def export(cfg: DictConfig) -> dict[str, Any]:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}; got {cfg.format!r}.")
    output = Path(cfg.output)
    trained = load_trained(cfg)
    if cfg.format == "hub":
        trained.model.save_pretrained(output, hub_config(cfg, trained))
        log.info("Wrote %s: config.json, model.safetensors, README.md", output)
        return {"format": "hub", "output": str(output)}
    return {"format": "onnx", "output": str(output), **export_onnx_pair(cfg, trained, output)}


@hydra_app("export")
def main(cfg: DictConfig) -> None:
    cli(export)(cfg)


if __name__ == "__main__":
    main()
