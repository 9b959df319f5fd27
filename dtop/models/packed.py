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

from dtop.kernels import load


def running_count(flag: Tensor) -> Tensor:
    """[0, cumsum(flag)]: how many flagged positions precede each position (and, last, the total)."""
    return F.pad(flag.long().cumsum(0), (1, 0))


def _stable_partition(flag: Tensor, before: Tensor) -> Tensor:
    """The permutation listing flagged positions first, then the others, each in their order.

    ``before`` = [0, cumsum(flag)]: the number of flagged positions before each position.
    """
    ar = torch.arange(flag.shape[0], device=flag.device)
    dest = torch.where(flag, before[1:] - 1, before[-1] + ar - before[1:])
    return torch.empty_like(ar).scatter_(0, dest, ar)


def _relabel(order: Tensor, batch: Tensor, pos: Tensor, n_keep: Tensor, rest_batch: int,
             num_patches: int) -> tuple[Tensor, Tensor]:
    """Batch and pos in ``order``; past the first ``n_keep``: image ``rest_batch`` at positions cycling over the grid."""
    ar = torch.arange(order.shape[0], device=order.device)
    first = ar < n_keep
    return torch.where(first, batch[order], rest_batch), torch.where(first, pos[order], ar % num_patches)


def _kept_before(keep: Tensor, batch: Tensor, cu_seqlens: Tensor, n_img: int) -> tuple[Tensor, Tensor, Tensor]:
    """(keep restricted to the first ``n_img`` images, kept tokens before each position, ... before each image)."""
    keep = keep & (batch < n_img)
    kept = running_count(keep)
    return keep, kept, kept[cu_seqlens[: n_img + 1].long()]


