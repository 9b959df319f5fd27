"""A trained segmentor as a folder any machine can load: plain JSON config, safetensors weights, model card.

The layout is huggingface_hub's ``ModelHubMixin`` one (``config.json``, ``model.safetensors``,
``README.md``), so the folder can be pushed to and pulled from the Hub as is; but nothing here needs
Hydra, the run's files or the Hub. ``config.json`` holds the model config as the plain ``_target_``
tree Hydra built it from, which :func:`instantiate` builds again: only callables of dtop's models,
timm's layers and torch.nn, so a downloaded config cannot run arbitrary code.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dtop.errors import CheckpointError, ConfigError
from dtop.version import dtop_version

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ALLOWED_TARGETS = ("dtop.models", "timm.layers", "torch.nn")  # packages whose callables a config may name
SPECIAL_KEYS = ("_target_", "_partial_")


def _allowed(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ALLOWED_TARGETS)


def locate(path: str) -> Callable[..., Any]:
    """The class or function ``path`` names, if it lives in :data:`ALLOWED_TARGETS`; else a ConfigError.

    Both the dotted name and the object's own module are checked, so a name cannot reach outside
    through a module's imports (``dtop.models.vit.os.system``).
    """
    if not isinstance(path, str) or not _allowed(path) or any(p.startswith("_") for p in path.split(".")):
        raise ConfigError(f"_target_ {path!r} is not allowed: a model config may only name {ALLOWED_TARGETS}.")
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # not a module: the name goes on as attributes of a shorter one
            raise
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise ConfigError(f"_target_ {path!r} does not exist ({err}).") from err
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not _allowed(getattr(obj, "__module__", "")):
            raise ConfigError(f"_target_ {path!r} is not a class or function of {ALLOWED_TARGETS}.")
        return obj
    raise ConfigError(f"_target_ {path!r} names no module.")


def instantiate(node: Any) -> Any:
    """Build Hydra's ``_target_`` / ``_partial_`` config tree (plain dicts and lists) without Hydra."""
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: instantiate(v) for k, v in node.items()}
    unknown = [k for k in node if k.startswith("_") and k.endswith("_") and k not in SPECIAL_KEYS]
    if unknown:
        raise ConfigError(f"{node['_target_']}: keys {unknown} are not supported here (only {SPECIAL_KEYS}).")
    target = locate(node["_target_"])
    kwargs = {k: instantiate(v) for k, v in node.items() if k not in SPECIAL_KEYS}
    return functools.partial(target, **kwargs) if node.get("_partial_", False) else target(**kwargs)


def portable_model_config(model: dict[str, Any]) -> dict[str, Any]:
    """A model config that builds without any file or download: the backbone's weights come from
    ``model.safetensors``, so its ``pretrained`` / ``weights`` settings are switched off."""
    config = json.loads(json.dumps(model))  # a deep copy that is plain JSON (or a TypeError naming the value)
    backbone = config.get("backbone")
    if isinstance(backbone, dict):
        backbone["pretrained"] = False
        backbone["weights"] = None
        backbone.pop("pretrained_cfg_overlay", None)
    return config


def _local_folder(path_or_repo: str | Path, revision: str | None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (with huggingface_hub) to its cache."""
    folder = Path(path_or_repo).expanduser()
    if folder.is_dir():
        return folder
    name = str(path_or_repo)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a Hub id ("user/name")
        raise CheckpointError(f"{path_or_repo} is not a folder: pass a folder written by save_pretrained.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise CheckpointError(f"{path_or_repo} is not a folder (and huggingface_hub is not installed).") from err
    try:
        files = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
        return Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=files))
    except Exception as err:  # noqa: BLE001 - a bad id, no network, no access: all mean the same here
        raise CheckpointError(
            f"{path_or_repo} is neither a folder written by save_pretrained / dtop-export format=hub nor a "
            f"reachable Hub repo ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        ) from err


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` (and ``push_to_hub`` with huggingface_hub) for a segmentor.

    ``hub_config`` is the artifact's config: ``model`` (the ``_target_`` tree), ``data`` (classes,
    palette, normalisation, inference mode), ``provenance`` (experiment, commands, metrics) and the
    dtop version. :meth:`from_pretrained` sets it; pass it to :meth:`save_pretrained` otherwise.
    """

    hub_config: dict[str, Any] | None = None

    def save_pretrained(self, save_directory: str | Path, config: dict[str, Any] | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the ``README.md`` model card into the folder."""
        from safetensors.torch import save_model

        config = config if config is not None else self.hub_config
        if not config or not isinstance(config.get("model"), dict) or "_target_" not in config["model"]:
            raise ConfigError(
                "save_pretrained needs the model's config: config={'model': {'_target_': ...}, 'data': {...}} "
                "(dtop-export format=hub ckpt_path=... builds it from a checkpoint)."
            )
        config = {**config, "model": portable_model_config(config["model"]), "dtop_version": dtop_version()}
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
        save_model(self, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CARD_NAME).write_text(self.model_card(config))
        self.hub_config = config
        return folder

    @classmethod
    def from_pretrained(
        cls, pretrained: str | Path, revision: str | None = None, map_location: str | torch.device = "cpu"
    ) -> Any:
        """The segmentor a :meth:`save_pretrained` folder (or a Hub repo of one) holds, in eval mode."""
        from safetensors.torch import load_model

        folder = _local_folder(pretrained, revision)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} has no {' or '.join(missing)}: not a folder written by save_pretrained / "
                "dtop-export format=hub."
            )
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = instantiate(config.get("model"))
        if not isinstance(model, cls):
            raise CheckpointError(f"{folder / CONFIG_NAME} builds a {type(model).__name__}, not a {cls.__name__}.")
        load_model(model, str(folder / WEIGHTS_NAME), strict=True, device=str(map_location))
        model.hub_config = config
        return model.to(map_location).eval()

    def push_to_hub(self, repo_id: str, config: dict[str, Any] | None = None, private: bool | None = None) -> str:
        """Save to a temporary folder and upload it as the Hub model repo ``repo_id`` (needs huggingface_hub
        and a login); returns the commit's URL."""
        try:
            from huggingface_hub import HfApi
        except ImportError as err:
            raise ConfigError("push_to_hub needs huggingface_hub: pip install huggingface_hub.") from err
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, config)
            return str(api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="dtop save_pretrained"))

    def model_card(self, config: dict[str, Any]) -> str:
        """The README.md model card: what the model is, on which data, how good and costly, how it was made."""
        return render_card(self, config)


