"""What every Hydra entry point shares: known errors, configs stored in checkpoints, building objects,
running an evaluation, writing results."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from dtop.checkpoint import describe_config, load_model_weights, read_checkpoint, run_config
from dtop.data.base import SegDataModule
from dtop.errors import ConfigError, DtopError
from dtop.lit.checkpointing import AtomicCheckpointIO
from dtop.lit.module import SegModule
from dtop.models.engine import Segmentor

log = logging.getLogger("dtop")
CONFIG_PATH = str(Path(__file__).resolve().parents[2] / "conf")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡")


# Lightning's adverts for cloud services, and a deprecation inside Lightning itself, are noise in every run
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
STORED = ("model", "data", "module", "trainer")  # config groups every checkpoint carries


# ------------------------------------------------------------------------------------------ known errors
def known_error(err: BaseException) -> BaseException | None:
    """The dtop error behind ``err`` (through Hydra's instantiation and DataLoader workers), else None.

    A ``ValueError`` or ``TypeError`` raised while Hydra instantiates a config object is a config error.
    """
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, (DtopError, FloatingPointError)):
            return node
        if isinstance(node, InstantiationException) and isinstance(node.__cause__, (ValueError, TypeError)):
            target = str(node).split("\n", 1)[0].removesuffix(":")
            key = next((line.split(":", 1)[1].strip() for line in str(node).splitlines() if "full_key" in line), "")
            return known_error(node.__cause__) or ConfigError(f"{key or target}: {_message(node.__cause__)}")
        node = node.__cause__ or node.__context__
    return None


def _message(err: BaseException) -> str:
    """An error's own message (a DataLoader worker's re-raised error: the original's last line)."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def cli(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """A Hydra task that reports a known error as one message on stderr and exits with code 2.

    The traceback is shown only with ``HYDRA_FULL_ERROR=1`` or ``DTOP_DEBUG=1``.
    """

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as err:
            known = known_error(err)
            if known is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DTOP_DEBUG") == "1":
                raise
            print(f"\n{type(known).__name__}: {_message(known)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return run


# ------------------------------------------------------------------------------ configs in checkpoints
def task_overrides() -> list[str]:
    """The command line's overrides of this job (empty outside a Hydra app)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def experiment_name() -> str | None:
    return HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None


def make_run_config(cfg: DictConfig) -> dict[str, Any]:
    """What every checkpoint of this run stores: the resolved model, data, module and trainer configs,
    the experiment and the command line's overrides (:mod:`dtop.checkpoint`)."""
    out: dict[str, Any] = {"experiment": cfg.get("experiment_name") or experiment_name(), "overrides": task_overrides()}
    for key in STORED:
        if key in cfg:
            out[key] = _resolved(cfg[key])
    return out


def store_normalisation(run_config: dict[str, Any], dm: SegDataModule) -> None:
    """Write the normalisation the run used into its stored data config (it may have come from the weights)."""
    data = run_config.setdefault("data", {})
    data["mean"], data["std"] = (list(v) for v in dm.normalisation)


def _resolved(node: DictConfig) -> dict[str, Any]:
    """``node`` as a plain dict, each entry resolved where it can be (the run dir is not known outside a
    Hydra app, e.g. in a notebook: such entries are left out)."""
    out: dict[str, Any] = {}
    for key in node:
        try:
            value = node[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except InterpolationResolutionError:
            continue
    return out


def checkpoint_overrides(args: list[str], groups: tuple[str, ...] = ("model", "data")) -> list[str]:
    """The command line with ``model.*``/``data.*`` keys force-added (``++``) when it reads a checkpoint.

    With ``ckpt_path=`` the config comes from the checkpoint, whose model and data may have keys the
    default composition lacks (``dtop-eval ckpt_path=X data.root=...`` on a CamVid checkpoint, while the
    default data is the synthetic set): Hydra would refuse them before the checkpoint is read.
    """
    if not any(a.startswith("ckpt_path=") for a in args) or _explicit(args, groups):
        return args
    return [
        f"++{a}"
        if not a.startswith(("+", "~", "-"))
        and a.split("=", 1)[0].split(".", 1)[0] in groups
        and "." in a.split("=", 1)[0]
        else a
        for a in args
    ]


def hydra_app(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` on dtop's configs, whose command line may override keys of a checkpoint's config."""

    def wrap(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        app = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)

        @functools.wraps(task)
        def main() -> Any:
            sys.argv[1:] = checkpoint_overrides(sys.argv[1:])
            return app()

        return main

    return wrap


def _explicit(overrides: list[str], groups: tuple[str, ...]) -> list[str]:
    """The overrides that choose a config group or experiment (``experiment=x``, ``model=y``)."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in ("experiment", *groups)]


def use_checkpoint_config(cfg: DictConfig, groups: tuple[str, ...] = ("model", "data")) -> dict[str, Any] | None:
    """Take ``groups`` of the config from ``cfg.ckpt_path``'s checkpoint, unless the command line chose them.

    A checkpoint is self-describing: ``dtop-eval ckpt_path=X`` needs no ``experiment=``. Key overrides
    (``model.pruning.threshold=0.9``, ``data.root=...``) still apply on top. Returns the checkpoint (read
    once), or None without ``ckpt_path``. With an explicit ``experiment=``/group choice the composed
    config is kept and loading checks that it fits (one error naming both configs if not).
    """
    path = cfg.get("ckpt_path")
    if not path:
        return None
    ckpt = read_checkpoint(path)
    stored = run_config(ckpt)
    overrides = task_overrides()
    if not stored or _explicit(overrides, groups):
        return ckpt
    with open_dict(cfg):
        for key in groups:
            if key in stored:
                cfg[key] = OmegaConf.create(stored[key])
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.key_or_group
            if key.split(".", 1)[0] in groups and "." in key and not override.is_delete():
                OmegaConf.update(cfg, key, override.value(), force_add=True)
        cfg["experiment_name"] = stored.get("experiment")
    log.info("Using the config %s was trained with: %s", path, describe_config(stored))
    return ckpt


def describe_cfg(cfg: DictConfig) -> str:
    """:func:`~dtop.checkpoint.describe_config` of a composed config."""
    return describe_config(
        {
            "experiment": cfg.get("experiment_name") or experiment_name(),
            **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data") if k in cfg},
        }
    )


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None) -> None:
    """Print the resolved config as a Rich tree and save it (resolved YAML) in the run dir."""
    tree = Tree("config", guide_style="dim")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, value in resolved.items():
        branch = tree.add(f"[bold]{key}")
        branch.add(
            OmegaConf.to_yaml(
                OmegaConf.create({key: value}) if not isinstance(value, dict) else OmegaConf.create(value)
            ).rstrip()
        )
    Console().print(tree)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / "config.yaml").write_text(OmegaConf.to_yaml(resolved))


def build(cfg: DictConfig) -> tuple[SegDataModule, SegModule]:
    """Instantiate the DataModule, the Segmentor and the LightningModule that joins them."""
    dm: SegDataModule = instantiate(cfg.data)
    model: Segmentor = instantiate(cfg.model)
    if model.backbone.has_weights:  # a randomly initialised backbone takes the data's default
        dm.follow_weights(*model.backbone.mean_std, weights=model.backbone.weights_name)
    module: SegModule = instantiate(cfg.module)(
        model=model,
        num_classes=dm.num_classes,
        ignore_index=dm.ignore_index,
        eval_mode=dm.eval_mode,
        crop_size=dm.crop_size,
        stride=dm.stride,
        class_names=list(dm.class_names),
        seed=int(cfg.get("seed", 0)),
        run_config=make_run_config(cfg),
    )
    store_normalisation(module.run_config, dm)
    return dm, module


def make_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """The configured Trainer, its checkpoints written atomically. A GPU trainer on a machine without one
    falls back to the CPU in fp32, with a warning."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]
    if not loggers:  # nothing to log the learning rate to: Lightning would refuse the monitor
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False, "plugins": [AtomicCheckpointIO()]}
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        log.warning(
            "trainer.accelerator=%s but no CUDA device is visible: running on the CPU in fp32 (slow). "
            "Add trainer=default to choose the CPU yourself.",
            cfg.trainer.accelerator,
        )
        kwargs.update(accelerator="cpu", devices=1, precision="32-true", strategy="auto", sync_batchnorm=False)
    elif cfg.trainer.get("accelerator") == "cpu" and torch.cuda.is_available():
        log.warning(
            "A CUDA device is visible but trainer.accelerator=cpu (trainer=default): running on the CPU. Add "
            "trainer=gpu for bf16 on the GPU (evaluation then replays CUDA graphs)."
        )
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)


def evaluate(trainer: L.Trainer, module: SegModule, dm: SegDataModule) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the test loop; return the metrics dict and the per-image table."""
    trainer.test(module, datamodule=dm, verbose=False)
    return dict(module.last_eval), pd.DataFrame(module.per_image)


def evaluate_checkpoint(
    cfg: DictConfig, dm: SegDataModule, module: SegModule, trainer: L.Trainer, ckpt_path: str | None, eval_dense: bool
) -> dict[str, Any]:
    """Evaluate pruned (and dense) after loading ``ckpt_path``; write metrics.json and per_image.parquet."""
    if ckpt_path:
        load_model_weights(module.model, ckpt_path, configured=describe_cfg(cfg))
    metrics, table = evaluate(trainer, module, dm)
    out_dir = Path(cfg.paths.output_dir)
    # Under DDP every rank holds the same gathered table and metrics (dtop.lit.distributed); rank 0 writes them.
    writer = trainer.is_global_zero
    if writer:
        table.to_parquet(out_dir / "per_image.parquet", index=False)
    metrics["threshold"] = list(module.model.pruning.threshold)
    if eval_dense:
        with module.model.dense_mode():
            dense, dense_table = evaluate(trainer, module, dm)
        if writer:
            dense_table.to_parquet(out_dir / "per_image_dense.parquet", index=False)
        metrics["dense"] = {
            k: dense[k]
            for k in (
                "mIoU",
                "aAcc",
                "mAcc",
                "gmacs",
                "gmacs_linear",
                "gmacs_mmcv",
                "gmacs_per_crop",
                "gmacs_linear_per_crop",
                "gmacs_mmcv_per_crop",
                "per_class",
            )
        }
    metrics["checkpoint"] = ckpt_path
    timed = module.train_speed
    if timed["steps"] > 0:  # this process trained the model: its throughput, validation and warm-up left out
        metrics["train_speed"] = {
            "images_per_s": round(timed["images"] / timed["seconds"], 2),
            "steps_per_s": round(timed["steps"] / timed["seconds"], 3),
            "timed_steps": timed["steps"],
        }
    if writer:
        write_metrics(out_dir, metrics, cfg)
    return metrics


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: valid JSON (``NaN`` is not)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False))


def write_metrics(out_dir: Path, metrics: dict[str, Any], cfg: DictConfig) -> None:
    write_json(out_dir / "metrics.json", {**metrics, "config": OmegaConf.to_container(cfg, resolve=True)})


def print_summary(metrics: dict[str, Any], title: str = "dtop") -> None:
    """The closing table: pruned (and dense) mIoU/aAcc/mAcc, GMACs and keep ratios."""
    table = Table(title=title)
    for col in ("model", "mIoU", "aAcc", "mAcc", "GMACs", "GMACs (linear)", "keep ratio / stage", "images"):
        table.add_column(col, justify="right")
    keep = " / ".join(f"{k:.2f}" for k in metrics.get("keep_ratio_per_stage", []))
    thr = metrics.get("threshold")
    label = f"pruned (ξ={thr[0] if thr and len(thr) == 1 else thr})"
    table.add_row(
        label,
        *(f"{metrics[k]:.2f}" for k in ("mIoU", "aAcc", "mAcc")),
        f"{metrics['gmacs']:.4f}",
        f"{metrics['gmacs_linear']:.4f}",
        keep,
        str(metrics["images"]),
    )
    dense = metrics.get("dense")
    if dense:
        table.add_row(
            "dense",
            *(f"{dense[k]:.2f}" for k in ("mIoU", "aAcc", "mAcc")),
            f"{dense['gmacs']:.4f}",
            f"{dense['gmacs_linear']:.4f}",
            "1.00",
            str(metrics["images"]),
        )
    Console().print(table)
