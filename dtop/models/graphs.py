"""Pruned inference as a few CUDA-graph replays.

Below ~10k tokens a GPU runs a ViT faster than Python can launch its kernels, and a pruning stage
end (aux head, grading, top-k per class, canvas writes, compaction) is dozens of small kernels. So
inference is captured whole: one graph per *group* of stages, a group ending where the policy may
remove tokens. Each graph runs its blocks, the policy's stage end and the compaction of the kept
tokens into a fixed buffer; the host then reads one small vector (the kept count and the longest
segment: the one sync per pruning stage) and replays the graph of the next group for that size.

Graphs need fixed shapes: the next group runs a token count rounded up to a bucket, and the tokens
past the kept ones form a phantom image whose results are dropped (the rules the engine keeps for
this are in :mod:`dtop.models.state`). The code inside a graph is the engine's own
(``Segmentor.begin / run_stage / assemble``), so eager and replayed inference compute the same
thing; the tests run this path without capture on the CPU and compare it with the eager one.

:class:`GraphedSegmentor` is the entry point: it wraps a :class:`~dtop.models.engine.Segmentor` and
offers its inference methods, replayed where they can be and eager elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from dtop.models.engine import Segmentor, SegOutput
from dtop.models.packed import TokenStream
from dtop.models.state import RunState


@dataclass
class _Tokens:
    """A fixed buffer of compacted tokens: kept ones first, then the rest (the next phantom)."""

    x: Tensor
    batch: Tensor
    pos: Tensor
    cu: Tensor  # [B + 2]: over the real images, then the phantom's end (set by the next group)
    stats: Tensor  # [kept, longest segment, shortest segment, kept non-patch tokens]
    host_stats: Tensor  # the same, copied into pinned host memory by the graph itself
    ready: Any  # CUDA event recorded after the replay that fills ``host_stats`` (None on the CPU)


@dataclass
class _Context:
    """Everything fixed for one input shape and policy setting: buffers, state, stage groups."""

    images: Tensor
    state: RunState | None
    groups: list[tuple[int, int]]
    full: int  # tokens of the unpruned batch
    capacity: int
    tokens: list[_Tokens | None]
    amp: torch.dtype | None  # autocast dtype the graphs run under
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class StageGraphs:
    """Captures and replays inference graphs, keyed by input shape, policy setting and token bucket.

    ``bucket`` and ``steps``: token counts are rounded up to a multiple of max(bucket, 1/``steps`` of
    the unpruned count), so one batch shape needs at most ~``steps`` graphs per pruning stage and the
    padding costs under 1/``steps`` of the dense work; the longest segment is rounded up to ``bucket``.
    A batch's sizes depend on that batch alone (not on what ran before), so a replay, a capture and the
    eager fallback compute the same thing, and an evaluation sharded over ranks equals one device's.
    Past ``max_graphs`` new sizes run the same code eagerly instead of capturing more.

    ``capture_after``: a size is captured the ``capture_after``-th time it is asked for and runs eagerly
    before. A first capture of a size that never ran costs two eager warm-up runs plus the recording;
    a size that already ran eagerly is recorded at once (its kernels are compiled and its buffers
    allocated). Over a stream of distinct images (an evaluation, ``dtop-predict``) many bucketed sizes
    come once; 2 there runs them eagerly and records the ones that come back with no warm-up. 1 (capture
    at once) suits a benchmark that warms up on what it then times.

    Captures call ``CUDAGraph.capture_begin/capture_end`` directly rather than ``torch.cuda.graph``,
    whose entry synchronises the device and empties the caching allocators (device and pinned host
    memory) on every capture: over a stream with dozens of captures, that made the eager runs between
    them allocate afresh and the DataLoader pin each batch into new host memory.
    """

    def __init__(
        self,
        bucket: int = 64,
        max_graphs: int = 256,
        capture: bool = True,
        capture_after: int = 1,
        steps: int = 128,
    ) -> None:
        if capture_after < 1:
            raise ValueError(f"capture_after must be ≥ 1, got {capture_after}.")
        if steps < 1 or bucket < 1:
            raise ValueError(f"steps and bucket must be ≥ 1, got {steps} and {bucket}.")
        self.bucket, self.max_graphs, self.capture, self.capture_after = bucket, max_graphs, capture, capture_after
        self.steps = steps
        self.contexts: dict[tuple, _Context] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.requests: dict[tuple, int] = {}  # how often each size not captured yet was asked for
        self.pool: Any = None
        self.stream: torch.cuda.Stream | None = None  # the captures' stream (capture needs a side stream)

    def run(self, model: Segmentor, images: Tensor) -> SegOutput:
        ctx, ckey = self._context(model, images)
        ctx.images.copy_(images)
        amp = ctx.amp
        B = images.shape[0]
        out = None
        filled = 0  # tokens the last group placed in its buffer (kept ones first)
        for g, (first, last) in enumerate(ctx.groups):
            if g == 0:
                key, size = (ckey, 0), None
            else:
                src = ctx.tokens[g % 2]
                if src.ready is not None:
                    src.ready.synchronize()  # the one host wait per pruning stage
                n_keep, max_len, _, n_special = src.host_stats.tolist()
                step = max(self.bucket, _round_up(ctx.full // self.steps, 8))
                Tb = min(_round_up(max(n_keep, 1), step), filled)
                L = min(_round_up(max(max_len, Tb - n_keep + n_special, 1), self.bucket), Tb)
                key, size = (ckey, g, Tb, L), (Tb, L, n_special)

            def program(g: int = g, first: int = first, last: int = last, size: Any = size) -> Any:
                with torch.autocast(
                    images.device.type, dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False
                ):
                    return self._program(model, ctx, g, first, last, size, B)

            out = self._replay(key, program, ctx)
            if g + 1 < len(ctx.groups):
                filled = out
                if ctx.tokens[(g + 1) % 2].ready is not None:
                    ctx.tokens[(g + 1) % 2].ready.record()
        return _clone(out)

    def _context(self, model: Segmentor, images: Tensor) -> tuple[_Context, tuple]:
        groups, first = [], 0
        for stage in range(model.num_stages):
            if stage == model.num_stages - 1 or model.prunes_after(stage):
                groups.append((first, stage))
                first = stage + 1
        amp = torch.get_autocast_dtype("cuda") if images.is_cuda and torch.is_autocast_enabled("cuda") else None
        ckey = (tuple(images.shape), images.dtype, str(images.device), amp, model.pruning.graph_key(), tuple(groups))
        if ckey not in self.contexts:
            B, _, H, W = images.shape
            p = model.backbone.patch_size
            N = (-(-H // p)) * (-(-W // p))
            full = B * (N + model.backbone.num_prefix_tokens)
            capacity = full + (model.num_stages + 1) * (B + 1) * model.num_classes + 2 * self.bucket
            self.contexts[ckey] = _Context(torch.empty_like(images), None, groups, full, capacity, [None, None], amp)
        return self.contexts[ckey], ckey

    def _program(
        self, model: Segmentor, ctx: _Context, g: int, first: int, last: int, size: tuple[int, int, int] | None, B: int
    ) -> Any:
        """One group: the code both the capture and the eager fallback run."""
        if g == 0:
            stream, state, ctx.sizes = model.begin(ctx.images, keep_stages=False, phantom=True, state=ctx.state)
            ctx.state = state
        else:
            stream = self._stream_in(ctx, ctx.tokens[g % 2], size, B)
        state = ctx.state
        keep = extra = None
        for stage in range(first, last + 1):
            stream, keep, extra = model.run_stage(stage, stream, state)
        if last == model.num_stages - 1:
            return model.assemble(state, *ctx.sizes)
        if keep is None:
            keep = torch.ones_like(stream.batch, dtype=torch.bool)
        j = (g + 1) % 2
        if ctx.tokens[j] is None:  # first (eager) run: allocate with the stream's dtype
            dev = stream.x.device
            ctx.tokens[j] = _Tokens(
                stream.x.new_zeros(ctx.capacity, stream.x.shape[1]),
                torch.zeros(ctx.capacity, dtype=torch.long, device=dev),
                torch.zeros(ctx.capacity, dtype=torch.long, device=dev),
                torch.zeros(B + 2, dtype=torch.int32, device=dev),
                torch.zeros(4, dtype=torch.long, device=dev),
                torch.zeros(4, dtype=torch.long, pin_memory=stream.x.is_cuda),
                torch.cuda.Event() if stream.x.is_cuda else None,
            )
        dst = ctx.tokens[j]
        x, order, _, _, _, stats = stream.plan(keep, extra, state.num_patches, (dst.batch, dst.pos, dst.cu, dst.stats))
        m = order.numel()
        torch.index_select(x, 0, order, out=dst.x[:m])
        dst.host_stats.copy_(stats, non_blocking=True)
        return m  # the next group's stream is at most this long: tokens past ``m`` are not laid out

    @staticmethod
    def _stream_in(ctx: _Context, src: _Tokens, size: tuple[int, int, int], B: int) -> TokenStream:
        """The next group's stream: the kept tokens, then the phantom image up to the bucket size (both laid
        out by the last group's :meth:`TokenStream.plan`)."""
        Tb, L, n_special = size
        src.cu[B + 1 :].fill_(Tb)
        return TokenStream(src.x[:Tb], src.batch[:Tb], src.pos[:Tb], src.cu, L, B + 1, n_special, False, True)

    def _replay(self, key: tuple, program: Callable[[], Any], ctx: _Context) -> Any:
        if not self.capture:
            return program()
        if key not in self.graphs:
            self.requests[key] = asked = self.requests.get(key, 0) + 1
            if asked < self.capture_after or len(self.graphs) >= self.max_graphs:
                return program()
            self.graphs[key] = self._capture(program, ctx, warm=asked == 1)
            del self.requests[key]
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, program: Callable[[], Any], ctx: _Context, warm: bool) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Record ``program``; ``warm``: the size never ran, so first run it twice on a side stream (the
        state is restored afterwards) to compile its kernels and allocate lazily created buffers outside
        the graph's pool."""
        if warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                saved = ctx.state.tensors() if ctx.state is not None else []
                backup = [t.clone() for t in saved]
                for _ in range(2):
                    program()
                for t, b in zip(saved, backup):
                    t.copy_(b)
            torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread pinning the next batch)
        # must not invalidate this thread's capture, which global mode lets them do
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = program()
            finally:
                graph.capture_end()
        return graph, out


