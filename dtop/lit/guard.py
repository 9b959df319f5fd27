"""Non-finite steps caught without a host sync per step.

Checking ``torch.isfinite(loss)`` on the host every step makes the host wait for the GPU's forward
before it may issue the backward, so the GPU idles while Python issues the rest of the step. Here the
check stays on the device: a step whose gradients are not finite is skipped by the fused optimiser
itself (``found_inf``, the mechanism of ``torch.amp.GradScaler``), so weights, moments and
checkpoints stay finite, and the first step with a non-finite loss or gradients is kept on the device, with
its loss terms, until the next point where the run reads the device anyway (a logging step, validation,
the end); there it is reported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

LOSS, GRADIENTS = 1.0, 2.0  # what was not finite at the recorded step
_NONE = 2**62  # "no step recorded" in the cross-rank minimum (exact in float64)


class NonFiniteGuard:
    """Records the first non-finite step on the device; :meth:`check` raises ``FloatingPointError`` for it."""

    def __init__(self) -> None:
        self.step: Tensor | None = None  # the first non-finite step, -1 while there is none
        self.kind: Tensor | None = None  # LOSS or GRADIENTS
        self.terms: Tensor | None = None  # that step's loss terms

    def _record(self, bad: Tensor, step: int, kind: float, terms: Tensor | None = None) -> None:
        """Keep (step, kind, terms) if ``bad`` and nothing is kept yet: device ops with host scalars, no sync."""
        if terms is not None and self.terms is None:
            self.step = torch.full((), -1, dtype=torch.long, device=terms.device)
            self.kind = torch.zeros((), dtype=torch.float32, device=terms.device)
            self.terms = torch.zeros_like(terms, dtype=torch.float32)
        if self.step is None or self.kind is None or self.terms is None:
            return
        take = bad & (self.step < 0)
        self.step = torch.where(take, step, self.step)
        self.kind = torch.where(take, kind, self.kind)
        if terms is not None:
            self.terms = torch.where(take, terms.detach().float(), self.terms)

    def loss(self, terms: Tensor, step: int) -> Tensor:
        """The loss, the sum of the step's terms [T]; kept with ``step`` if it is the first non-finite one."""
        loss = terms.sum()
        self._record(~torch.isfinite(loss), step, LOSS, terms)
        return loss

    def before_step(self, optimizer: Optimizer, step: int, skip: bool) -> None:
        """Before the optimiser step: with ``skip`` the fused optimiser skips it if any gradient is not finite.

        The gradients are reduced across ranks by then, so every rank skips alike (a loss is per rank: a
        non-finite one with finite gradients is reported, not skipped). Without ``skip`` (a GradScaler skips
        fp16 steps with inf gradients itself, as part of its scaling) only the loss is watched.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not skip or not grads:
            return
        bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        self._record(bad, step, GRADIENTS)
        optimizer.found_inf = bad.to(torch.float32)

    def check(self, names: list[str]) -> None:
        """Raise for the recorded step (one host sync; under DDP every rank raises for the earliest one)."""
        if self.step is None or self.kind is None or self.terms is None:
            return
        earliest = torch.where(self.step < 0, _NONE, self.step)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(earliest, op=dist.ReduceOp.MIN)
        step, own, kind = torch.stack([earliest.double(), self.step.double(), self.kind.double()]).tolist()
        if step == _NONE:
            return
        if own != step:
            where = f"loss or gradients at step {step:.0f} on another rank"
        elif kind == LOSS:
            where = f"loss at step {step:.0f}: {dict(zip(names, self.terms.tolist(), strict=True))}"
        else:
            where = f"gradients at step {step:.0f} (the loss was finite)"
        raise FloatingPointError(
            f"Non-finite {where}. The optimiser skips steps with non-finite gradients, so the weights and the "
            "resumable checkpoint are finite. Lower the learning rate (or check the data)."
        )
