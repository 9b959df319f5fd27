"""The packed token stream: every image's active tokens in one [T, C] tensor.

Per-token operations (norms, qkv, projections, MLP, heads) run once on the whole stream; attention
runs per image segment (:mod:`dtop.models.blocks`). Index bookkeeping stays on the device; the only
host sync is the one :meth:`TokenStream.select` needs to size its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dtop.ops.partition import partition, partition_with_extra


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

    def plan(
        self, keep: Tensor, extra: Extra | None = None, num_patches: int = 1, out: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The device-side part of :meth:`select`, free of host syncs (CUDA graphs capture it).

        Returns the candidate features (the stream's, then ``extra``'s), ``order`` putting the kept
        candidates first, in image order, each image's in their current order (extra tokens end their
        image's segment), the candidates' batch and pos in that order (past the kept ones: the phantom
        image ``num_images`` at positions cycling over ``num_patches``), the new ``cu_seqlens`` over
        the real images and ``stats`` = [kept, longest segment, shortest segment, kept non-patch tokens].
        See :func:`~dtop.ops.partition.partition_reference`; ``out``: buffers for (batch, pos, cu_seqlens, stats).
        """
        n = self.num_images
        if extra is None:
            return self.x, *partition(keep, self.batch, self.pos, self.cu_seqlens, n, n, num_patches, False, out)
        order, *plan = partition_with_extra(
            keep, self.batch, self.pos, self.cu_seqlens, n, extra.batch, extra.keep, num_patches, out
        )
        return torch.cat([self.x, extra.x.to(self.x.dtype)]), order, *plan

    def select(self, keep: Tensor, extra: Extra | None = None) -> TokenStream:
        """Keep the tokens where ``keep`` is true, plus the kept ``extra`` tokens (one host sync).

        Features are gathered with ``index_select``, whose backward is one ``index_add``; the backward
        of ``x[idx]`` (an accumulating ``index_put``) sorts the indices first.

        The result holds the real images only (a phantom image is dropped).
        """
        x, order, batch, pos, cu, stats = self.plan(keep, extra)
        n_keep, max_len, min_len, n_special = stats.tolist()
        return TokenStream(
            x.index_select(0, order[:n_keep]),
            batch[:n_keep],
            pos[:n_keep],
            cu,
            max_len,
            self.num_images,
            n_special,
            max_len == min_len,
        )

    def patches(self) -> tuple[Tensor, TokenStream]:
        """Indices of the patch tokens and the sub-stream they form (no host sync on CUDA).

        With a phantom image, the size must not depend on data: the non-patch tokens join the phantom
        image (at patch position 0) instead of being dropped, so the sub-stream has all T tokens.
        """
        if self.num_special == 0 and not self.phantom:
            return torch.arange(self.x.shape[0], device=self.x.device), self
        B = self.batch_size
        idx, batch, pos, cu, stats = partition(
            self.pos >= 0, self.batch, self.pos, self.cu_seqlens, B, B - 1, 1, self.phantom
        )
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
        valid = torch.zeros(B, L, dtype=torch.bool, device=t.device).index_put(
            (self.batch, rank), torch.ones_like(rank, dtype=torch.bool)
        )
        return out, valid

    def unpad(self, t: Tensor) -> Tensor:
        return t[self.batch, self.rank()]
