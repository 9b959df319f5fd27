"""No lost work: a resumable ``last.ckpt`` kept current, written atomically, saved on Ctrl-C and on errors.

:class:`ResumeCheckpoint` saves ``<dirpath>/last.ckpt`` every ``every_n_steps`` optimizer steps, every
``every_minutes`` of training, after each validation, at the end of fit, and when training stops on
an exception. Ctrl-C is deferred to the end of the running step (a second Ctrl-C stops at once), so
the checkpoint always sits between two steps and resuming from it continues exactly where the run
stopped (:mod:`dtop.data.sampler` makes the data order and augmentations part of that). Where the
checkpoint went is printed, with the command that resumes it.

:class:`AtomicCheckpointIO` writes every checkpoint of the trainer through
:func:`~dtop.checkpoint.atomic_save`, so a crash mid-write never leaves a truncated file.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dtop.checkpoint import atomic_save

log = logging.getLogger("dtop")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (temporary file, fsync, rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_save(checkpoint, path)


class ResumeCheckpoint(Checkpoint):
    """Keep ``<dirpath>/<filename>.ckpt`` resumable (see the module docstring); ``None`` disables a trigger."""

    def __init__(
        self,
        dirpath: str | Path,
        filename: str = "last",
        every_n_steps: int | None = 500,
        every_minutes: float | None = 30.0,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1 or null, got {every_n_steps}.")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"every_minutes must be > 0 or null, got {every_minutes}.")
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps, self.every_minutes = every_n_steps, every_minutes
        self._interrupted = False
        self._saved_step: int | None = None
        self._last_time = time.monotonic()
        self._previous_handler: Any = None

    # ---------------------------------------------------------------- Ctrl-C, deferred to the step's end
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:  # a second Ctrl-C: stop at once (Lightning still calls on_exception)
            raise KeyboardInterrupt
        self._interrupted = True
        print(
            "\nCtrl-C: stopping after the running step and saving a resumable checkpoint "
            "(Ctrl-C again to stop at once).",
            flush=True,
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interrupted, self._last_time = False, time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # ---------------------------------------------------------------------------------------- saving
    def save(self, trainer: L.Trainer, reason: str) -> None:
        """Write the checkpoint (every rank calls; rank 0 writes) and say where it is."""
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step, self._last_time = trainer.global_step, time.monotonic()
        if trainer.is_global_zero:
            log.info("Saved a resumable checkpoint (%s, step %d): %s", reason, trainer.global_step, self.path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._interrupted:
            self.save(trainer, "interrupted")
            self._announce(trainer, "Interrupted")
            raise KeyboardInterrupt
        due_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        due_time = self.every_minutes is not None and time.monotonic() - self._last_time >= 60 * self.every_minutes
        if (due_steps or due_time) and step != self._saved_step:
            self.save(trainer, "periodic")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer, "after validation")
            if self._interrupted:
                self._announce(trainer, "Interrupted")
                raise KeyboardInterrupt

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, "end of training")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if trainer.state.fn != "fit":
            return
        if self._saved_step != trainer.global_step:
            # under DDP an error may have stopped one rank only, and saving is a collective: keep the last save
            if trainer.world_size > 1 and not isinstance(exception, KeyboardInterrupt):
                log.warning(
                    "Training stopped on %s; the last resumable checkpoint is %s (step %s).",
                    type(exception).__name__,
                    self.path,
                    self._saved_step,
                )
                return
            try:
                self.save(trainer, f"stopped by {type(exception).__name__}")
            except Exception as err:  # noqa: BLE001 - never hide the original error
                log.error("Could not save a checkpoint after %s: %s", type(exception).__name__, err)
                return
        if not isinstance(exception, KeyboardInterrupt) or not self._interrupted:
            self._announce(trainer, f"Stopped by {type(exception).__name__}")

    def _announce(self, trainer: L.Trainer, what: str) -> None:
        if trainer.is_global_zero and self.path.is_file():
            print(
                f"{what} at step {trainer.global_step}. Resumable checkpoint: {self.path}\n"
                f"Resume with the same command plus: ckpt_path={self.path}",
                flush=True,
            )