def _place(out: Sequence[Tensor] | None, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` copied into the leading elements of the ``out`` buffers (as they are without buffers)."""
    if out is None:
        return list(tensors)
    return [dst[: t.shape[0]].copy_(t) for dst, t in zip(out, tensors)]


def partition_reference(flag: Tensor, batch: Tensor, pos: Tensor, cu_seqlens: Tensor, n_img: int, rest_batch: int,
                        num_patches: int, absorb: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kept tokens (``flag`` set and image < ``n_img``) first, each image's in order, then the rest, in order.

    Returns ``order`` (the permutation), ``batch`` and ``pos`` in that order (the rest relabelled as
    image ``rest_batch`` at positions cycling over ``num_patches``), the kept tokens' ``cu_seqlens``
    over the first ``n_img`` images (int32; with ``absorb`` the last offset is T, so the last image
    takes the rest) and ``stats`` = [kept, longest and shortest kept segment, kept tokens with pos < 0].

    No sort: segments are contiguous and in image order, so a running count of kept tokens gives every
    kept token its place. On CUDA one Triton kernel (:mod:`dtop.kernels.partition`) does all of this.
    """
    keep, kept, before = _kept_before(flag, batch, cu_seqlens, n_img)
    order = _stable_partition(keep, kept)
    out_batch, out_pos = _relabel(order, batch, pos, kept[-1], rest_batch, num_patches)
    counts = before[1:] - before[:-1]
    stats = torch.stack([kept[-1], counts.max(), counts.min(), (keep & (pos < 0)).sum()])
    cu = before.to(torch.int32)
    if absorb:
        cu[-1:].fill_(flag.shape[0])
    return order, out_batch, out_pos, cu, stats


def partition(flag: Tensor, batch: Tensor, pos: Tensor, cu_seqlens: Tensor, n_img: int, rest_batch: int,
              num_patches: int, absorb: bool, out: Sequence[Tensor] | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`partition_reference`, as one Triton kernel on CUDA; ``out`` (batch, pos, cu_seqlens, stats): buffers
    to place the results in (their leading elements)."""
    kernel = load("partition") if flag.is_cuda else None
    if kernel is not None:
        return kernel.partition(flag, batch, pos, cu_seqlens, n_img, rest_batch, num_patches, absorb, out)
    order, *result = partition_reference(flag, batch, pos, cu_seqlens, n_img, rest_batch, num_patches, absorb)
    return order, *_place(out, result)


def _plan_with_extra(keep: Tensor, batch: Tensor, pos: Tensor, cu_seqlens: Tensor, n_img: int, extra: Extra,
                     num_patches: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`partition_reference` over the stream's tokens followed by ``extra``'s (which end their image's segment)."""
    keep, kept, before = _kept_before(keep, batch, cu_seqlens, n_img)
    ekeep = extra.keep & (extra.batch < n_img)
    ekept = running_count(ekeep)
    ebefore = ekept[torch.searchsorted(extra.batch, torch.arange(n_img + 1, device=keep.device))]
    cu = before + ebefore
    n_keep, n_drop = cu[-1], keep.shape[0] - kept[-1]
    ar, ear = torch.arange(keep.shape[0], device=keep.device), torch.arange(ekeep.shape[0], device=keep.device)
    # a kept stream token goes after the kept extras of earlier images; a kept extra token after
    # its image's kept stream tokens; dropped ones follow in order
    dest = torch.cat([torch.where(keep, kept[1:] - 1 + ebefore[batch], n_keep + ar - kept[1:]),
                      torch.where(ekeep, before[(extra.batch + 1).clamp(max=n_img)] + ekept[1:] - 1,
                                  n_keep + n_drop + ear - ekept[1:])])
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(dest.shape[0], device=dest.device))
    all_batch = torch.cat([batch, extra.batch])
    all_pos = torch.cat([pos, torch.full_like(extra.batch, -1)])
    out_batch, out_pos = _relabel(order, all_batch, all_pos, n_keep, n_img, num_patches)
    counts = cu[1:] - cu[:-1]
    special = (keep & (pos < 0)).sum() + ekept[-1]
    return order, out_batch, out_pos, cu.to(torch.int32), torch.stack([n_keep, counts.max(), counts.min(), special])


@dataclass(frozen=True)
class Extra:
    """Tokens a policy adds at a stage end (DToP's class summaries): features, image (in image order), whether kept."""

    x: Tensor  # [G, C]
    batch: Tensor  # [G], non-decreasing
    keep: Tensor  # [G] bool


@dataclass(frozen=True)
class TokenStream:
    """Active tokens of a batch, image after image.

    ``pos`` is a token's index in its image's patch grid, or -1 for tokens that are not patches
    (cls/register prefix tokens and DToP's per-class summary tokens). Segments are contiguous and in
    image order; within an image, prefix tokens come first.

    With ``phantom`` the last image of ``batch_size`` is padding: CUDA-graph replay runs a fixed
    number of tokens, and the tokens past the real ones form one extra image whose results nobody
    reads. Every per-image computation treats it as an ordinary image, so policies and heads need no
    special case; :meth:`select` never keeps its tokens.
    """

    x: Tensor  # [T, C]
    batch: Tensor  # [T] int64, image index
    pos: Tensor  # [T] int64, patch index or -1
    cu_seqlens: Tensor  # [B + 1] int32
    max_len: int  # longest segment (host int; an upper bound is allowed on CUDA)
    batch_size: int
    num_special: int  # total number of tokens with pos == -1 (host int; unused with phantom)
    uniform: bool  # every non-empty segment has ``max_len`` tokens (enables the unpadded SDPA path)
    phantom: bool = False
    fixed: bool = False  # segment lengths follow from the input size alone (no pruning decision shaped them)

    @classmethod
    def from_dense(cls, x: Tensor, num_prefix: int, phantom: bool = False) -> TokenStream:
        """Pack a dense [B, L, C] sequence whose first ``num_prefix`` tokens are prefix tokens.

        ``phantom`` appends an empty padding image (see the class docstring).
        """
        B, L, C = x.shape
        dev = x.device
        pos = torch.arange(L, device=dev) - num_prefix
        pos = pos.clamp(min=-1).repeat(B)
        batch = torch.arange(B, device=dev).repeat_interleave(L)
        cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
        if phantom:
            cu = torch.cat([cu, cu[-1:]])
        return cls(x.reshape(B * L, C), batch, pos, cu, L, B + phantom, B * num_prefix, True, phantom, True)

    @property
    def num_images(self) -> int:
        """Real images (``batch_size`` without the phantom)."""
        return self.batch_size - self.phantom

    def with_x(self, x: Tensor) -> TokenStream:
        return replace(self, x=x)

    def plan(self, keep: Tensor, extra: Extra | None = None, num_patches: int = 1,
             out: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The device-side part of :meth:`select`, free of host syncs (CUDA graphs capture it).

        Returns the candidate features (the stream's, then ``extra``'s), ``order`` putting the kept
        candidates first, in image order, each image's in their current order (extra tokens end their
        image's segment), the candidates' batch and pos in that order (past the kept ones: the phantom
        image ``num_images`` at positions cycling over ``num_patches``), the new ``cu_seqlens`` over
        the real images and ``stats`` = [kept, longest segment, shortest segment, kept non-patch tokens].
        See :func:`partition_reference`; ``out``: buffers for (batch, pos, cu_seqlens, stats).
        """
        n = self.num_images
        if extra is None:
            return self.x, *partition(keep, self.batch, self.pos, self.cu_seqlens, n, n, num_patches, False, out)
        order, *plan = _plan_with_extra(keep, self.batch, self.pos, self.cu_seqlens, n, extra, num_patches)
        return torch.cat([self.x, extra.x.to(self.x.dtype)]), order, *_place(out, plan)

    def select(self, keep: Tensor, extra: Extra | None = None) -> TokenStream:
        """Keep the tokens where ``keep`` is true, plus the kept ``extra`` tokens (one host sync).

        Features are gathered with ``index_select``, whose backward is one ``index_add``; the backward
        of ``x[idx]`` (an accumulating ``index_put``) sorts the indices first.

        The result holds the real images only (a phantom image is dropped).
        """
        x, order, batch, pos, cu, stats = self.plan(keep, extra)
        n_keep, max_len, min_len, n_special = stats.tolist()
        return TokenStream(x.index_select(0, order[:n_keep]), batch[:n_keep], pos[:n_keep], cu, max_len,
                           self.num_images, n_special, max_len == min_len)

    def patches(self) -> tuple[Tensor, TokenStream]:
        """Indices of the patch tokens and the sub-stream they form (no host sync on CUDA).

        With a phantom image, the size must not depend on data: the non-patch tokens join the phantom
        image (at patch position 0) instead of being dropped, so the sub-stream has all T tokens.
        """
        if self.num_special == 0 and not self.phantom:
            return torch.arange(self.x.shape[0], device=self.x.device), self
        B = self.batch_size
        idx, batch, pos, cu, stats = partition(self.pos >= 0, self.batch, self.pos, self.cu_seqlens, B, B - 1, 1,
                                               self.phantom)
        if self.phantom:
            return idx, TokenStream(self.x.index_select(0, idx), batch, pos, cu, self.max_len, B, 0, False, True)
        n = self.x.shape[0] - self.num_special
        idx, batch, pos = idx[:n], batch[:n], pos[:n]
        if self.x.is_cuda:
            max_len, uniform = self.max_len, False
        else:
            max_len, min_len = stats[1:3].tolist()
            uniform = max_len == min_len
        return idx, TokenStream(self.x.index_select(0, idx), batch, pos, cu, max_len, B, 0, uniform, fixed=self.fixed)

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


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> tuple[Tensor, ...]:
    """ATen flash varlen forward, non-causal, no dropout: (out, lse, philox seed, philox offset, debug mask)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)


class _FlashVarlen(torch.autograd.Function):
    """Flash attention over packed segments, with its backward: the ATen flash kernels called directly.

    ``torch.nn.attention.varlen.varlen_attn`` does the same through two Python custom ops, whose
    dispatch is host time a CPU-bound training step cannot spare.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
        out, lse, seed, offset, _ = _flash_forward(q, k, v, cu, max_len)
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(grad.contiguous(), q, k, v, out, lse, cu, cu,
                                                              ctx.max_len, ctx.max_len, 0.0, False, seed, offset)
        return dq, dk, dv, None, None


def segment_attention(q: Tensor, k: Tensor, v: Tensor, stream: TokenStream, dropout_p: float = 0.0) -> Tensor:
    """Self-attention of [T, H, D] q/k/v within each image segment → [T, H, D].

    The dense model's equal segments take batched SDPA like timm. On CUDA every other stream takes
    flash varlen: without gradient the Triton kernel of :mod:`dtop.kernels.attention` (on an H100
    1.1–1.4× the ATen op's speed for pruned batches and, for a batch-1 graph stream, faster than cuDNN
    over the bucket with the phantom's keys masked, which this path took before; the ATen op where
    Triton is missing), with one :class:`_FlashVarlen` (ATen's forward and backward). Equal segments
    too, when pruning shaped them: SDPA's cuDNN backend builds a new plan for every new sequence
    length (43–66 ms per call, 116–160 ms with backward, measured on an H100), and a pruned length is
    new almost every batch.
    """
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
    if flash and not (stream.uniform and stream.fixed):
        cu, n = stream.cu_seqlens, stream.max_len
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _FlashVarlen.apply(q, k, v, cu, n)
        D = q.shape[-1]
        fits = D & (D - 1) == 0 and 16 <= D <= 128 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        kernel = load("attention") if fits else None
        return kernel.varlen_attention(q, k, v, cu, n) if kernel is not None else _flash_forward(q, k, v, cu, n)[0]
    if stream.uniform:
        B = q.shape[0] // stream.max_len
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
