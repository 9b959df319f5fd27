"""The packed token stream: every image's active tokens in one [T, C] tensor.

Per-token operations (norms, qkv, projections, MLP, heads) run once on the whole stream; attention
runs per image segment — through varlen flash attention on CUDA, and through a padded, masked SDPA
elsewhere (mathematically the same, used on CPU and for fp32). Index bookkeeping stays on the
device; the only host syncs are the ones :meth:`TokenStream.select` needs to size its output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import Tensor, nn

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None


@dataclass(frozen=True)
class TokenStream:
    """Active tokens of a batch, image after image.

    ``pos`` is a token's index in its image's patch grid, or -1 for tokens that are not patches
    (cls/register prefix tokens and DToP's per-class summary tokens). Segments are contiguous and in
    image order; within an image, prefix tokens come first.
    """

    x: Tensor  # [T, C]
    batch: Tensor  # [T] int64, image index
    pos: Tensor  # [T] int64, patch index or -1
    cu_seqlens: Tensor  # [B + 1] int32
    max_len: int  # longest segment (host int; an upper bound is allowed on CUDA)
    batch_size: int
    num_special: int  # total number of tokens with pos == -1 (host int)
    uniform: bool  # every segment has the same length (enables the unpadded SDPA path)

    @classmethod
    def from_dense(cls, x: Tensor, num_prefix: int) -> TokenStream:
        """Pack a dense [B, L, C] sequence whose first ``num_prefix`` tokens are prefix tokens."""
        B, L, C = x.shape
        dev = x.device
        pos = torch.arange(L, device=dev) - num_prefix
        pos = pos.clamp(min=-1).repeat(B)
        batch = torch.arange(B, device=dev).repeat_interleave(L)
        cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
        return cls(x.reshape(B * L, C), batch, pos, cu, L, B, B * num_prefix, True)

    @property
    def lengths(self) -> Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def with_x(self, x: Tensor) -> TokenStream:
        return replace(self, x=x)

    def select(self, keep: Tensor) -> TokenStream:
        """Keep the tokens where ``keep`` is true, preserving order (one host sync)."""
        counts = torch.zeros(self.batch_size, dtype=torch.long, device=keep.device)
        counts.index_add_(0, self.batch, keep.long())
        special = (keep & (self.pos < 0)).sum()
        n_keep, max_len, min_len, n_special = torch.stack(
            [counts.sum(), counts.max(), counts.min(), special]).tolist()
        idx = torch.argsort((~keep).to(torch.uint8), stable=True)[:n_keep]
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        return TokenStream(self.x[idx], self.batch[idx], self.pos[idx], cu, max_len, self.batch_size,
                           n_special, max_len == min_len)

    def patches(self) -> tuple[Tensor, TokenStream]:
        """Indices of the patch tokens and the sub-stream they form (no host sync)."""
        n = self.x.shape[0] - self.num_special
        if self.num_special == 0:
            return torch.arange(n, device=self.x.device), self
        idx = torch.argsort((self.pos < 0).to(torch.uint8), stable=True)[:n]
        batch = self.batch[idx]
        counts = torch.zeros(self.batch_size, dtype=torch.long, device=batch.device)
        counts.index_add_(0, batch, torch.ones_like(batch))
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        if self.x.is_cuda:
            max_len, uniform = self.max_len, False
        else:
            max_len, min_len = torch.stack([counts.max(), counts.min()]).tolist()
            uniform = max_len == min_len
        sub = TokenStream(self.x[idx], batch, self.pos[idx], cu, max_len, self.batch_size, 0, uniform)
        return idx, sub

    def append(self, x: Tensor, batch: Tensor) -> TokenStream:
        """Add non-patch tokens (pos = -1) to the end of their images' segments."""
        if x.shape[0] == 0:
            return self
        all_batch = torch.cat([self.batch, batch])
        order = torch.argsort(all_batch, stable=True)
        counts = torch.zeros(self.batch_size, dtype=torch.long, device=x.device)
        counts.index_add_(0, all_batch, torch.ones_like(all_batch))
        max_len, min_len = torch.stack([counts.max(), counts.min()]).tolist()
        pos = torch.cat([self.pos, torch.full_like(batch, -1)])
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        return TokenStream(torch.cat([self.x, x])[order], all_batch[order], pos[order], cu, max_len,
                           self.batch_size, self.num_special + x.shape[0], max_len == min_len)

    def rank(self) -> Tensor:
        """Each token's index within its segment."""
        return torch.arange(self.x.shape[0], device=self.x.device) - self.cu_seqlens[self.batch].long()

    def pad(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Scatter a packed [T, ...] tensor into [B, max_len, ...] plus a validity mask [B, max_len]."""
        B, L = self.batch_size, self.max_len
        out = t.new_zeros((B, L) + t.shape[1:])
        rank = self.rank()
        out = out.index_put((self.batch, rank), t)
        valid = torch.zeros(B, L, dtype=torch.bool, device=t.device).index_put((self.batch, rank),
                                                                            torch.ones_like(rank, dtype=torch.bool))
        return out, valid

    def unpad(self, t: Tensor) -> Tensor:
        return t[self.batch, self.rank()]


def segment_attention(q: Tensor, k: Tensor, v: Tensor, stream: TokenStream, dropout_p: float = 0.0) -> Tensor:
    """Self-attention of [T, H, D] q/k/v within each image segment → [T, H, D].

    Equal segments (the dense model) take batched SDPA like timm; unequal ones on CUDA take flash
    varlen — the ATen op directly when no gradient is needed (the ``varlen_attn`` wrapper costs
    ~0.2 ms of CPU per call, which dominated batch-1 latency), the autograd-aware wrapper otherwise.
    """
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
    if flash and not stream.uniform:
        cu = stream.cu_seqlens
        if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad):
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, stream.max_len, stream.max_len,
                                                           0.0, False, False)[0]
        if varlen_attn is not None:
            return varlen_attn(q, k, v, cu, cu, stream.max_len, stream.max_len)
    if stream.uniform:
        B = stream.batch_size
        qb, kb, vb = (t.reshape(B, -1, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(q.shape)
    (qp, valid), (kp, _), (vp, _) = stream.pad(q), stream.pad(k), stream.pad(v)
    mask = valid[:, None, None, :]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p)
    return stream.unpad(out.transpose(1, 2))


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


class BlockGraphs:
    """CUDA-graph replay of a block range at bucketed token counts, for inference.

    Eager ViT blocks are CPU-bound below a few thousand tokens (each block is ~10 kernel launches
    through Python); replaying a captured graph removes that overhead. The packed stream is padded to
    a multiple of ``bucket`` tokens with one extra attention segment holding the padding, so one graph
    serves every token count of its bucket; ``max_len`` is rounded up the same way (flash varlen takes
    an upper bound). Graphs are captured lazily, once per (blocks, tokens, max length, batch, dtype).
    """

    def __init__(self, bucket: int = 64) -> None:
        self.bucket = bucket
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}
        self.pool = None

    def _round(self, n: int) -> int:
        return -(-n // self.bucket) * self.bucket

    def __call__(self, blocks: Sequence[Block], stream: TokenStream, full: bool = False) -> TokenStream:
        """``full``: the stream is the whole unpruned batch, whose one size gets an exact graph."""
        T, C = stream.x.shape
        B = stream.batch_size
        uniform = full and stream.uniform
        if uniform:  # the dense layout: exact size, batched SDPA as eager would use
            Tb, max_len = T, stream.max_len
        else:
            Tb = self._round(T + 1)
            max_len = min(Tb, self._round(max(stream.max_len, Tb - T)))
        amp = torch.is_autocast_enabled("cuda")
        amp_dtype = torch.get_autocast_dtype("cuda") if amp else None
        key = (id(blocks[0]), len(blocks), Tb, max_len, B, uniform, stream.x.dtype, amp_dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(blocks, Tb, C, B, max_len, stream.x, amp_dtype, uniform)
        graph, x_in, cu, out = self.graphs[key]
        x_in[:T].copy_(stream.x)
        cu[: B + 1].copy_(stream.cu_seqlens)
        graph.replay()
        return stream.with_x(out[:T].clone())

    def _capture(self, blocks: Sequence[Block], Tb: int, C: int, B: int, max_len: int, like: Tensor,
                 amp_dtype: torch.dtype | None, uniform: bool) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]:
        x_in = like.new_zeros(Tb, C)
        cu = torch.full((B + 2,), Tb, dtype=torch.int32, device=like.device)
        cu[: B + 1] = torch.arange(B + 1, device=like.device, dtype=torch.int32)  # any valid layout to warm up
        dummy = torch.zeros(Tb, dtype=torch.long, device=like.device)
        if uniform:
            capture_stream = TokenStream(x_in, dummy, dummy, cu[: B + 1], max_len, B, 0, True)
        else:
            capture_stream = TokenStream(x_in, dummy, dummy, cu, max_len, B + 1, 0, False)

        def run() -> Tensor:
            with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                                cache_enabled=False):
                x = x_in
                for block in blocks:
                    x = block_forward(block, x, capture_stream)
                return x

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph, x_in, cu, out
