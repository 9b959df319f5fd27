"""Analytic multiply-accumulate counts from real token counts, in three named conventions.

- ``macs``: every MAC of the model as it runs, attention QKᵀ and AV included, patch embedding and
  heads (fvcore's convention, which the DToP paper's GFLOPs use; fvcore also counts norms, a few
  tenths of a percent);
- ``macs_linear``: linear and convolution layers only, no attention or other matmuls;
- ``macs_mmcv``: what mmcv's ``get_model_complexity_info`` reports for the architecture the DoViT
  paper counted: linear and convolution layers with their biases, LayerNorms (2 per element) and
  ReLUs (1), no attention matmuls, and the SETR head's classifier where mmseg runs it (after its ×4
  upsampling: ``FCNHead(classifier_scale=4)``). The DoViT paper's FLOPs are this count.

``macs`` and ``macs_linear`` are held to ``torch.utils.flop_counter.FlopCounterMode`` by the tests
(FLOPs = 2 · MACs); ``macs_mmcv`` to the dense numbers of the DoViT paper's tables.
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


def block_mmcv(block: Block) -> int:
    """mmcv MACs per token of one block: its linears (no biases: mmcv counts in·out) and two LayerNorms."""
    return block_coefficients(block)[0] + 2 * 2 * block.attn.qkv.in_features


def patch_embed_mmcv(num_patches: int, patch_size: int, in_chans: int, dim: int) -> int:
    """mmcv MACs of the patch embedding: the convolution and its bias."""
    return patch_embed_macs(num_patches, patch_size, in_chans, dim) + num_patches * dim