def _policy_text(model: dict[str, Any]) -> tuple[str, str]:
    policy = model.get("pruning") or {}
    kind = str(policy.get("_target_", "")).rsplit(".", 1)[-1]
    threshold = policy.get("threshold")
    if kind == "DoViT":
        return "dovit", f"DoViT token pass: tokens with confidence > ξ = {threshold} stop at the prune layers"
    if kind == "DToP":
        context = policy.get("context", "topk")
        return "dtop", f"DToP early exit: tokens with confidence ≥ ξ = {threshold} exit ({context} context)"
    return kind.lower() or "dense", f"{kind or 'no'} pruning policy"


def _eval_size(data: dict[str, Any], model: dict[str, Any]) -> tuple[int, int] | None:
    """The input the model sees per forward at evaluation: a slide window, or the data's image size."""
    for size in (data.get("crop_size"), data.get("image_size"), (model.get("backbone") or {}).get("img_size")):
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return int(size[0]), int(size[1])
        if isinstance(size, int):
            return size, size
    return None


def render_card(model: Any, config: dict[str, Any]) -> str:
    """Markdown with huggingface_hub's YAML front matter, from the config and the model itself."""
    spec, data, prov = config["model"], config.get("data") or {}, config.get("provenance") or {}
    tag, method = _policy_text(spec)
    backbone = (spec.get("backbone") or {}).get("name", "?")
    heads = " / ".join(
        str((spec.get(k) or {}).get("_target_", "none")).rsplit(".", 1)[-1] for k in ("decode_head", "aux_head")
    )
    dataset = str(data.get("dataset", "?")).rsplit(".", 1)[-1]
    lines = [
        "---",
        "library_name: dtop",
        "pipeline_tag: image-segmentation",
        f"tags: [semantic-segmentation, vision-transformer, token-pruning, {tag}]",
        "---",
        "",
        f"# {prov.get('experiment') or backbone} · {tag}",
        "",
        f"- **Method**: {method}; prune layers {spec.get('prune_layers')}.",
        f"- **Backbone**: timm `{backbone}`, {model.backbone.depth} layers, width {model.backbone.embed_dim}, "
        f"patch {model.backbone.patch_size}; heads (decode / aux): {heads}.",
        f"- **Data**: {dataset}, {model.num_classes} classes"
        + (f" ({', '.join(map(str, data['class_names']))})" if data.get("class_names") else "")
        + f"; inference `{data.get('eval_mode', 'whole')}`"
        + (f", windows {data.get('crop_size')} stride {data.get('stride')}" if data.get("eval_mode") == "slide" else "")
        + f"; inputs RGB in [0, 1] normalised with mean {data.get('mean')}, std {data.get('std')}.",
    ]
    size = _eval_size(data, spec)
    if size is not None:
        gmacs, linear, _ = (v / 1e9 for v in model.dense_macs(*size))
        lines.append(f"- **Dense cost**: {gmacs:.4f} GMACs ({linear:.4f} linear/conv) per {size[0]}×{size[1]} input.")
    metrics = prov.get("metrics")
    if metrics:
        lines += ["", "## Metrics (this checkpoint, as its training run evaluated it)", ""]
        lines += ["| model | mIoU | aAcc | mAcc | GMACs | keep ratio / stage | images |", "|---" * 7 + "|"]
        pruned = f"pruned (ξ = {', '.join(map(str, metrics.get('threshold') or []))})"
        for name, row in ((pruned, metrics), ("dense", metrics.get("dense"))):
            if row:
                keep = " / ".join(f"{k:.2f}" for k in row.get("keep_ratio_per_stage", [1.0]))
                lines.append(
                    f"| {name} | {row.get('mIoU')} | {row.get('aAcc')} | {row.get('mAcc')} | {row.get('gmacs')} "
                    f"| {keep} | {metrics.get('images')} |"
                )
    lines += ["", "## How it was made", ""]
    for key, label in (("train_command", "Trained with"), ("export_command", "Exported with")):
        if prov.get(key):
            lines += [f"{label}:", "", "```bash", prov[key], "```", ""]
    lines += [
        f"dtop {config.get('dtop_version', dtop_version())}. Load it with:",
        "",
        "```python",
        "from dtop.models.engine import Segmentor",
        "model = Segmentor.from_pretrained('<this folder or Hub repo>')",
        "labels, out = model.segment(images)  # images: [B, 3, H, W] normalised as above",
        "```",
        "",
    ]
    return "\n".join(lines)
