"""What happens to tokens at a stage end: the two policies of the one engine.

- :class:`DToP` (Dynamic Token Pruning): the aux head grades the active tokens; tokens with
  confidence ≥ ξ exit — their logits are frozen in the output canvas and they leave every later
  layer — except the k most confident exiting tokens of each class, which stay as context.
- :class:`DoViT` (Dynamic Token-Pass): the aux head grades the full reconstructed map; tokens with
  confidence > ξ stop — they keep their features and skip every later block — the cls token absorbs
  the mean of the stopped tokens, and the decoder predicts every token from the reconstructed map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtop.kernels import load
from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.packed import Extra, TokenStream

CONTEXT_POLICIES = ("topk", "remove", "average", "avg_topk", "fixed_ratio")
Decision = tuple[TokenStream, "Tensor | None", "Extra | None"]


@dataclass
class RunState:
    """Everything one forward accumulates besides the token stream itself.

    Statistics are updated in place, and so are the canvas and DoViT's buffers whenever no gradient
    or per-stage snapshot needs the old values: CUDA-graph replay keeps them in fixed buffers.
    """

    batch_size: int  # images, including a phantom image (see TokenStream) when ``phantom``
    grid: tuple[int, int]
    num_classes: int
    num_stages: int
    canvas: Tensor  # [B·N + 1, K] assembled logits, flat over (image, patch), then the trash row
    exit_stage: Tensor  # [B·N + 1] stage whose head made each token's prediction, then the trash row
    lengths: Tensor  # [B, S] int32: tokens (patch and other) entering each stage
    embed_macs: float = 0.0  # patch embedding, per image
    head_tokens: dict[int, tuple[SegHead, str]] = field(default_factory=dict)  # stage → (head, what it saw)
    stage_logits: list[Tensor] = field(default_factory=list)  # [B·N, K] per aux stage
    stage_presence: list[Tensor | None] = field(default_factory=list)
    buffer: Tensor | None = None  # [B·N, C] reconstructed features (DoViT)
    stopped: Tensor | None = None  # [B·N + 1] bool (DoViT); the trash row never stops
    has_cls: bool = False  # each segment starts with a cls token
    keep_stages: bool = True  # keep per-stage maps (for aux losses); inference drops them to save memory
    phantom: bool = False
    presence: Tensor | None = None  # [B, K] final presence logits (ATM decode head)
    features: Tensor | None = None  # [B·N, C] final reconstructed features (DoViT)

    @property
    def num_images(self) -> int:
        return self.batch_size - self.phantom

    def reset(self) -> None:
        """Start a new forward in the same buffers (CUDA-graph replay reuses one state).

        ``head_tokens`` stays: what each stage's head sees is fixed by the model and policy, and a
        replayed graph does not run the Python that records it.
        """
        self.canvas.zero_()
        self.exit_stage.fill_(self.num_stages - 1)
        for t in (self.buffer, self.stopped):
            if t is not None:
                t.zero_()
        self.stage_logits, self.stage_presence = [], []
        self.presence = self.features = None

    @property
    def inplace(self) -> bool:
        """Whether tensors may be overwritten: no gradient flows through them and no snapshot holds them."""
        return not (self.keep_stages or torch.is_grad_enabled())

    def write_canvas(self, flat: Tensor, logits: Tensor) -> None:
        """Overwrite the canvas at ``flat``."""
        logits = logits.to(self.canvas.dtype)
        if self.inplace:
            self.canvas.index_put_((flat,), logits)
        else:
            self.canvas = self.canvas.index_put((flat,), logits)

    def mark_exits(self, flat: Tensor, exits: Tensor, stage: int) -> None:
        """Record ``stage`` as the exit stage of the tokens at rows ``flat`` where ``exits``."""
        self.exit_stage.index_put_((flat,), torch.where(exits, stage, self.exit_stage[flat]))

    def snapshot(self, logits: Tensor, presence: Tensor | None) -> None:
        if self.keep_stages:
            self.stage_logits.append(logits)
            self.stage_presence.append(presence)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def trash(self) -> int:
        """Row of the flat per-token tensors that non-patch tokens write to (and nobody reads)."""
        return self.batch_size * self.num_patches

    def flat(self, stream: TokenStream) -> Tensor:
        """Each token's row in the flat per-token tensors (the trash row for non-patch tokens)."""
        return torch.where(stream.pos >= 0, stream.pos.add(stream.batch, alpha=self.num_patches), self.trash)

    def count_head(self, stage: int, head: SegHead, seen: str) -> None:
        """Record that ``stage``'s head ran on ``seen`` tokens: "stream" (every active token, non-patch
        ones riding along), "patches" (the active patch tokens) or "grid" (the full patch map).

        The MACs follow from these records and the per-stage token counts once, at assembly: counting
        them per stage costs a dozen tiny kernels each, a real share of a batch-1 forward.
        """
        self.head_tokens[stage] = (head, seen)

    def full_stream(self, x: Tensor) -> TokenStream:
        """The stream of the whole patch map (every token, in grid order)."""
        B, N = self.batch_size, self.num_patches
        dev = x.device
        return TokenStream(x, torch.arange(B, device=dev).repeat_interleave(N), torch.arange(N, device=dev).repeat(B),
                           torch.arange(B + 1, device=dev, dtype=torch.int32) * N, N, B, 0, True, self.phantom, True)


