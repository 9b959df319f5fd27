"""Analytic multiply-accumulate counts from real token counts, in two named conventions.

- ``macs``: every MAC, attention QKᵀ and AV included, patch embedding and heads (fvcore's
  convention, which the DToP paper's GFLOPs use);
- ``macs_linear``: linear and convolution layers only, no attention matmuls (mmcv's counter, which
  the DoViT paper's FLOPs use).

Norms, activations, softmax and interpolation are not counted in either (neither counter does).
Tests hold these formulas to ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 · MACs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import Tensor


def block_coefficients(block: Block) -> tuple[int, int]:
    """(linear MACs per token, attention MACs per token pair) of one timm ViT block."""
    attn = block.attn
    dim = attn.qkv.in_features
    attn_dim = attn.num_heads * attn.head_dim
    linear = dim * 3 * attn_dim + attn_dim * attn.proj.out_features
    if getattr(attn, "gate", None) is not None:
        linear += dim * attn_dim
    linear += sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
    return linear, 2 * attn_dim


def blocks_macs(blocks: Sequence[Block], n: Tensor) -> tuple[Tensor, Tensor]:
    """MACs of consecutive blocks for ``n`` tokens per image ([B] tensor): (all, linear only)."""
    linear = sum(block_coefficients(b)[0] for b in blocks)
    pairs = sum(block_coefficients(b)[1] for b in blocks)
    n = n.to(torch.float64)
    lin = n * linear
    return lin + n * n * pairs, lin


def patch_embed_macs(num_patches: int, patch_size: int, in_chans: int, dim: int) -> int:
    return num_patches * patch_size * patch_size * in_chans * dim