def _clone(out: SegOutput) -> SegOutput:
    """Copy a replayed output out of the graph's buffers (the next replay overwrites them)."""

    def c(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.clone()

    return replace(
        out,
        logits=c(out.logits),
        presence=c(out.presence),
        features=c(out.features),
        stats={k: v.clone() for k, v in out.stats.items()},
        stage_logits=[],
        stage_presence=[],
    )


class GraphedSegmentor:
    """A :class:`~dtop.models.engine.Segmentor`'s inference, replayed as CUDA graphs where it can be.

    Replays apply on CUDA with fp16/bf16 weights or autocast, without autograd, in eval mode; any other
    call runs the model eagerly. Same results as the model (``segment``, ``predict`` and the forward
    are the model's own code); a plain object, so wrapping adds no parameters or state-dict keys.
    """

    def __init__(self, model: Segmentor, bucket: int = 64, **settings: Any) -> None:
        """``settings``: :class:`StageGraphs`' other arguments (``max_graphs``, ``capture``, ``capture_after``,
        ``steps``)."""
        self.model = model
        self.graphs = StageGraphs(bucket, **settings)

    @classmethod
    def for_streams(cls, model: Segmentor) -> GraphedSegmentor:
        """Settings for a stream of distinct images (evaluation, ``dtop-predict``), where a batch's kept
        count is seldom seen twice: a coarser size grid (32 steps: padding under 1/32 of the dense work)
        on which sizes come back more often, and a capture only on a size's second request."""
        return cls(model, capture_after=2, steps=32)

    @property
    def captured(self) -> int:
        """How many graphs have been captured so far (a call that captures also times the capture)."""
        return len(self.graphs.graphs)

    def replayable(self, images: Tensor) -> bool:
        half = (torch.float16, torch.bfloat16)
        amp = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half
        graphable = images.is_cuda and (amp or images.dtype in half)
        return (graphable or not self.graphs.capture) and not torch.is_grad_enabled() and not self.model.training

    def __call__(self, images: Tensor) -> SegOutput:
        """The model's inference forward (``keep_stages=False``)."""
        if self.replayable(images):
            return self.graphs.run(self.model, images)
        return self.model(images, keep_stages=False)

    def predict(self, images: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, SegOutput]:
        """:meth:`Segmentor.predict <dtop.models.engine.Segmentor.predict>`, replayed."""
        out = self(images)
        return self.model.scores(out, size), out

    def segment(self, images: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, SegOutput]:
        """:meth:`Segmentor.segment <dtop.models.engine.Segmentor.segment>`, replayed."""
        out = self(images)
        return self.model.labels(out, size), out
