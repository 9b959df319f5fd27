"""Synthetic grades: any configured policy, run in full, with token confidences chosen to give given keep ratios.

Benchmarks without a trained checkpoint must still time what users run: the aux heads, the grading,
the policy's context rule (DToP's top-k per class) or its stop/reconstruct/merge (DoViT), the exits
and the assembly. :class:`SyntheticGrades` hooks the aux heads and overrides their outputs so that,
per image, the patch tokens outside a nested keep mask are graded confident (probability ≈ 1 for one
of a few classes of that image) and the rest unconfident (uniform logits); the policy then decides
with its own threshold and rule. The head still runs on every token it would see (its cost counts),
and the override is one gather from a per-stage table of logits (rebuilt when the masks change,
outside the timed calls), so the benchmark times the policy, not the grader, and CUDA graphs capture it.
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
        # per stage, the logits every token gets, [(B + 1) · (N + 1), K]: each image's block (the phantom image
        # copying the last one) starts with a zero row that non-patch tokens read; built on first use in the
        # head's dtype, refilled in place by set_keep
        self.tables: dict[int, Tensor] = {}
        self.presence: Tensor | None = None
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
        for stage, table in self.tables.items():
            table.copy_(self._table(stage, table.dtype))

    def to(self, device: torch.device) -> SyntheticGrades:
        self.keep = [k.to(device) for k in self.keep]
        self.cls = self.cls.to(device)
        self.tables = {s: t.to(device) for s, t in self.tables.items()}
        return self

    def remove(self) -> None:
        """Give the aux heads their own outputs back."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _table(self, stage: int, dtype: torch.dtype) -> Tensor:
        """Stage ``stage``'s logits table (see ``__init__``): confident tokens ±CONFIDENT, the others 0."""
        keep, cls = self.keep[stage], self.cls
        B, N = keep.shape
        onehot = torch.nn.functional.one_hot(cls, self.num_classes).to(dtype)
        logits = torch.where(~keep[..., None], (2 * onehot - 1) * CONFIDENT, 0.0).to(dtype)
        logits = torch.cat([logits, logits[-1:]])  # the phantom image borrows the last real one
        return torch.cat([logits.new_zeros(B + 1, 1, self.num_classes), logits], 1).view(-1, self.num_classes)

    def _hook(self, stage: int):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, args: tuple, out: HeadOutput) -> HeadOutput:
            stream: TokenStream = args[1]
            table = self.tables.get(stage)
            if table is None or table.dtype != out.logits.dtype:
                table = self.tables[stage] = self._table(stage, out.logits.dtype)
            N = self.keep[stage].shape[1]
            logits = table[1:][stream.pos.add(stream.batch, alpha=N + 1)]  # pos −1: the image's zero row
            if out.logits.requires_grad:  # training: the aux loss still back-propagates through the head
                logits = out.logits.mul(0).add_(logits)
            presence = None
            if out.presence is not None:
                if self.presence is None or self.presence.shape != out.presence.shape:
                    self.presence = torch.full_like(out.presence, CONFIDENT)
                presence = self.presence
            return HeadOutput(logits, presence)

        return hook