def _thresholds(threshold: float | Sequence[float]) -> tuple[float, ...]:
    values = (float(threshold),) if isinstance(threshold, (int, float)) else tuple(float(t) for t in threshold)
    if not values or any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"Confidence threshold ξ must lie in [0, 1] (1.0 disables pruning); got {threshold!r}.")
    return values


def _sort_key(key: Tensor, bound: int) -> Tensor:
    """``key`` (values in [0, bound]) in the narrowest integer dtype that holds it.

    GPU radix sorts make one pass per key byte, so a uint8 key sorts ~4× faster than an int64 one.
    """
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max:
            return key.to(dtype)
    return key


def topk_per_group(group: Tensor, score: Tensor, k: int | Tensor, num_groups: int) -> Tensor:
    """Mark the ``k`` highest-scoring members of every group, vectorised over all groups.

    ``group`` holds ids in [0, num_groups], where ``num_groups`` means "in no group"; ``k`` is one
    number or one per group id ([num_groups + 1]).
    """
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(_sort_key(group[order], num_groups), stable=True)]
    g = group[order]
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=group.device).index_add_(0, g, torch.ones_like(g))
    starts = counts.cumsum(0) - counts
    rank = torch.arange(g.numel(), device=g.device) - starts[g]
    limit = k[g] if isinstance(k, Tensor) else k
    chosen = (rank < limit) & (g < num_groups)
    return torch.zeros_like(chosen).index_put((order,), chosen)


def graded_tokens(stream: TokenStream, head: SegHead) -> tuple[Tensor | None, TokenStream]:
    """The tokens a head grades: the patch tokens (their indices in ``stream`` and their sub-stream),
    or, for a token-local head, the whole stream (non-patch tokens ride along; index None)."""
    if head.token_local:
        return None, stream
    return stream.patches()


@dataclass
class Grades:
    """A stage end's grading of the tokens its head saw: confidence, class, whether easy (may exit)
    and, when the easy tokens were made to exit right away, the keep mask over those tokens."""

    conf: Tensor  # [T] float32
    cls: Tensor  # [T] int64
    easy: Tensor  # [T] bool
    keep: Tensor | None


def grade_reference(out: HeadOutput, head: SegHead, ps: TokenStream, state: RunState, stage: int, threshold: float,
                    mask: Tensor | None, final: bool) -> Grades:
    """Write the head's logits into the canvas and grade the tokens ``ps``.

    A patch token is easy when its confidence (top class probability) is ≥ ``threshold`` or, given a
    recorded keep ``mask`` [n, N], when the mask drops it. ``final``: the easy tokens exit now —
    their exit stage is recorded and ``keep`` is the rest. On CUDA at inference one Triton kernel
    (:mod:`dtop.kernels.grade`) does all of this.
    """
    flat = state.flat(ps)
    state.write_canvas(flat, out.logits)
    conf, cls = head.token_probs(out, ps).max(-1)
    patch = ps.pos >= 0
    if mask is None:
        easy = (conf >= threshold) & patch
    else:
        easy = ~mask[ps.batch.clamp(max=mask.shape[0] - 1), ps.pos.clamp(min=0)] & patch
    keep = None
    if final:
        state.mark_exits(flat, easy, stage)
        keep = ~easy
    return Grades(conf, cls, easy, keep)


