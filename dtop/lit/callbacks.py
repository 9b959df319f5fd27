"""Training callbacks: linear annealing of the pruning threshold ξ (DoViT's training schedule).

At ξ = 1 nothing exits/stops (the dense model), so starting there and lowering ξ step by step lets
the aux heads become confident before they start taking tokens away.

Evaluation always sees the configured (target) ξ: the callback reads it from the model at fit
start, sets it back for every validation run during fit (so ``val/mIoU`` and the checkpoint chosen by
it describe the model as it will be evaluated, not a sparser/denser intermediate) and at the end of
fit — also when fit stops with an exception — so ``trainer.test`` after fit and the saved run use
the target. The official code anneals during training only as well; annealing is a property of the
training schedule, never of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

Thresholds = float | Sequence[float]


def annealed_threshold(step: int, iters: int, start: Thresholds, target: Thresholds) -> float | tuple[float, ...]:
    """ξ after ``step`` optimizer steps of a linear ``start`` → ``target`` ramp over ``iters`` steps.

    ``start``/``target`` are a number or one value per pruning stage (a number is broadcast); the
    result is a float when both are numbers, else a tuple. Steps ≥ ``iters`` (and ``iters`` ≤ 0) give
    the target; negative steps the start.
    """
    scalar = not isinstance(start, Sequence) and not isinstance(target, Sequence)
    s = [float(start)] if not isinstance(start, Sequence) else [float(v) for v in start]
    t = [float(target)] if not isinstance(target, Sequence) else [float(v) for v in target]
    if len(s) != len(t) and 1 not in (len(s), len(t)):
        raise ValueError(f"Annealing start {tuple(s)} and target {tuple(t)} have different numbers of stages.")
    n = max(len(s), len(t))
    s, t = s * n if len(s) == 1 else s, t * n if len(t) == 1 else t
    frac = 1.0 if iters <= 0 else min(max(step, 0), iters) / iters
    values = tuple(a + (b - a) * frac for a, b in zip(s, t))
    return values[0] if scalar else values


class ThresholdAnnealing(L.Callback):
    """Move the model's ξ linearly from ``start`` to its configured value over ``iters`` steps.

    Give ``iters`` (optimizer steps) or ``ratio`` (that fraction of the fit's total steps,
    ``trainer.estimated_stepping_batches``, resolved at fit start).

    The target is whatever ``pl_module.model.pruning.threshold`` holds at fit start (one value or one
    per stage). The annealed value follows ``trainer.global_step`` — the number of optimizer steps
    done — so a resumed run continues the ramp where it stopped. ``validate_at_target=False`` leaves
    validation during fit at the current annealed ξ instead (then early checkpoints are scored with
    fewer tokens stopped than at evaluation).
    """

    def __init__(
        self,
        iters: int | None = None,
        start: Thresholds = 1.0,
        ratio: float | None = None,
        validate_at_target: bool = True,
    ) -> None:
        super().__init__()
        if (iters is None) == (ratio is None):
            raise ValueError(
                "ThresholdAnnealing needs exactly one of iters (optimizer steps) and ratio "
                f"(fraction of the training steps); got iters={iters}, ratio={ratio}."
            )
        if iters is not None and iters < 0:
            raise ValueError(f"ThresholdAnnealing needs iters ≥ 0, got {iters}.")
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ThresholdAnnealing ratio must lie in [0, 1], got {ratio}.")
        annealed_threshold(0, 1, start, 1.0)  # validates start's shape early
        self.iters = None if iters is None else int(iters)
        self.ratio, self.start, self.validate_at_target = ratio, start, validate_at_target
        self.target: tuple[float, ...] | None = None
        self.current: tuple[float, ...] | None = None

    @staticmethod
    def _policy(pl_module: L.LightningModule) -> Any:
        return pl_module.model.pruning

    def _set(self, pl_module: L.LightningModule, values: tuple[float, ...]) -> None:
        self._policy(pl_module).set_threshold(values)

    def value_at(self, step: int) -> tuple[float, ...]:
        if self.target is None:
            raise RuntimeError("ThresholdAnnealing has no target yet: it is read from the model at fit start.")
        start = self.start if isinstance(self.start, (int, float)) else tuple(self.start)
        out = annealed_threshold(step, self.iters, start, self.target)
        return out if isinstance(out, tuple) else (out,)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.target = tuple(self._policy(pl_module).threshold)
        if self.ratio is not None:
            self.iters = round(self.ratio * int(trainer.estimated_stepping_batches))
        self.current = self.value_at(trainer.global_step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.current = self.value_at(trainer.global_step)
        self._set(pl_module, self.current)
        opts = {"on_step": True, "on_epoch": False, "batch_size": 1}
        pl_module.log("train/threshold", sum(self.current) / len(self.current), **opts)  # mean over stages
        if len(self.current) > 1:
            for i, v in enumerate(self.current):
                pl_module.log(f"train/threshold_s{i}", v, **opts)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.target is None:  # validate() outside fit: leave the model alone
            return
        self._set(pl_module, self.target if self.validate_at_target else self.current)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self.target is not None:
            self._set(pl_module, self.target)
        self.target = self.current = None
