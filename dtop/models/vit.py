"""The backbone: any timm plain ViT, built with dynamic image size and pretrained or local weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from dtop.errors import ConfigError, WeightsError


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsError(f"Backbone weights not found: {path}. Pass an existing file as model.backbone.weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise WeightsError(
            f"Could not read backbone weights {path} ({type(err).__name__}: {err}). "
            "Is the file complete? Re-copy or re-export it."
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("backbone.").removeprefix("module."): v for k, v in state.items()}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (timm would otherwise retry for about a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _pretrained_state(name: str, pretrained_cfg: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """The state dict of timm's pretrained weights for ``name`` (honouring ``pretrained_cfg_overlay``, e.g.
    ``file=``), and where it came from; one :class:`WeightsError` that says what to do if unavailable."""
    from timm.models._builder import _resolve_pretrained_source, load_state_dict_from_hf, load_state_dict_from_url

    load_from, loc = _resolve_pretrained_source(pretrained_cfg)
    tag = pretrained_cfg.get("tag") or "default"
    advice = (
        "Pass a local file of these weights as model.backbone.weights=<file> (or "
        "+model.backbone.pretrained_cfg_overlay.file=<file>), or start from scratch with "
        "model.backbone.pretrained=false."
    )
    if load_from == "file":
        return _read_state_dict(Path(loc)), str(loc)
    if load_from == "state_dict":
        return dict(loc), "state_dict"
    if load_from not in ("hf-hub", "url"):
        raise WeightsError(f"timm has no pretrained weights for {name!r} (tag {tag!r}). {advice}")
    where = loc if isinstance(loc, str) else "/".join(loc)
    try:
        if load_from == "hf-hub":
            from huggingface_hub import try_to_load_from_cache

            repo, filename = (loc, None) if isinstance(loc, str) else loc
            cached = any(
                isinstance(try_to_load_from_cache(repo, f), str)
                for f in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"])
            )
            if not cached and not _hub_reachable():
                raise OSError("not in the local cache, and the Hugging Face hub is unreachable")
            state = load_state_dict_from_hf(*([loc] if isinstance(loc, str) else loc))
        else:
            state = load_state_dict_from_url(loc, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - network, cache and format failures all mean the same here
        raise WeightsError(
            f"model.backbone.pretrained=true needs timm's {name!r} weights (tag {tag!r}) from {where}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. {advice}"
        ) from err
    return state, where


class ViTBackbone(nn.Module):
    """A timm VisionTransformer whose blocks the pruning engine drives one by one.

    The model is created with ``dynamic_img_size=True`` so any input whose sides are multiples of
    the patch size works; the position embedding is resampled to the input grid on the fly.
    ``pretrained`` loads timm's weights for ``name`` (tag and source from its ``pretrained_cfg``, which
    ``pretrained_cfg_overlay`` may override, e.g. ``file=``) through the same loader as ``weights``, so
    every backbone variant takes them (no cls token, another grid, registers): timm's own loader
    cannot reshape a cls-token position embedding for a model without one.
    ``compile_blocks`` runs the blocks' per-token parts through ``torch.compile``
    (:mod:`dtop.models.blocks`): for host-bound GPU training steps; it compiles once, on the first step.
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        img_size: tuple[int, int] | int = 224,
        pretrained: bool = False,
        weights: str | None = None,
        drop_path_rate: float = 0.0,
        final_norm: bool = True,
        compile_blocks: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.compile_blocks = compile_blocks
        vit = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            img_size=img_size,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            **model_kwargs,
        )
        if not isinstance(vit, VisionTransformer) or not all(type(b) is Block for b in vit.blocks):
            raise ConfigError(
                f"{name!r} is not a plain timm ViT (VisionTransformer with standard Blocks); "
                "token pruning needs one, e.g. vit_base_patch16_224, deit_small_patch16_224, "
                "vit_small_patch14_dinov2."
            )
        if not final_norm:  # the decode head reads the last block's output as it is (SegViT, DToP's ATM models)
            vit.norm = nn.Identity()
        self.vit = vit
        self.name = name
        self.has_weights = bool(weights or pretrained)
        tag = vit.pretrained_cfg.get("tag")
        self._weights_name = f"weights {weights}" if weights else f"timm's {name}" + (f".{tag}" if tag else "")
        if weights:
            self.load_weights(weights)
        elif pretrained:
            state, where = _pretrained_state(name, dict(vit.pretrained_cfg))
            self.load_state(state, where)

    @property
    def weights_name(self) -> str:
        """Which weights the backbone holds (for messages): a file, timm's tag, or none."""
        return self._weights_name

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input normalisation these weights were trained with (timm's ``pretrained_cfg``)."""
        cfg = self.vit.pretrained_cfg
        return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def has_cls_token(self) -> bool:
        return self.vit.cls_token is not None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        return self.vit.norm

    def load_weights(self, path: str | Path) -> None:
        """Load a timm-format checkpoint file, resampling ``pos_embed`` to this model's grid."""
        self.load_state(_read_state_dict(Path(path)), str(path))

    def load_state(self, state: dict[str, Tensor], path: str) -> None:
        """Load a timm-format state dict (from ``path``, for messages), resampling ``pos_embed`` to this
        model's grid and dropping what this variant does not have (classifier, cls/register tokens)."""
        state = {k.removeprefix("backbone.").removeprefix("module."): v for k, v in state.items()}
        own = self.vit.state_dict()
        if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
            state["pos_embed"] = self._fit_pos_embed(state["pos_embed"].float())
        dropped = ("head.", "fc_norm.") + (() if isinstance(self.vit.norm, nn.LayerNorm) else ("norm.",))
        state = {k: v for k, v in state.items() if not k.startswith(dropped)}
        for token in ("cls_token", "reg_token"):  # e.g. SegViT drops the ImageNet cls token
            if getattr(self.vit, token) is None:
                state.pop(token, None)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
        if missing or unexpected:
            raise WeightsError(
                f"Weights {path} do not fit backbone {self.name!r}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. Check model.backbone.name matches the checkpoint."
            )
        bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
        if bad:
            raise WeightsError(f"Shape mismatch for {bad[:5]} loading {path}.")

    def _fit_pos_embed(self, pos: Tensor) -> Tensor:
        """Resample a checkpoint's position embedding to this model's grid and prefix tokens.

        A checkpoint with a cls position (e.g. ImageNet ViT-B, 1 + 14²) loaded into a model without a
        cls token (SegViT's backbone) keeps only the grid part; the prefix count is read off the size.
        """
        own_prefix = 0 if self.vit.no_embed_class else self.num_prefix_tokens
        n = pos.shape[1]
        side = int(round((n - own_prefix) ** 0.5))
        ckpt_prefix = own_prefix if side * side == n - own_prefix else n - int(n**0.5) ** 2
        grid = pos[:, ckpt_prefix:]
        grid = resample_abs_pos_embed(grid, new_size=list(self.vit.patch_embed.grid_size), num_prefix_tokens=0)
        prefix = pos[:, :ckpt_prefix][:, :own_prefix]
        if prefix.shape[1] != own_prefix:
            raise WeightsError(f"Checkpoint pos_embed has {ckpt_prefix} prefix positions; model needs {own_prefix}.")
        return torch.cat([prefix, grid], dim=1)

    def embed(self, images: Tensor) -> Tensor:
        """Patch-embed and add positions: [B, 3, H, W] → [B, prefix + h·w, C]."""
        vit = self.vit
        x = _patch_embed(vit.patch_embed, images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)


def _patch_embed(pe: nn.Module, images: Tensor) -> Tensor:
    """timm's ``PatchEmbed`` with its stride = kernel convolution computed as one matmul over patches.

    The same function, but cuDNN's bf16 kernel for this conv was a large share of ViT-B's forward
    (docs/performance.md); the matmul runs at GEMM speed. Other layouts fall back.
    """
    proj = getattr(pe, "proj", None)
    p = proj.kernel_size if isinstance(proj, nn.Conv2d) else None
    B, C, H, W = images.shape
    fmt = "NLC" if getattr(pe, "flatten", False) else str(getattr(getattr(pe, "output_fmt", None), "value", ""))
    if (
        p is None
        or proj.stride != p
        or proj.padding != (0, 0)
        or proj.dilation != (1, 1)
        or proj.groups != 1
        or H % p[0]
        or W % p[1]
        or fmt not in ("NLC", "NHWC")
        or (pe.img_size is not None and getattr(pe, "strict_img_size", False) and (H, W) != tuple(pe.img_size))
    ):
        return pe(images)
    h, w = H // p[0], W // p[1]
    patches = images.view(B, C, h, p[0], w, p[1]).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C * p[0] * p[1])
    x = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)  # one 2-D GEMM
    return pe.norm(x.view(B, h * w, -1) if fmt == "NLC" else x.view(B, h, w, -1))
