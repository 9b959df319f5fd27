"""A test-only callback: press Ctrl-C (SIGINT to this process) when training reaches a given step."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class SigintAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
