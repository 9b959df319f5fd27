"""One LightningModule: the token-pruning segmentor, its losses, its optimiser and its evaluation."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from dtop.checkpoint import KEY as CHECKPOINT_KEY
from dtop.checkpoint import load_model_weights
from dtop.errors import ConfigError
from dtop.inference import MAC_KINDS, infer_labels
from dtop.lit.distributed import eval_loader_sampler, gather_eval_rows, gather_eval_visuals
from dtop.lit.guard import NonFiniteGuard
from dtop.lit.progress import logging_step
from dtop.losses import feature_mse, kl_distillation
from dtop.metrics import SegMetrics, format_metrics
from dtop.models.engine import Segmentor, SegOutput
from dtop.models.graphs import GraphedSegmentor
from dtop.ops.resize import resize_bilinear
from dtop.version import dtop_version


class SegModule(L.LightningModule):
    """Trains the segmentor and evaluates it (metrics, per-image token counts and GMACs, exit maps).

    The loss is the decode head's loss on the assembled map plus ``aux_weight`` × each aux head's loss
    on its stage's map: for FCN/Segmenter heads pixel CE, for ATM heads the presence BCE, mask focal
    and dice terms (:meth:`~dtop.models.heads.atm.ATMHead.loss`). With a dense teacher (DoViT's
    distillation) ``kl_weight`` × KL between the two final maps (direction, resolution and pixels per
    ``kl_direction`` / ``kl_scale``) and ``mse_weight`` × the MSE of the final normalised features.
    """

    def __init__(
        self,
        model: Segmentor,
        num_classes: int,
        ignore_index: int = 255,
        lr: float = 1e-3,
        head_lr_mult: float = 10.0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: str = "adamw",
        momentum: float = 0.9,
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        poly_power: float = 0.9,
        min_lr: float = 0.0,
        poly_iters: int | None = None,
        poly_after_warmup: bool = False,
        decay_all: bool = False,
        aux_weight: float = 0.4,
        kl_weight: float = 0.0,
        kl_direction: str = "student_teacher",
        kl_scale: int | None = None,
        mse_weight: float = 0.0,
        teacher_ckpt: str | None = None,
        init_ckpt: str | None = None,
        trainable: str = "all",
        eval_mode: str = "whole",
        crop_size: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
        class_names: list[str] | None = None,
        cuda_graphs: bool | str = "auto",
        seed: int = 0,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "run_config"])
        self.run_config = dict(run_config or {})  # stored in every checkpoint (dtop.checkpoint)
        if trainable not in ("all", "heads"):
            raise ValueError(f"trainable must be 'all' or 'heads', got {trainable!r}.")
        if cuda_graphs not in (True, False, "auto"):
            raise ConfigError(f"module.cuda_graphs must be true, false or auto; got {cuda_graphs!r}.")
        if eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {eval_mode!r}.")
        if model.num_classes != num_classes:
            raise ValueError(f"Model predicts {model.num_classes} classes but the data has {num_classes}.")
        self.model = model
        if init_ckpt:
            load_model_weights(self.model, init_ckpt, skip_aux=True)
        if trainable == "heads":
            self.model.backbone.requires_grad_(False)
        self._teacher: list[Segmentor] = []  # a list keeps it out of state_dict, optimiser and DDP
        if kl_weight > 0 or mse_weight > 0:
            if not teacher_ckpt:
                raise ValueError(
                    "kl_weight/mse_weight > 0 need model teacher: set module.teacher_ckpt to a dense checkpoint."
                )
            teacher = copy.deepcopy(model)
            teacher.pruning.enabled = False
            load_model_weights(teacher, teacher_ckpt, skip_aux=True)
            teacher.requires_grad_(False).eval()
            self._teacher.append(teacher)
        self.val_metrics = SegMetrics(num_classes, ignore_index)
        self.test_metrics = SegMetrics(num_classes, ignore_index)
        self.per_image: list[dict[str, Any]] = []
        self.max_visuals = 8  # eval images whose exit maps and predictions are kept for dashboards
        self.visuals: list[dict[str, Any]] = []
        self.last_eval: dict[str, Any] = {}
        self._graphed: GraphedSegmentor | None = None  # inference replayed as CUDA graphs (see _use_graphs)
        self._infer_time, self._infer_images = 0.0, 0  # seconds and images of inference in the eval epoch
        self._eval_start = 0.0  # clock at the start of the eval epoch
        self._guard = NonFiniteGuard()  # non-finite steps: skipped on the device, reported at the next sync
        self._term_names: list[str] = []
        self._train_images = 0  # images this rank trained on
        self._window: tuple[float, int, int] | None = None  # (clock, step, images) at the last logging step
        self._logged_step, self._paused = -1, 0.0  # the last logging step seen; when validation paused the clock
        self.train_speed = {"seconds": 0.0, "steps": 0, "images": 0}  # timed logging-step windows of training

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the step's own randomness (dropout, stochastic depth) from the seed, the step and the rank.

        Why: a resumed run then draws exactly what the uninterrupted one drew, whatever ran in between
        (validation, a restart); the data's randomness is seeded per sample (dtop.data.sampler).
        """
        torch.manual_seed(((self.hparams.seed * 1_000_003 + self.global_step) * 4099 + self.global_rank) % 2**63)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"version": dtop_version(), **self.run_config}

    def _loss(self, out: SegOutput, target: Tensor, images: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        size = tuple(target.shape[-2:])
        head = self.model.decode_head
        terms = {
            f"decode/{k}": v
            for k, v in head.loss(
                self.model.upsampled(out.logits, out, size), out.presence, target, hp.ignore_index
            ).items()
        }
        for i, (logits, presence) in enumerate(zip(out.stage_logits, out.stage_presence)):
            aux_terms = self.model.aux_heads[i].loss(
                self.model.upsampled(logits, out, size), presence, target, hp.ignore_index
            )
            terms.update({f"aux{i}/{k}": hp.aux_weight * v for k, v in aux_terms.items()})
        if self._teacher:
            teacher = self._teacher[0]
            teacher.eval()
            with torch.no_grad():
                t_out = teacher(images)
            if hp.kl_weight > 0:
                if hp.kl_scale is None:  # at the labels, over the labelled pixels
                    s_map, t_map, labels = (
                        self.model.upsample(out.logits, out, size),
                        teacher.upsample(t_out.logits, t_out, size),
                        target,
                    )
                else:  # at kl_scale × the token grid, over every pixel (DoViT's code: SETR's decode output)
                    s_map, t_map, labels = (_scaled(out.logits, hp.kl_scale), _scaled(t_out.logits, hp.kl_scale), None)
                terms["kl"] = hp.kl_weight * kl_distillation(s_map, t_map, labels, hp.ignore_index, hp.kl_direction)
            if hp.mse_weight > 0 and out.features is not None and t_out.features is not None:
                # the final features as the decode heads see them (after the final norm), as DoViT's code distils
                s_feat, t_feat = self.model.backbone.norm(out.features), teacher.backbone.norm(t_out.features)
                terms["mse"] = hp.mse_weight * feature_mse(s_feat, t_feat)
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, target = batch["image"], batch["label"]
        out = self.model(images)
        terms = self._loss(out, target, images)
        self._term_names = list(terms)
        loss = self._guard.loss(torch.stack(list(terms.values())), self.global_step)
        B = images.shape[0]
        self._train_images += B
        self.log("train/loss", loss, batch_size=B)  # shown by SegProgressBar on logging steps
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=B)
        keep = out.stats["tokens_per_stage"].float().mean(0) / out.stats["tokens_per_stage"][:, 0].float().mean()
        self.log_dict({f"train/keep_s{i}": k for i, k in enumerate(keep)}, batch_size=B)
        self.log("train/gmacs", out.stats["macs"].mean() / 1e9, batch_size=B)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A step with non-finite gradients is skipped by the fused optimiser (under fp16 a GradScaler skips it)."""
        skip = bool(optimizer.defaults.get("fused")) and getattr(self.trainer.precision_plugin, "scaler", None) is None
        self._guard.before_step(optimizer, self.global_step, skip)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step  # the same over the micro-batches of one accumulated step
        if step > 0 and logging_step(self.trainer) and step != self._logged_step:
            self._logged_step = step
            self._guard.check(self._term_names)
            self._time_training()

    def _time_training(self) -> None:
        """Training throughput between two logging steps, everything included (data, Lightning, syncs) but
        validation (the clock pauses) and the warm-up before the first logging step (compilation, autotuning)."""
        now, step = self._clock(), self.global_step
        images = self._train_images * self.trainer.world_size
        if self._window is not None:
            seconds, steps, imgs = now - self._window[0], step - self._window[1], images - self._window[2]
            for key, value in (("seconds", seconds), ("steps", steps), ("images", imgs)):
                self.train_speed[key] += value
            self.log("train/images_per_s", imgs / seconds)
        self._window = (now, step, images)

    def on_train_end(self) -> None:
        self._guard.check(self._term_names)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_head = not name.startswith("backbone.")
            no_decay = not hp.decay_all and (p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")))
            groups.setdefault((is_head, no_decay), []).append(p)
        param_groups = [
            {
                "params": ps,
                "lr": hp.lr * (hp.head_lr_mult if head else 1.0),
                "weight_decay": 0.0 if nd else hp.weight_decay,
            }
            for (head, nd), ps in groups.items()
        ]
        # fused: one kernel launch per step instead of ~10 per tensor group (host-bound steps), and it skips a
        # non-finite step on the device (dtop.lit.guard)
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(param_groups, lr=hp.lr, betas=tuple(hp.betas), fused=True)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(param_groups, lr=hp.lr, momentum=hp.momentum, fused=True)
            if hp.momentum > 0:  # fused SGD leaves new buffers uninitialised if its first step is skipped
                for p in (p for group in param_groups for p in group["params"]):
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {hp.optimizer!r}.")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int, total: int) -> float:
        """Linear warmup from ``warmup_ratio`` and poly decay to ``min_lr`` over ``poly_iters`` (default: the
        run's steps). mmseg 0.x multiplies the two; with ``poly_after_warmup`` the decay starts from the full
        rate when the warmup ends, as mmengine's LinearLR + PolyLR(begin=warmup) (DToP's code)."""
        hp = self.hparams
        floor = hp.min_lr / hp.lr if hp.lr > 0 else 0.0
        horizon = max(int(hp.poly_iters or total), 1)
        start = hp.warmup_iters if hp.poly_after_warmup else 0
        frac = min(max(step - start, 0), horizon - start) / max(horizon - start, 1)
        poly = (1 - floor) * (1 - frac) ** hp.poly_power + floor
        if step < hp.warmup_iters:
            k = hp.warmup_ratio + (1 - hp.warmup_ratio) * step / hp.warmup_iters
            return poly * k
        return poly

    # -------------------------------------------------------------- evaluation
    def _infer(self, images: Tensor, size: tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        """Pixel labels at ``size`` plus per-image stats summed over slide windows."""
        hp = self.hparams
        slide = None if hp.eval_mode == "whole" or hp.crop_size is None else (hp.crop_size, hp.stride)
        return infer_labels(self.model, self._inference, images, size, slide)

    def _clock(self) -> float:
        """Seconds, once the device has finished what it was given (so intervals time the GPU's work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _eval_step(self, batch: dict[str, Any], metrics: SegMetrics) -> None:
        images, target = batch["image"], batch["label"]
        captured = self._graphed.captured if self._graphed is not None else 0
        start = self._clock()
        pred, stats = self._infer(images, tuple(target.shape[-2:]))
        if self._graphed is None or self._graphed.captured == captured:  # images/s without graph captures
            self._infer_time += self._clock() - start
            self._infer_images += images.shape[0]
        metrics.update(pred, target)
        valid = target != self.hparams.ignore_index
        correct = ((pred == target) & valid).flatten(1).sum(1).float()
        pix_acc = 100 * correct / valid.flatten(1).sum(1).clamp(min=1)
        for i in range(min(len(batch["id"]), self.max_visuals - len(self.visuals))):
            shown = images.shape[-2:]  # the exit map covers the model's input: show prediction and labels there
            self.visuals.append(
                {
                    "id": batch["id"][i],
                    "image": images[i].detach().float().cpu(),
                    "label": _nearest(target[i], shown).cpu(),
                    "pred": _nearest(pred[i], shown).cpu(),
                    "exit_stage": stats["exit_stage"][i].cpu(),
                }
            )
        gm_keys = [f"macs{k}{d}" for k in MAC_KINDS for d in ("", "_dense")]
        parts = [pix_acc, stats["windows"], *(stats[k] / 1e9 for k in gm_keys)]
        parts += [stats["tokens_per_stage"], stats["exits_per_stage"], stats["exits_per_class"]]
        S, K = stats["exits_per_class"].shape[1:]
        # one copy to the host for the whole batch (counts are exact in float64)
        table = torch.cat([t.reshape(len(pix_acc), -1).to(torch.float64) for t in parts], 1).cpu()
        scalars, table = table[:, : 2 + len(gm_keys)].tolist(), table[:, 2 + len(gm_keys) :].long()
        tokens, exits, per_class = table[:, :S].tolist(), table[:, S : 2 * S].tolist(), table[:, 2 * S :].tolist()
        names = self.class_names
        for i, image_id in enumerate(batch["id"]):
            acc, windows, *gm = scalars[i]
            row: dict[str, Any] = {
                "image_id": image_id,
                **{f"gmacs{k.removeprefix('macs')}": v for k, v in zip(gm_keys, gm, strict=True)},
                "windows": int(windows),
                "pixel_acc": acc,
            }
            row.update({f"tokens_s{s}": t for s, t in enumerate(tokens[i])})
            row.update({f"exits_s{s}": e for s, e in enumerate(exits[i])})
            row.update({f"exits_s{s}.{names[c]}": per_class[i][s * K + c] for s in range(S) for c in range(K)})
            self.per_image.append(row)

    @property
    def class_names(self) -> list[str]:
        """The data's class names (ids as strings where the data module gave none)."""
        names = self.hparams.get("class_names")
        return list(names) if names else [str(k) for k in range(self.model.num_classes)]

    @property
    def _inference(self) -> Segmentor | GraphedSegmentor:
        return self._graphed if self._graphed is not None else self.model

    def _use_graphs(self) -> None:
        """Evaluation on a GPU replays CUDA graphs: "auto" in test/validate runs (dtop-eval, the test after
        training, calibration, sweeps), true also in the validation loops of training. The graphs apply
        under 16-bit precision and run eagerly otherwise (:class:`GraphedSegmentor` decides per call)."""
        mode = self.hparams.cuda_graphs
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if self.device.type == "cuda" and (mode is True or (mode == "auto" and not fitting)):
            self._graphed = GraphedSegmentor.for_streams(self.model)

    def _drop_graphs(self) -> None:
        """Graphs read the weights' and buffers' addresses: Lightning may move the model between loops, so
        each loop captures its own, and training never keeps their memory pool."""
        self._graphed = None

    def on_test_start(self) -> None:
        self._use_graphs()

    def on_test_end(self) -> None:
        self._drop_graphs()

    def on_validation_start(self) -> None:
        self._guard.check(self._term_names)
        self._paused = self._clock()
        self._use_graphs()

    def on_validation_end(self) -> None:
        self._drop_graphs()
        if self._window is not None:  # training resumes: the window's clock skips the validation
            start, step, images = self._window
            self._window = (start + self._clock() - self._paused, step, images)

    def on_validation_epoch_start(self) -> None:
        self.per_image, self.visuals = [], []
        self._infer_time, self._infer_images, self._eval_start = 0.0, 0, self._clock()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval(self.val_metrics, "val")

    def on_test_epoch_start(self) -> None:
        self.per_image, self.visuals = [], []
        self._infer_time, self._infer_images, self._eval_start = 0.0, 0, self._clock()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._finish_eval(self.test_metrics, "test")

    def _finish_eval(self, metrics: SegMetrics, prefix: str) -> None:
        # Under DDP (see dtop.lit.distributed) compute() sums every rank's confusion matrix, and the rows and
        # visuals of every rank are gathered, each image once and in dataset order: every rank then holds the
        # single-device result.
        computed = metrics.compute()
        metrics.reset()
        result: dict[str, Any] = format_metrics(computed)
        per_class = {key: dict(zip(self.class_names, computed[key].tolist(), strict=True)) for key in ("IoU", "Acc")}
        result["per_class"] = {
            key: {name: round(v, 2) if math.isfinite(v) else None for name, v in values.items()}
            for key, values in per_class.items()
        }
        wall, local = self._clock() - self._eval_start, len(self.per_image)  # this device's loop, before gathering
        sampler = eval_loader_sampler(self._trainer, prefix)
        self.per_image = gather_eval_rows(self.per_image, sampler)
        self.visuals = gather_eval_visuals(self.visuals, sampler, self.max_visuals)
        summary = summarize_per_image(self.per_image, self.model.num_stages)
        result.update(summary)
        # inference alone (forward, labels at the label size), on this device: no data loading or metrics
        result["images_per_s"] = round(self._infer_images / self._infer_time, 2) if self._infer_time > 0 else None
        # the whole loop on this device: data, inference with its graph captures, metrics and statistics
        result["images_per_s_wall"] = round(local / wall, 2) if wall > 0 else None
        result["graphs_captured"] = self._graphed.captured if self._graphed is not None else 0
        self.last_eval = result
        scalars = {f"{prefix}/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}
        scalars.update(
            {
                f"{prefix}/{key}.{name}": v
                for key, values in result["per_class"].items()
                for name, v in values.items()
                if v is not None
            }
        )
        # already global and equal on every rank: no reduce (it would only add rounding); not rank_zero_only,
        # so ModelCheckpoint sees val/mIoU on every rank. Loggers write from rank 0 only.
        self.log_dict(scalars, sync_dist=False)


def summarize_per_image(rows: list[dict[str, Any]], num_stages: int) -> dict[str, Any]:
    """Mean GMACs (per image, and per crop window as DToP reports them), tokens and keep ratios over the
    evaluated images, and the same GMACs of the dense model."""
    if not rows:
        return {"images": 0}
    n = len(rows)
    tokens = [sum(r[f"tokens_s{s}"] for r in rows) / n for s in range(num_stages)]
    out: dict[str, Any] = {"images": n}
    windows = sum(r.get("windows", 1) for r in rows)
    for key in (f"gmacs{kind}{dense}" for kind in MAC_KINDS for dense in ("", "_dense")):
        total = sum(r[key] for r in rows)
        out[key] = round(total / n, 4)  # per image: every slide window it took
        out[f"{key}_per_crop"] = round(total / windows, 4)  # DToP's average per slide window
    out["tokens_per_stage"] = [round(t, 2) for t in tokens]
    out["keep_ratio_per_stage"] = [round(t / tokens[0], 4) if tokens[0] else math.nan for t in tokens]
    return out


def _nearest(label: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """An integer map [H, W] resized to ``size`` by nearest neighbour (for drawing beside the input)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return torch.nn.functional.interpolate(label[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()


def _scaled(logits: Tensor, scale: int) -> Tensor:
    """A [B, K, h, w] map bilinearly upsampled ``scale`` times (align_corners=False)."""
    return resize_bilinear(logits, (logits.shape[-2] * scale, logits.shape[-1] * scale))