def grade(out: HeadOutput, head: SegHead, ps: TokenStream, state: RunState, stage: int, threshold: float,
          mask: Tensor | None, final: bool) -> Grades:
    """:func:`grade_reference`, as one kernel where it can be: CUDA, a head graded by softmax or ATM's
    sigmoid rule, and buffers that may be written in place (inference: no gradient to carry)."""
    kernel = load("grade") if ps.x.is_cuda and state.inplace else None
    rule = head.grading if type(head).token_probs is SegHead.token_probs else None
    if kernel is None or rule not in ("softmax", "sigmoid"):
        return grade_reference(out, head, ps, state, stage, threshold, mask, final)
    presence = out.presence if rule == "sigmoid" else None
    return Grades(*kernel.grade(out.logits, presence, rule == "sigmoid", ps.batch, ps.pos, state.num_patches,
                                state.canvas, state.exit_stage, stage, threshold, mask, final))


class Policy(nn.Module):
    """Common base: a policy has thresholds per aux stage and turns head outputs into decisions."""

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

    def stage_end(self, stage: int, num_aux: int, stream: TokenStream, head: SegHead,
                  state: RunState) -> Decision:  # pragma: no cover - interface
        """Grade the stream with the stage's aux head; return (stream, keep mask or None, extra tokens).

        Everything here stays on the device with data-independent shapes (the engine's CUDA graphs
        capture it); the engine applies the decision with :meth:`TokenStream.select`.
        """
        raise NotImplementedError

    def finish(self, stream: TokenStream, head: SegHead, norm: nn.Module,
               state: RunState) -> None:  # pragma: no cover - interface
        """Run the decode head: fill ``state.canvas`` and ``state.presence`` / ``state.features``."""
        raise NotImplementedError

    def graph_key(self) -> tuple:
        """Settings a captured CUDA graph bakes in: a change must capture new graphs."""
        return (type(self).__name__, self.enabled, self.threshold)


class DToP(Policy):
    """Early exit of easy tokens with per-class context (DToP, Sec. 3.2 and 3.4)."""

    def __init__(self, threshold: float | Sequence[float] = 1.0, context: str = "topk", k: int = 5,
                 ratio: float | Tensor = 0.25) -> None:
        super().__init__(threshold)
        if context not in CONTEXT_POLICIES:
            raise ValueError(f"Unknown context policy {context!r}; choose one of {CONTEXT_POLICIES}.")
        if k < 0 or not bool(((torch.as_tensor(ratio) >= 0) & (torch.as_tensor(ratio) <= 1)).all()):
            raise ValueError(f"Need k ≥ 0 and 0 ≤ ratio ≤ 1; got k={k}, ratio={ratio}.")
        self.context, self.k = context, k
        if isinstance(ratio, Tensor):  # a buffer, so it follows the model to its device
            self.register_buffer("ratio", ratio.clone(), persistent=False)
        else:
            self.ratio = float(ratio)

    def graph_key(self) -> tuple:
        return super().graph_key() + (self.context, self.k, self.ratio if isinstance(self.ratio, float) else None)

    def prunes_at(self, stage: int, num_aux: int) -> bool:
        return self.enabled and (self.context == "fixed_ratio" or self.threshold_at(stage, num_aux) < 1.0)

    def _mask(self, stage: int, ps: TokenStream) -> Tensor | None:
        """A recorded keep mask [n, N] that decides which tokens are easy, instead of the threshold."""
        return None

    def _context_exits(self, g: Grades, ps: TokenStream, K: int) -> Tensor:
        """The easy tokens that leave, once the context rule kept some of them as context."""
        if self.context == "fixed_ratio":
            patch = ps.pos >= 0
            n_patch = torch.zeros(ps.batch_size, dtype=torch.long, device=g.conf.device).index_add_(0, ps.batch,
                                                                                                   patch.long())
            quota = (n_patch.double() * self.ratio).floor().long()
            group = torch.where(patch, ps.batch, ps.batch_size)
            return topk_per_group(group, g.conf, F.pad(quota, (0, 1)), ps.batch_size)
        G = ps.batch_size * K
        group = torch.where(g.easy, ps.batch * K + g.cls, torch.full_like(g.cls, G))
        return g.easy & ~topk_per_group(group, g.conf, self.k, G)

    def stage_end(self, stage: int, num_aux: int, stream: TokenStream, head: SegHead,
                  state: RunState) -> Decision:
        idx, ps = graded_tokens(stream, head)
        if ps.x.shape[0] == 0:
            state.snapshot(state.canvas, None)
            return stream, None, None
        out = head(ps.x, ps)
        state.count_head(stage, head, "stream" if idx is None else "patches")
        if not self.prunes_at(stage, num_aux):
            state.write_canvas(state.flat(ps), out.logits)
            state.snapshot(state.canvas, out.presence)
            return stream, None, None
        # "remove"/"average": every easy token exits; the other rules pick which ones afterwards
        final = self.context in ("remove", "average")
        g = grade(out, head, ps, state, stage, self.threshold_at(stage, num_aux), self._mask(stage, ps), final)
        state.snapshot(state.canvas, out.presence)
        if g.keep is None:
            exits = self._context_exits(g, ps, state.num_classes)
            state.mark_exits(state.flat(ps), exits, stage)
            kept = ~exits
        else:
            kept = g.keep
        if idx is None:
            keep = kept
        else:  # prefix and summary tokens never exit
            keep = torch.ones(stream.x.shape[0], dtype=torch.bool, device=idx.device).index_put((idx,), kept)
            keep = keep | (stream.pos < 0)
        summary = self._summaries(ps, g.easy, g.cls, state.num_classes) if self.context in ("average", "avg_topk") else None
        return stream, keep, summary

    @staticmethod
    def _summaries(ps: TokenStream, easy: Tensor, cls: Tensor, K: int) -> Extra:
        """One mean token per (image, class) among the tokens graded easy (kept where any was)."""
        G = ps.batch_size * K
        group = torch.where(easy, ps.batch * K + cls, torch.full_like(cls, G))
        sums = ps.x.new_zeros(G + 1, ps.x.shape[1]).index_add(0, group, ps.x)[:G]
        counts = torch.zeros(G + 1, device=cls.device, dtype=ps.x.dtype).index_add_(0, group, torch.ones_like(ps.x[:, 0]))[:G]
        image = torch.arange(G, device=cls.device) // K
        return Extra(sums / counts.clamp(min=1)[:, None], image, counts > 0)

    def finish(self, stream: TokenStream, head: SegHead, norm: nn.Module, state: RunState) -> None:
        _, ps = stream.patches()  # patch tokens only, as the dense model's decode head
        if ps.x.shape[0] == 0:
            return
        out = head(norm(ps.x), ps)
        state.write_canvas(state.flat(ps), out.logits)
        state.count_head(state.num_stages - 1, head, "patches")
        state.presence = out.presence


