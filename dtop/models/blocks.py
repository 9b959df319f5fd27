"""timm's ViT ``Block`` run on a packed token stream, with the block's own modules and weights.

Per-token parts (norms, qkv, projections, MLP, LayerScale) run once over the whole stream; attention
runs within each image's segment (:func:`~dtop.ops.attention.segment_attention`); stochastic depth
drops per image, as timm's ``DropPath`` does on a dense batch.

With ``compiled=True`` the per-token parts of a training forward, before and after attention, run as two
``torch.compile`` functions, dynamic in the number of tokens: every block of a backbone shares them (the
block is an argument, its weights are inputs), so one compilation serves every block and every pruned
token count. They fuse the norms, casts, GELU and residual adds and issue a block in a few launches, which
is what a host-bound training step needs; attention stays outside, on its own kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dtop.models.packed import TokenStream
from dtop.ops.attention import segment_attention


def _block_pre(block: Block, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-token part before the segments meet: q, k, v [T, H, D] of the normed tokens and the gate (or None)."""
    attn, x = block.attn, block.norm1(x)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    q, k, v = attn.qkv(x).view(x.shape[0], 3, attn.num_heads, attn.head_dim).unbind(1)
    return attn.q_norm(q), attn.k_norm(k), v, gate


def _block_post(
    block: Block, x: Tensor, out: Tensor, gate: Tensor | None, keep1: Tensor | None, keep2: Tensor | None
) -> Tensor:
    """Per-token part after attention's [T, H, D] ``out``: projection, both residuals and the MLP."""
    attn, out = block.attn, out.reshape(out.shape[0], -1)
    norm = getattr(attn, "norm", None)  # scale-norm, absent in older timm
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    y = block.ls1(attn.proj_drop(attn.proj(out)))
    x = x + (y if keep1 is None else y * keep1[:, None])
    y = block.ls2(block.mlp(block.norm2(x)))
    return x + (y if keep2 is None else y * keep2[:, None])


_compiled_pre = torch.compile(_block_pre, dynamic=True)
_compiled_post = torch.compile(_block_post, dynamic=True)


def _token_keep(module: nn.Module, stream: TokenStream, like: Tensor) -> Tensor | None:
    """Stochastic depth's factor per token, drawn per image (timm's DropPath would drop per token on a packed
    stream); None where the path is not dropped."""
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.0:
        return None
    keep_prob = 1.0 - module.drop_prob
    keep = like.new_empty(stream.batch_size).bernoulli_(keep_prob)
    if module.scale_by_keep:
        keep = keep / keep_prob
    return keep[stream.batch]


def block_forward(block: Block, x: Tensor, stream: TokenStream, compiled: bool = False) -> Tensor:
    """timm ``Block.forward`` on packed tokens [T, C] laid out as ``stream``, with the block's own modules;
    ``compiled``: its per-token parts compiled (see the module docstring)."""
    pre, post = (_compiled_pre, _compiled_post) if compiled else (_block_pre, _block_post)
    q, k, v, gate = pre(block, x)
    p = block.attn.attn_drop.p if block.attn.training else 0.0
    out = segment_attention(q, k, v, stream, p)
    keep1, keep2 = (_token_keep(m, stream, x) for m in (block.drop_path1, block.drop_path2))
    return post(block, x, out, gate, keep1, keep2)


def blocks_forward(blocks: Sequence[Block], stream: TokenStream, compiled: bool = False) -> TokenStream:
    """Run consecutive blocks over a stream whose layout does not change in between; ``compiled`` applies to
    training (gradients on): inference replays CUDA graphs, which remove the host's part on their own."""
    compiled = compiled and torch.is_grad_enabled()
    x = stream.x
    for block in blocks:
        x = block_forward(block, x, stream, compiled)
    return stream.with_x(x)
