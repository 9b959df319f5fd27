"""Synthetic grades: any configured policy, run in full, with token confidences chosen to give given keep ratios.

Benchmarks without a trained checkpoint must still time what users run: the aux heads, the grading,
the policy's context rule (DToP's top-k per class) or its stop/reconstruct/merge (DoViT), the exits
and the assembly. :class:`SyntheticGrades` hooks the aux heads and overrides their outputs so that,
per image, the patch tokens outside a nested keep mask are graded confident (probability ≈ 1 for one
of a few classes of that image) and the rest unconfident (uniform logits); the policy then decides
with its own threshold and rule. The head still runs on every token it would see (its cost counts),
and the override is a few device ops with data-independent shapes, so CUDA graphs capture it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dtop.models.heads.base import HeadOutput
from dtop.models.packed import TokenStream

CONFIDENT = 30.0  # a logit margin whose softmax / sigmoid is 1 to float precision


class SyntheticGrades:
    """Forward hooks on ``aux_heads`` that grade patch tokens by ``keep`` masks ([B, N] bool per stage).

    ``classes_per_image`` classes are drawn per image and each confident token takes one of them, as in
    real scenes (a handful of classes per image), so a per-class context rule keeps a realistic number
    of tokens. Update the masks with :meth:`set_keep` (in place, so captured graphs see the new ones).
    """

    def __init__(
        self,
        aux_heads: Sequence[nn.Module],
        keep: Sequence[Tensor],
        num_classes: int,
        classes_per_image: int = 8,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(keep) != len(aux_heads):
            raise ValueError(f"{len(keep)} keep masks for {len(aux_heads)} aux heads: need one per pruning stage.")
        self.num_classes = num_classes
        self.keep = [k.bool().clone() for k in keep]
        B, N = self.keep[0].shape
        palette = torch.rand(B, num_classes, generator=generator).argsort(1)[:, : min(classes_per_image, num_classes)]
        pick = torch.randint(0, palette.shape[1], (B, N), generator=generator)
        self.cls = palette.gather(1, pick).to(self.keep[0].device)  # [B, N] the class a confident token shows
        self.aux_heads = list(aux_heads)
        self.handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        """Override the aux heads' outputs (again, after :meth:`remove`)."""
        if not self.handles:
            self.handles = [head.register_forward_hook(self._hook(s)) for s, head in enumerate(self.aux_heads)]

    def set_keep(self, keep: Sequence[Tensor]) -> None:
        for old, new in zip(self.keep, keep, strict=True):
            old.copy_(new)

    def to(self, device: torch.device) -> SyntheticGrades:
        self.keep = [k.to(device) for k in self.keep]
        self.cls = self.cls.to(device)
        return self

    def remove(self) -> None:
        """Give the aux heads their own outputs back."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, stage: int):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, args: tuple, out: HeadOutput) -> HeadOutput:
            stream: TokenStream = args[1]
            keep, cls = self.keep[stage], self.cls
            b = stream.batch.clamp(max=keep.shape[0] - 1)  # a phantom image borrows the last real row
            p = stream.pos.clamp(min=0)
            confident = ~keep[b, p] & (stream.pos >= 0)
            onehot = torch.nn.functional.one_hot(cls[b, p], self.num_classes).to(out.logits.dtype)
            logits = out.logits * 0 + torch.where(confident[:, None], (2 * onehot - 1) * CONFIDENT, 0.0)
            presence = None if out.presence is None else out.presence * 0 + CONFIDENT
            return HeadOutput(logits, presence)

        return hook
