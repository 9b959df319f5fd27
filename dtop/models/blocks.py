"""timm's ViT ``Block`` run on a packed token stream, with the block's own modules and weights.

Per-token parts (norms, qkv, projections, MLP, LayerScale) run once over the whole stream; attention
runs within each image's segment (:func:`~dtop.ops.attention.segment_attention`); stochastic depth
drops per image, as timm's ``DropPath`` does on a dense batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dtop.models.packed import TokenStream
from dtop.ops.attention import segment_attention


def _drop_path(module: nn.Module, y: Tensor, stream: TokenStream) -> Tensor:
    """Stochastic depth per image (timm's DropPath would drop per token on a packed stream)."""
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.0:
        return y
    keep_prob = 1.0 - module.drop_prob
    keep = y.new_empty(stream.batch_size).bernoulli_(keep_prob)
    if module.scale_by_keep:
        keep = keep / keep_prob
    return y * keep[stream.batch, None]


def _attention(attn: nn.Module, x: Tensor, stream: TokenStream) -> Tensor:
    T = x.shape[0]
    heads, head_dim = attn.num_heads, attn.head_dim
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    q, k, v = attn.qkv(x).view(T, 3, heads, head_dim).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    p = attn.attn_drop.p if attn.training else 0.0
    out = segment_attention(q, k, v, stream, p).reshape(T, heads * head_dim)
    norm = getattr(attn, "norm", None)  # scale-norm, absent in older timm
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def block_forward(block: Block, x: Tensor, stream: TokenStream) -> Tensor:
    """timm ``Block.forward`` on packed tokens [T, C] laid out as ``stream``, with the block's own modules."""
    x = x + _drop_path(block.drop_path1, block.ls1(_attention(block.attn, block.norm1(x), stream)), stream)
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), stream)


def blocks_forward(blocks: Sequence[Block], stream: TokenStream) -> TokenStream:
    """Run consecutive blocks over a stream whose layout does not change in between."""
    x = stream.x
    for block in blocks:
        x = block_forward(block, x, stream)
    return stream.with_x(x)
