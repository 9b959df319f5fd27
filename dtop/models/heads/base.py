"""The one interface every segmentation head implements.

A head sees the tokens of a :class:`~dtop.models.packed.TokenStream` (packed or the full map) and
returns per-token class logits. Heads never know which pruning policy runs; policies never know
which head grades.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dtop.losses import cross_entropy
from dtop.models.packed import TokenStream
from dtop.ops.resize import Upsampled


@dataclass
class HeadOutput:
    """``logits`` [T, K] per token; ``presence`` [B, K] per-image class presence logits (ATM heads)."""

    logits: Tensor
    presence: Tensor | None = None


class SegHead(nn.Module):
    """Base class: subclasses define ``forward``, ``macs`` and, when not softmax, the scoring rules."""

    in_channels: int
    num_classes: int
    grading = "softmax"  # token_probs: "softmax" over the logits, or "sigmoid" of each, times the presence's

    @property
    def token_local(self) -> bool:
        """Whether each token's output depends on that token alone.

        Such a head may see non-patch tokens (cls, summaries) beside the patch tokens and have their
        outputs ignored, which spares policies a reorder of the stream at every stage end.
        """
        return False

    @property
    def grading_rule(self) -> str | None:
        """The rule :meth:`token_probs` computes, for the kernels that implement it; None if overridden."""
        return self.grading if type(self).token_probs is SegHead.token_probs else None

    @property
    def scoring_rule(self) -> str | None:
        """The rule :meth:`scores` computes, for the kernels that implement it; None if overridden."""
        return self.grading if type(self).scores is SegHead.scores else None

    def forward(self, x: Tensor, stream: TokenStream) -> HeadOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def token_probs(self, out: HeadOutput, stream: TokenStream) -> Tensor:
        """Per-token class probabilities [T, K] that grade tokens (confidence = their max).

        The grading kernel implements the two ``grading`` rules; a head that overrides this method
        is graded by it instead, in PyTorch.
        """
        if self.grading == "sigmoid":
            probs = out.logits.float().sigmoid()
            return probs if out.presence is None else probs * out.presence.float().sigmoid()[stream.batch]
        return out.logits.softmax(-1, dtype=torch.float32)

    def scores(self, logits: Tensor, presence: Tensor | None) -> Tensor:
        """Per-pixel class scores [B, K, H, W] from an assembled logit map; argmax is the prediction.

        The ``grading`` rule at the pixel: the logits (softmax keeps their order), or their sigmoid
        times the presence's. The label kernel implements both; a head that overrides this method
        is predicted by it instead, in PyTorch.
        """
        if self.grading == "sigmoid":
            probs = logits.float().sigmoid()
            return probs if presence is None else probs * presence.float().sigmoid()[:, :, None, None]
        return logits

    def loss(
        self, logits: Tensor | Upsampled, presence: Tensor | None, target: Tensor, ignore_index: int = 255
    ) -> dict[str, Tensor]:
        """Training loss terms for an assembled logit map at the label size (or factored to it)."""
        return {"ce": cross_entropy(logits, target, ignore_index)}

    def macs(self, n: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """Multiply-accumulates for ``n`` tokens per image: (all, linear/conv only)."""
        raise NotImplementedError

    def macs_mmcv(self, n: Tensor) -> Tensor:  # pragma: no cover - interface
        """What mmcv's counter reports for the head on ``n`` tokens per image (:mod:`dtop.models.macs`)."""
        raise NotImplementedError