class DoViT(Policy):
    """Token pass with separate attention, reconstruction and cls merging (DoViT, Sec. 3.2–3.3)."""

    def __init__(self, threshold: float | Sequence[float] = 1.0, diff_conf: float | None = None,
                 agg_rate: float = 0.1, merge_cls: bool = True) -> None:
        super().__init__(threshold)
        if diff_conf is not None and not 0.0 <= diff_conf <= 1.0:
            raise ValueError(f"diff_conf must lie in [0, 1] or be null; got {diff_conf}.")
        if not 0.0 <= agg_rate <= 1.0:
            raise ValueError(f"agg_rate must lie in [0, 1]; got {agg_rate}.")
        self.diff_conf, self.agg_rate, self.merge_cls = diff_conf, agg_rate, merge_cls

    def prunes_at(self, stage: int, num_aux: int) -> bool:
        return self.enabled and (self.diff_conf is not None or self.threshold_at(stage, num_aux) < 1.0)

    def graph_key(self) -> tuple:
        return super().graph_key() + (self.diff_conf, self.agg_rate, self.merge_cls)

    @staticmethod
    def _reconstruct(stream: TokenStream, state: RunState) -> Tensor:
        """Put active patch tokens back at their grid positions over the stopped tokens' features."""
        _, ps = stream.patches()
        if state.buffer is None:
            state.buffer = ps.x.new_zeros(state.batch_size * state.num_patches, ps.x.shape[1])
        if state.inplace:
            return state.buffer.index_put_((state.flat(ps),), ps.x)
        state.buffer = state.buffer.index_put((state.flat(ps),), ps.x)
        return state.buffer

    def stage_end(self, stage: int, num_aux: int, stream: TokenStream, head: SegHead,
                  state: RunState) -> Decision:
        full = self._reconstruct(stream, state)
        fs = state.full_stream(full)
        out = head(full, fs)
        state.snapshot(out.logits.to(state.canvas.dtype), out.presence)
        state.count_head(stage, head, "grid")
        if not self.prunes_at(stage, num_aux):
            return stream, None, None
        thr = self.threshold_at(stage, num_aux)
        conf = head.token_probs(out, fs).max(-1).values
        stop = conf > thr
        if self.diff_conf is not None:
            stop = stop | (conf < self.diff_conf)
        if state.stopped is None:
            state.stopped = F.pad(torch.zeros_like(stop), (0, 1))
        stopped = state.stopped[:-1]
        state.exit_stage[:-1].masked_fill_(stop & ~stopped, stage)
        stopped |= stop
        keep = ~state.stopped[state.flat(stream)]  # non-patch tokens map to the trash row, never stopped
        if self.merge_cls and state.has_cls:
            stream = self._merge_cls(stream, full, state)
        return stream, keep, None

    def _merge_cls(self, stream: TokenStream, full: Tensor, state: RunState) -> TokenStream:
        """Eq. 8: cls ← ½(cls + mean of stopped tokens), once more than ``agg_rate`` have stopped."""
        B, N, n = state.batch_size, state.num_patches, state.num_images
        stopped = state.stopped[:-1].view(B, N)[:n]
        count = stopped.sum(1)
        mean = (full.view(B, N, -1)[:n] * stopped[..., None].to(full.dtype)).sum(1) / count.clamp(min=1)[:, None]
        first = stream.cu_seqlens[:n].long()
        cls = stream.x[first]
        merged = torch.where((count.float() / N > self.agg_rate)[:, None], 0.5 * (cls + mean.to(cls.dtype)), cls)
        return stream.with_x(stream.x.index_put((first,), merged))

    def finish(self, stream: TokenStream, head: SegHead, norm: nn.Module, state: RunState) -> None:
        full = self._reconstruct(stream, state)
        fs = state.full_stream(full)
        out = head(norm(full), fs)
        if state.inplace:
            state.canvas[:-1].copy_(out.logits)
        else:
            state.canvas = out.logits.to(state.canvas.dtype)
        state.count_head(state.num_stages - 1, head, "grid")
        state.presence, state.features = out.presence, full


