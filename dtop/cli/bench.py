"""``dtop-bench``: wall-clock dense vs pruned for a model config, timed the way GPUs must be timed.

Decisions come from a keep schedule (random nested keep masks with per-image keep ratios) or, with
``ckpt_path``, from the trained model itself on the data's images. Every iteration draws fresh random
inputs; times are medians of CUDA-event intervals after warm-up (wall clock on CPU).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from dtop.checkpoint import load_model_weights
from dtop.cli.common import cli, describe_cfg, hydra_app, json_safe, log, use_checkpoint_config, write_json
from dtop.errors import ConfigError
from dtop.lit.guard import NonFiniteGuard
from dtop.losses import cross_entropy
from dtop.models.engine import Segmentor, SegOutput
from dtop.models.graphs import GraphedSegmentor
from dtop.models.packed import TokenStream
from dtop.models.policies import RecordedDecisions, random_keep_masks
from dtop.models.policies.synthetic import SyntheticGrades
from dtop.version import dtop_version

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds one call takes: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":

        def run(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:

        def run(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    return run


def graph_ms(fn: Callable[[], Any], reps: int = 20, rounds: int = 7) -> float:
    """Milliseconds per call of ``fn`` captured ``reps`` times in one CUDA graph: the median of ``rounds``
    timed replays after a warm one. Why: kernels of a few µs, timed without launch overhead (the
    scripts' microbenchmarks). ``fn`` runs once on a side stream first (lazy setup, planning)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    timer = _timer(torch.device("cuda"))
    return statistics.median(timer(graph.replay) for _ in range(rounds)) / reps


def _measure(
    fn: Callable[[int], Any],
    warmup: int,
    iters: int,
    device: torch.device,
    prepare: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """Median milliseconds of ``fn(i)`` over ``iters`` calls after ``warmup``; ``prepare(i)`` runs before
    each call, outside the timed region."""
    timer = _timer(device)
    prepare = prepare or (lambda i: None)

    def call(i: int) -> float:
        prepare(i)
        return timer(lambda: fn(i))

    for i in range(warmup):
        call(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [call(warmup + i) for i in range(iters)]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "peak_mib": peak}


class Inputs:
    """A pool of distinct batches (random, or real images), rotated so no timing sees one batch twice in a row."""

    def __init__(
        self,
        batch: int,
        size: tuple[int, int],
        classes: int,
        device: torch.device,
        pool: int = 4,
        images: list[torch.Tensor] | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(0)
        if images is None:
            self.images = [torch.randn(batch, 3, *size, generator=g).to(device) for _ in range(pool)]
        else:
            self.images = [im.to(device) for im in images]
        self.labels = [torch.randint(0, classes, (batch, *size), generator=g).to(device) for _ in range(pool)]

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i % len(self.images)], self.labels[i % len(self.labels)]


def _real_images(cfg: DictConfig, model: Segmentor, batch: int, size: tuple[int, int], pool: int) -> list[torch.Tensor]:
    """``pool`` batches of distinct val images, resized to ``size`` and normalised as the model's weights expect."""
    dm = instantiate(cfg.data)
    if model.backbone.has_weights:
        dm.follow_weights(*model.backbone.mean_std, weights=model.backbone.weights_name)
    dm.setup("validate")
    ds = dm.val_dataset
    n = min(len(ds), batch * pool)
    if n < batch:
        raise ConfigError(f"The val split has {len(ds)} images, fewer than batch_size={batch}: lower batch_size.")
    imgs = [F.interpolate(ds[i]["image"][None], size=size, mode="bilinear", align_corners=False)[0] for i in range(n)]
    return [torch.stack(imgs[j : j + batch]) for j in range(0, n - batch + 1, batch)]


def _plain_dense(model: Segmentor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """The dense model as one writes it for ``torch.compile``: timm's own blocks over [B, L, C] (fused
    SDPA), the final norm and the decode head on the patch tokens; returns the token-grid logits and
    the presence logits (ATM heads)."""
    vit, head = model.backbone, model.decode_head
    prefix, p = vit.num_prefix_tokens, vit.patch_size

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, _, H, W = images.shape
        x = vit.embed(images)
        for block in vit.blocks:
            x = block(x)
        x = vit.norm(x)
        stream = TokenStream.from_dense(x, prefix).patches()[1]
        out = head(stream.x, stream)
        return out.logits.view(B, H // p, W // p, -1).permute(0, 3, 1, 2), out.presence

    return forward


class Decisions:
    """Who decides, per batch of the pool: the model itself (a checkpoint on real images), synthetic grades
    for the configured policy, or recorded keep masks (the ablation without grading or context)."""

    def __init__(self, model: Segmentor, cfg: DictConfig, batch: int, size: tuple[int, int], device: torch.device):
        if not cfg.ckpt_path and cfg.decisions not in ("synthetic", "recorded"):
            raise ConfigError(
                f"decisions must be 'synthetic' or 'recorded' without a checkpoint (ckpt_path= gives the model's "
                f"own decisions on val images); got {cfg.decisions!r}."
            )
        self.model, self.policy = model, model.pruning
        self.kind = "model" if cfg.ckpt_path else "dense" if not model.aux_heads else str(cfg.decisions)
        self.summary = f"keep {list(cfg.keep)} ± {cfg.keep_spread}"
        self.masks: list[list[torch.Tensor]] = []
        self.grades: SyntheticGrades | None = None
        self.recorded: RecordedDecisions | None = None
        if self.kind in ("model", "dense"):
            return
        if len(cfg.keep) != len(model.aux_heads):
            raise ConfigError(
                f"keep has {len(cfg.keep)} ratios for {len(model.aux_heads)} pruning stages (prune_layers "
                f"{model.prune_layers}): give one cumulative keep ratio per stage."
            )
        if not 0.0 < float(cfg.synthetic_threshold) <= 1.0:
            raise ConfigError(f"synthetic_threshold must be in (0, 1]; got {cfg.synthetic_threshold}.")
        p = model.backbone.patch_size
        N = (-(-size[0] // p)) * (-(-size[1] // p))
        g = torch.Generator().manual_seed(int(cfg.seed))
        self.masks = [
            [m.to(device) for m in random_keep_masks(batch, N, cfg.keep, cfg.keep_spread, g)] for _ in range(cfg.pool)
        ]
        if all(t >= 1.0 for t in self.policy.threshold):
            self.policy.set_threshold(float(cfg.synthetic_threshold))
        self.grades = SyntheticGrades(model.aux_heads, self.masks[0], model.num_classes, generator=g).to(device)
        self.recorded = RecordedDecisions(self.masks[0])
        self.use_recorded(self.kind == "recorded")

    def use_recorded(self, recorded: bool) -> None:
        """Switch between the configured policy on synthetic grades and recorded masks (same keep sets);
        the grades' hooks are on only while the policy reads them."""
        if self.recorded is None:
            return
        self.model.pruning = self.recorded if recorded else self.policy
        self.kind = "recorded" if recorded else "synthetic"
        if recorded:
            self.grades.remove()
        else:
            self.grades.attach()

    def set(self, i: int) -> None:
        """Batch ``i``'s keep masks, copied into what reads them now (outside the timed region)."""
        if self.masks:
            masks = self.masks[i % len(self.masks)]
            (self.recorded if self.kind == "recorded" else self.grades).set_keep(masks)

    def describe(self) -> str:
        if self.kind == "model":
            return "the checkpoint's own, on distinct val images"
        return "none: a dense model" if self.kind == "dense" else f"{self.kind}: {self.summary}"


def bench(cfg: DictConfig) -> dict[str, Any]:
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg.dtype]
    B, size = int(cfg.batch_size), (int(cfg.input_size[0]), int(cfg.input_size[1]))
    if int(cfg.pool) < 1 or B < 1:
        raise ConfigError(f"pool and batch_size must be at least 1; got pool={cfg.pool}, batch_size={B}.")
    model: Segmentor = instantiate(cfg.model).to(device)
    real = None
    if cfg.ckpt_path:
        load_model_weights(model, cfg.ckpt_path, configured=describe_cfg(cfg))
        real = _real_images(cfg, model, B, size, int(cfg.pool))
    inputs = Inputs(B, size, model.num_classes, device, pool=int(cfg.pool), images=real)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if cfg.precision not in ("pure", "mixed"):
        raise ConfigError(
            f"precision must be 'pure' (weights cast to dtype) or 'mixed' (autocast); got {cfg.precision!r}."
        )
    train_model = model
    if cfg.precision == "pure" and dtype != torch.float32:
        # inference on a copy whose weights are in ``dtype`` (Lightning's "bf16-true"): no per-call weight
        # casts, norms and residuals in 16 bits; training keeps fp32 weights under autocast (parked on the CPU)
        model = copy.deepcopy(model).to(dtype)
        train_model.cpu()
        infer_autocast: Any = nullcontext()
    else:
        infer_autocast = autocast
    decisions = Decisions(model, cfg, B, size, device)
    infer_dtype = next(model.parameters()).dtype
    # capture at once (capture_after=1): the warm-up captures the sizes that the timed calls then replay
    graphed = GraphedSegmentor(model, int(cfg.graph_bucket)) if cfg.cuda_graphs and device.type == "cuda" else None
    runner: Segmentor | GraphedSegmentor = graphed if graphed is not None else model

    def forward(images: torch.Tensor) -> SegOutput:
        return graphed(images) if graphed is not None else model(images, keep_stages=False)

    cast = [im.to(infer_dtype) for im in inputs.images]  # once, not in the timed calls

    def infer(i: int, dense: bool, upsample: bool = True) -> None:
        """``segment`` (labels at the input size: what a user gets), or the forward alone (token-grid logits)."""
        images = cast[i % len(cast)]
        with torch.no_grad(), infer_autocast, model.dense_mode() if dense else nullcontext():
            if upsample:
                runner.segment(images)
            else:
                forward(images)

    model.eval()
    graph_diff = None
    if graphed is not None:
        decisions.set(0)
        with torch.no_grad(), infer_autocast:
            replayed = graphed(inputs(0)[0].to(infer_dtype)).logits.float()
            eager = model(inputs(0)[0].to(infer_dtype), keep_stages=False).logits.float()
        graph_diff = float((replayed - eager).abs().max() / eager.abs().max().clamp(min=1e-6))
    policy = decisions.policy
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "dtop": dtop_version(),
        "backbone": model.backbone.name,
        "policy": type(policy).__name__,
        "context": getattr(policy, "context", None),
        "threshold": list(policy.threshold),
        "batch_size": B,
        "input_size": list(size),
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "cuda_graphs": graphed is not None,
        "compile_blocks": model.backbone.compile_blocks,
        "graph_vs_eager_rel_diff": graph_diff,
        "decisions": decisions.describe(),
        "distinct_batches": len(inputs),
    }
    warmup = max(int(cfg.warmup), len(inputs))  # every batch of the pool (and its graphs) seen before timing
    dense_t = _measure(lambda i: infer(i, True), warmup, cfg.iters, device)
    pruned_t = _measure(lambda i: infer(i, False), warmup, cfg.iters, device, decisions.set)
    dense_fwd = _measure(lambda i: infer(i, True, False), warmup, cfg.iters, device)
    pruned_fwd = _measure(lambda i: infer(i, False, False), warmup, cfg.iters, device, decisions.set)
    macs, tokens = [], []
    with torch.no_grad(), infer_autocast:
        for i in range(len(inputs)):
            decisions.set(i)
            out = forward(cast[i])
            macs.append(float(out.stats["macs"].mean()))
            tokens.append(out.stats["tokens_per_stage"].float().mean(0))
    dense_macs = model.dense_macs(*size)[0]
    gmacs_ratio = statistics.mean(macs) / dense_macs
    time_ratio = pruned_t["ms"] / dense_t["ms"]
    mean_tokens = torch.stack(tokens).mean(0)
    inf: dict[str, Any] = {
        "dense_ms": dense_t["ms"],
        "pruned_ms": pruned_t["ms"],
        "dense_img_s": 1e3 * B / dense_t["ms"],
        "pruned_img_s": 1e3 * B / pruned_t["ms"],
        "gmacs_dense": dense_macs / 1e9,
        "gmacs_pruned": statistics.mean(macs) / 1e9,
        "gmacs_ratio": gmacs_ratio,
        "time_ratio": time_ratio,
        "efficiency": gmacs_ratio / time_ratio,
        "forward_dense_ms": dense_fwd["ms"],
        "forward_pruned_ms": pruned_fwd["ms"],
        "forward_efficiency": gmacs_ratio * dense_fwd["ms"] / pruned_fwd["ms"],
        "keep_ratio_per_stage": (mean_tokens / mean_tokens[0]).tolist(),
        "dense_peak_mib": dense_t["peak_mib"],
        "pruned_peak_mib": pruned_t["peak_mib"],
    }
    if cfg.compile_dense and device.type != "cuda":
        log.warning("compile_dense: skipped on the CPU (it times torch.compile's CUDA graphs).")
    elif cfg.compile_dense:
        inf.update(_bench_compiled_dense(model, cast, infer_autocast, warmup, cfg.iters, device))
    if "compiled_dense_ms" in inf:
        best = min(inf["dense_ms"], inf["compiled_dense_ms"])
        inf["best_dense_ms"] = best
        inf["efficiency_vs_best_dense"] = gmacs_ratio * best / inf["pruned_ms"]
    if cfg.ablation_recorded and decisions.recorded is not None and decisions.kind == "synthetic":
        decisions.use_recorded(True)
        rec_t = _measure(lambda i: infer(i, False), warmup, cfg.iters, device, decisions.set)
        decisions.use_recorded(False)
        inf["recorded_pruned_ms"] = rec_t["ms"]
    result["inference"] = inf
    if cfg.train_step:
        if train_model is not model:
            if decisions.grades is not None:
                decisions.grades.remove()
            del model, runner, graphed, decisions, cast  # the inference copy and its graphs' memory pool
            if device.type == "cuda":
                torch.cuda.empty_cache()
            train_model.to(device)
            decisions = Decisions(train_model, cfg, B, size, device)
        result["train"] = _bench_train(cfg, train_model, inputs, autocast, device, decisions)
    return result


def _bench_compiled_dense(
    model: Segmentor,
    images: list[torch.Tensor],
    autocast: Any,
    warmup: int,
    iters: int,
    device: torch.device,
) -> dict[str, float]:
    """The dense model under ``torch.compile`` (mode ``max-autotune-no-cudagraphs`` would tune longer;
    ``reduce-overhead`` adds CUDA graphs, so it is the fastest dense a user gets without writing kernels).
    Labels at the input size are formed as for the other columns (from fp32 token-grid logits)."""
    size = tuple(images[0].shape[-2:])
    if any(n % model.backbone.patch_size for n in size):
        log.warning("compile_dense: skipped, the input size %s is not a multiple of the patch size.", size)
        return {}
    compiled = torch.compile(_plain_dense(model), mode="reduce-overhead", dynamic=False)

    def run(i: int) -> None:
        with torch.no_grad(), autocast:
            logits, presence = compiled(images[i % len(images)])
            out = SegOutput(
                logits.to(torch.float32, copy=True),
                None if presence is None else presence.clone(),
                [],
                [],
                {},
                None,
                size,
                size,
            )
            model.labels(out)

    t0 = time.perf_counter()
    run(0)
    compile_s = time.perf_counter() - t0
    timed = _measure(run, warmup + 2, iters, device)
    return {"compiled_dense_ms": timed["ms"], "compile_s": compile_s}


def _bench_train(
    cfg: DictConfig,
    model: Segmentor,
    inputs: Inputs,
    autocast: Any,
    device: torch.device,
    decisions: Decisions,
) -> dict[str, float]:
    """One optimiser step as ``dtop-train`` takes it: forward under autocast, CE on the final and every
    stage map at full resolution, backward, the non-finite guard, fused AdamW."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)  # as dtop-train
    guard = NonFiniteGuard()
    macs: dict[bool, list[torch.Tensor]] = {True: [], False: []}  # kept on the device: no sync in the step

    def step(i: int, dense: bool) -> None:
        images, labels = inputs(i)
        with autocast, model.dense_mode() if dense else nullcontext():
            out = model(images)
            maps = [out.logits, *out.stage_logits]
            loss = guard.loss(torch.stack([cross_entropy(model.upsampled(m, out), labels) for m in maps]), i)
        if len(macs[dense]) < 8:
            macs[dense].append(out.stats["macs"].mean().detach())
        loss.backward()
        guard.before_step(opt, i, skip=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dense_t = _measure(lambda i: step(i, True), cfg.warmup, cfg.iters, device)
    pruned_t = _measure(lambda i: step(i, False), cfg.warmup, cfg.iters, device, decisions.set)
    guard.check(["decode", *(f"aux{s}" for s in range(len(model.aux_heads)))])
    model.eval()
    return {
        "dense_ms": dense_t["ms"],
        "pruned_ms": pruned_t["ms"],
        "speedup": dense_t["ms"] / pruned_t["ms"],
        "gmacs_ratio_fwd": float(torch.stack(macs[False]).mean() / torch.stack(macs[True]).mean()),
        "dense_peak_mib": dense_t["peak_mib"],
        "pruned_peak_mib": pruned_t["peak_mib"],
    }


def print_result(result: dict[str, Any]) -> None:
    table = Table(
        title=f"dtop-bench · {result['backbone']} · {result['policy']} ({result['context'] or '-'}) · "
        f"{result['device']} · batch {result['batch_size']} · {result['input_size'][0]}×{result['input_size'][1]} · "
        f"{result['dtype']} · decisions: {result['decisions']}"
    )
    for col in ("", "dense", "pruned", "ratio"):
        table.add_column(col, justify="right")
    inf = result["inference"]
    table.add_row("ms / batch", f"{inf['dense_ms']:.3f}", f"{inf['pruned_ms']:.3f}", f"{inf['time_ratio']:.3f}")
    table.add_row("images / s", f"{inf['dense_img_s']:.1f}", f"{inf['pruned_img_s']:.1f}", "")
    table.add_row(
        "GMACs / image", f"{inf['gmacs_dense']:.2f}", f"{inf['gmacs_pruned']:.2f}", f"{inf['gmacs_ratio']:.3f}"
    )
    table.add_row("peak MiB", f"{inf['dense_peak_mib']:.0f}", f"{inf['pruned_peak_mib']:.0f}", "")
    table.add_row("efficiency", "", "", f"{inf['efficiency']:.3f}")
    if "compiled_dense_ms" in inf:
        table.add_row("torch.compile dense ms", f"{inf['compiled_dense_ms']:.3f}", "", "")
        table.add_row("efficiency vs fastest dense", "", "", f"{inf['efficiency_vs_best_dense']:.3f}")
    if "recorded_pruned_ms" in inf:
        table.add_row("recorded masks ms (ablation)", "", f"{inf['recorded_pruned_ms']:.3f}", "")
    table.add_row(
        "forward ms (no upsampling)",
        f"{inf['forward_dense_ms']:.3f}",
        f"{inf['forward_pruned_ms']:.3f}",
        f"eff. {inf['forward_efficiency']:.3f}",
    )
    if "train" in result:
        tr = result["train"]
        table.add_row(
            "train ms / step", f"{tr['dense_ms']:.3f}", f"{tr['pruned_ms']:.3f}", f"×{tr['speedup']:.2f} faster"
        )
        table.add_row("train peak MiB", f"{tr['dense_peak_mib']:.0f}", f"{tr['pruned_peak_mib']:.0f}", "")
    Console().print(table)


def run(cfg: DictConfig) -> dict[str, Any]:
    use_checkpoint_config(cfg)
    result = bench(cfg)
    print_result(result)
    write_json(Path(cfg.paths.output_dir) / "bench.json", result)
    print(json.dumps(json_safe(result), allow_nan=False))
    return result


@hydra_app("bench")
def main(cfg: DictConfig) -> None:
    cli(run)(cfg)


if __name__ == "__main__":
    main()
