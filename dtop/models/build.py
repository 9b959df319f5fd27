"""Assemble a :class:`Segmentor` from plain arguments (what the Hydra model configs call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dtop.models.engine import Segmentor
from dtop.models.heads.base import SegHead
from dtop.models.policies import Policy
from dtop.models.vit import ViTBackbone

HeadFactory = Callable[..., SegHead]


def _make_head(factory: HeadFactory, backbone: ViTBackbone, num_classes: int) -> SegHead:
    """Fill in the backbone width and class count unless the config pinned them explicitly."""
    given = getattr(factory, "keywords", {}) or {}
    kwargs: dict[str, Any] = {}
    if "in_channels" not in given:
        kwargs["in_channels"] = backbone.embed_dim
    if "num_classes" not in given:
        kwargs["num_classes"] = num_classes
    return factory(**kwargs)


def build_segmentor(
    backbone: ViTBackbone,
    decode_head: HeadFactory,
    num_classes: int,
    aux_head: HeadFactory | None = None,
    prune_layers: Sequence[int] = (),
    pruning: Policy | None = None,
) -> Segmentor:
    """One aux head (built from ``aux_head``) after each of ``prune_layers``; decode head at the end."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}.")
    prune_layers = list(prune_layers)
    if prune_layers and aux_head is None:
        raise ValueError("prune_layers are set but no aux_head is configured to grade tokens there.")
    aux = [_make_head(aux_head, backbone, num_classes) for _ in prune_layers] if aux_head is not None else []
    return Segmentor(backbone, _make_head(decode_head, backbone, num_classes), aux, prune_layers, pruning)
