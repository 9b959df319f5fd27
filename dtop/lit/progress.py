"""What a run prints while it trains: a progress bar for step-based training and a model summary that
reports dtop's own GMACs (Lightning's FLOP counter does not see the pruning engine, and printed 0)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from rich import get_console
from rich.table import Table


def logging_step(trainer: L.Trainer) -> bool:
    """Whether the optimiser step just taken is one Lightning logs at: the run reads the device there anyway."""
    return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0


class SegProgressBar(RichProgressBar):
    """Rich progress bar whose training line reads ``step s/S · epoch e`` (dtop trains by steps).

    It shows the training loss, read on logging steps only: reading a logged value is a host sync, and
    one every step would make the host wait for the GPU instead of issuing the next step (Lightning
    reads every ``prog_bar=True`` value at every step, so the loss is logged without it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, Any] | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if self._shown is None or not trainer.training or logging_step(trainer):
            self._shown = super().get_metrics(trainer, pl_module)
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self._shown["train/loss"] = float(loss)
        return self._shown

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            text = f"step {trainer.global_step}/{trainer.max_steps} · epoch {current_epoch}"
        else:
            text = f"epoch {current_epoch}" + (f"/{trainer.max_epochs - 1}" if trainer.max_epochs else "")
        return f"{text:{len(self.validation_description)}}"


class SegModelSummary(RichModelSummary):
    """Modules and parameters, and the dense model's analytic GMACs at the training input size."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        model = getattr(pl_module, "model", None)
        dm = trainer.datamodule
        size = getattr(dm, "crop_size", None) or getattr(dm, "image_size", None)
        if trainer.is_global_zero and model is not None and size is not None:
            macs, linear, mmcv = (v / 1e9 for v in model.dense_macs(int(size[0]), int(size[1])))
            get_console().print(
                f"[bold]Dense GMACs per {size[0]}×{size[1]} input[/]: {macs:.4g} (all MACs), {linear:.4g} "
                f"(linear/conv only), {mmcv:.4g} (mmcv's convention); pruned runs report theirs per image "
                "(dtop-flops for any size)"
            )

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        table = Table(header_style="bold magenta")
        columns = dict(summary_data)
        shown = [c for c in ("Name", "Type", "Params", "Mode") if c in columns]
        table.add_column(" ", style="dim")
        for name in shown:
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(columns[" "], *(columns[c] for c in shown), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(
            f"[bold]Parameters[/]: {trainable_parameters:,} trainable, "
            f"{total_parameters - trainable_parameters:,} frozen ({model_size:.1f} MB)"
        )
