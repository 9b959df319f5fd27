"""DToP driven by recorded keep masks instead of thresholds: for benchmarks and for replaying decisions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dtop.models.packed import TokenStream
from dtop.models.policies.dtop import DToP


class RecordedDecisions(DToP):
    """DToP driven by given keep masks instead of thresholds: for benchmarks and replaying decisions.

    ``keep[s]`` is a [B, N] bool mask of the patch tokens that stay after aux stage ``s``; the aux
    heads still run (their cost is part of the method), their grades are just not used.
    """

    def __init__(self, keep: Sequence[Tensor]) -> None:
        super().__init__(0.5, context="remove")
        self.keep: list[Tensor] = []
        self.set_keep(keep)

    def set_keep(self, keep: Sequence[Tensor]) -> None:
        """Replace the masks, in place where shapes and devices match (CUDA graphs read the old storage)."""
        keep = [k.bool() for k in keep]
        same = len(keep) == len(self.keep) and all(
            k.shape == o.shape and k.device == o.device for k, o in zip(keep, self.keep)
        )
        if same:
            for old, new in zip(self.keep, keep):
                old.copy_(new)
        else:
            self.keep = [k.clone() for k in keep]

    def graph_key(self) -> tuple:
        return super().graph_key() + (len(self.keep),)

    def prunes_at(self, stage: int, num_aux: int) -> bool:
        return self.enabled and stage < len(self.keep)

    def _mask(self, stage: int, ps: TokenStream) -> Tensor:
        mask = self.keep[stage]
        if mask.device != ps.x.device:
            mask = self.keep[stage] = mask.to(ps.x.device)
        if mask.shape[0] != ps.num_images:
            raise ValueError(f"Recorded keep masks are for {mask.shape[0]} images; the batch has {ps.num_images}.")
        return mask  # a phantom image borrows the last real row


def random_keep_masks(
    batch: int, num_patches: int, keep: Sequence[float], spread: float, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Nested random keep masks with per-image cumulative keep ratios ``keep[s] ± spread``."""
    masks, prev = [], torch.ones(batch, num_patches, dtype=torch.bool)
    scores = torch.rand(batch, num_patches, generator=generator)
    for k in keep:
        ratio = (k + (torch.rand(batch, generator=generator) * 2 - 1) * spread).clamp(0.0, 1.0)
        n_keep = (ratio * num_patches).round().long()
        rank = scores.argsort(1, descending=True).argsort(1)
        mask = (rank < n_keep[:, None]) & prev
        masks.append(mask)
        prev = mask
    return masks
