"""The interface of a pruning policy: what the engine asks at the end of every stage."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dtop.models.heads.base import SegHead
from dtop.models.packed import Extra, TokenStream
from dtop.models.state import RunState

Decision = tuple[TokenStream, "Tensor | None", "Extra | None"]  # (stream, keep mask or None, extra tokens)


def _thresholds(threshold: float | Sequence[float]) -> tuple[float, ...]:
    values = (float(threshold),) if isinstance(threshold, (int, float)) else tuple(float(t) for t in threshold)
    if not values or any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"Confidence threshold ξ must lie in [0, 1] (1.0 disables pruning); got {threshold!r}.")
    return values


class Policy(nn.Module):
    """A policy has a threshold ξ per aux stage (or one for all) and turns head outputs into decisions."""

    def __init__(self, threshold: float | Sequence[float]) -> None:
        super().__init__()
        self.threshold = _thresholds(threshold)
        self.enabled = True  # False: run the same heads and assembly, but never prune (the dense model)

    def set_threshold(self, threshold: float | Sequence[float]) -> None:
        self.threshold = _thresholds(threshold)

    def threshold_at(self, stage: int, num_aux: int) -> float:
        if len(self.threshold) == 1:
            return self.threshold[0]
        if len(self.threshold) != num_aux:
            raise ValueError(f"{len(self.threshold)} per-stage thresholds given for {num_aux} pruning stages.")
        return self.threshold[stage]

    def prunes_at(self, stage: int, num_aux: int) -> bool:
        """Whether this stage can remove tokens (if not, inference skips its aux head entirely)."""
        return self.enabled and self.threshold_at(stage, num_aux) < 1.0

    def can_starve_heads(self) -> bool:
        """Whether a training step may leave a later head with no token at all (so no gradient), e.g. when
        every token of a batch exits early. Distributed training must know (SyncBatchNorm would hang)."""
        return False

    def stage_end(
        self, stage: int, num_aux: int, stream: TokenStream, head: SegHead, state: RunState
    ) -> Decision:  # pragma: no cover - interface
        """Grade the stream with the stage's aux head; return (stream, keep mask or None, extra tokens).

        Everything here stays on the device with data-independent shapes (see :mod:`dtop.models.state`);
        the engine applies the decision with :meth:`TokenStream.select`.
        """
        raise NotImplementedError

    def finish(
        self, stream: TokenStream, head: SegHead, norm: nn.Module, state: RunState
    ) -> None:  # pragma: no cover - interface
        """Run the decode head: fill ``state.canvas`` and ``state.presence`` / ``state.features``."""
        raise NotImplementedError

    def graph_key(self) -> tuple:
        """Settings a captured CUDA graph bakes in: a change must capture new graphs."""
        return (type(self).__name__, self.enabled, self.threshold)