class RecordedDecisions(DToP):
    """DToP driven by given keep masks instead of thresholds: for benchmarks and replaying decisions.

    ``keep[s]`` is a [B, N] bool mask of the patch tokens that stay after aux stage ``s``; the aux
    heads still run (their cost is part of the method), their grades are just not used.
    """

    def __init__(self, keep: Sequence[Tensor]) -> None:
        super().__init__(0.5, context="remove")
        self.keep: list[Tensor] = []
        self.set_keep(keep)

    def set_keep(self, keep: Sequence[Tensor]) -> None:
        """Replace the masks, in place where shapes and devices match (CUDA graphs read the old storage)."""
        keep = [k.bool() for k in keep]
        same = len(keep) == len(self.keep) and all(
            k.shape == o.shape and k.device == o.device for k, o in zip(keep, self.keep))
        if same:
            for old, new in zip(self.keep, keep):
                old.copy_(new)
        else:
            self.keep = [k.clone() for k in keep]

    def graph_key(self) -> tuple:
        return super().graph_key() + (len(self.keep),)

    def prunes_at(self, stage: int, num_aux: int) -> bool:
        return self.enabled and stage < len(self.keep)

    def _mask(self, stage: int, ps: TokenStream) -> Tensor:
        mask = self.keep[stage]
        if mask.device != ps.x.device:
            mask = self.keep[stage] = mask.to(ps.x.device)
        if mask.shape[0] != ps.num_images:
            raise ValueError(f"Recorded keep masks are for {mask.shape[0]} images; the batch has {ps.num_images}.")
        return mask  # a phantom image borrows the last real row


def random_keep_masks(batch: int, num_patches: int, keep: Sequence[float], spread: float,
                      generator: torch.Generator | None = None) -> list[Tensor]:
    """Nested random keep masks with per-image cumulative keep ratios ``keep[s] ± spread``."""
    masks, prev = [], torch.ones(batch, num_patches, dtype=torch.bool)
    scores = torch.rand(batch, num_patches, generator=generator)
    for k in keep:
        ratio = (k + (torch.rand(batch, generator=generator) * 2 - 1) * spread).clamp(0.0, 1.0)
        n_keep = (ratio * num_patches).round().long()
        rank = scores.argsort(1, descending=True).argsort(1)
        mask = (rank < n_keep[:, None]) & prev
        masks.append(mask)
        prev = mask
    return masks
