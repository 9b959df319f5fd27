"""DToP — Dynamic Token Pruning (Sec. 3.2 early exit, Sec. 3.4 keeping context).

At the end of every stage, the stage's aux head predicts every active token. A token whose
confidence (top class probability) reaches ξ is *easy*: its logits are written to the output canvas
and the token exits, leaving every later layer. With FCN heads a token's logits are then final (its
pixels still blend with neighbouring tokens in the bilinear upsampling and overlapping slide windows).
With ATM heads only its mask logits are: a pixel's score is sigmoid(mask logit) · sigmoid(presence)
with the *decode* head's presence, whose class queries attended to the tokens still active, so an
exited token's class can still change (as in the official code; the paper's footnote to Fig. 3).
Removing all easy tokens would take the context they give the hard ones, so the k most confident easy
tokens of each class stay (``topk``, the paper's rule). Ablations: ``remove`` (no context),
``average`` (each class's easy tokens stay as one mean token), ``avg_topk`` (both), ``fixed_ratio``
(the most confident fraction of each image exits, whatever ξ).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtop.models.heads.base import SegHead
from dtop.models.packed import Extra, TokenStream
from dtop.models.policies.base import Decision, Policy
from dtop.models.state import RunState
from dtop.ops.context import keep_over_stream, topk_context, topk_per_group
from dtop.ops.grade import Grades

CONTEXT_POLICIES = ("topk", "remove", "average", "avg_topk", "fixed_ratio")


def graded_tokens(stream: TokenStream, head: SegHead) -> tuple[Tensor | None, TokenStream]:
    """The tokens a head grades: the patch tokens (their indices in ``stream`` and their sub-stream),
    or, for a token-local head, the whole stream (non-patch tokens ride along; index None)."""
    if head.token_local:
        return None, stream
    return stream.patches()


class DToP(Policy):
    """Early exit of easy tokens with per-class context."""

    def __init__(
        self, threshold: float | Sequence[float] = 1.0, context: str = "topk", k: int = 5, ratio: float | Tensor = 0.25
    ) -> None:
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

    def can_starve_heads(self) -> bool:
        if self.context == "fixed_ratio":  # a ratio below 1 always keeps a token
            return bool((torch.as_tensor(self.ratio) >= 1).any())
        if self.context in ("topk", "avg_topk"):  # top-k context always keeps tokens
            return self.k < 1
        return True  # remove / average: everything confident enough leaves

    def stage_end(self, stage: int, num_aux: int, stream: TokenStream, head: SegHead, state: RunState) -> Decision:
        idx, ps = graded_tokens(stream, head)
        if ps.x.shape[0] == 0:  # every token has exited
            state.snapshot(state.canvas, None)
            return stream, None, None
        out = head(ps.x, ps)
        state.count_head(stage, head, "stream" if idx is None else "patches")
        if not self.prunes_at(stage, num_aux):  # training at ξ = 1: the head only learns
            state.write_canvas(state.flat(ps), out.logits)
            state.snapshot(state.canvas, out.presence)
            return stream, None, None
        # grade (and, without a context rule to apply, let the easy tokens exit at once)
        final = self.context in ("remove", "average")
        g = state.grade(out, head, ps, stage, self.threshold_at(stage, num_aux), self._mask(stage, ps), final)
        state.snapshot(state.canvas, out.presence)
        summary = self._summaries(ps, g, state.num_classes) if self.context in ("average", "avg_topk") else None
        if g.keep is not None:  # the easy tokens exited with the grading
            return stream, keep_over_stream(g.keep, idx, stream.pos), summary
        if self.context == "fixed_ratio":
            return stream, keep_over_stream(self._ratio_keep(g, ps, state, stage), idx, stream.pos), summary
        # topk / avg_topk: the k most confident easy tokens of each (image, class) stay
        keep = topk_context(
            g.conf,
            g.cls,
            g.easy,
            ps.batch,
            ps.pos,
            ps.cu_seqlens,
            state.num_classes,
            self.k,
            state.exit_stage,
            stage,
            idx,
            stream.pos,
        )
        return stream, keep, summary

    def _mask(self, stage: int, ps: TokenStream) -> Tensor | None:
        """A recorded keep mask [n, N] that decides which tokens are easy, instead of the threshold."""
        return None

    def _ratio_keep(self, g: Grades, ps: TokenStream, state: RunState, stage: int) -> Tensor:
        """``fixed_ratio``: the most confident share of each image's graded patch tokens exits at ``stage``."""
        patch = ps.pos >= 0
        n_patch = torch.zeros(ps.batch_size, dtype=torch.long, device=g.conf.device).index_add_(
            0, ps.batch, patch.long()
        )
        quota = (n_patch.double() * self.ratio).floor().long()
        group = torch.where(patch, ps.batch, ps.batch_size)
        exits = topk_per_group(group, g.conf, F.pad(quota, (0, 1)), ps.batch_size)
        state.mark_exits(state.flat(ps), exits, stage)
        return ~exits

    @staticmethod
    def _summaries(ps: TokenStream, g: Grades, K: int) -> Extra:
        """One mean token per (image, class) among the tokens graded easy (kept where any was)."""
        G = ps.batch_size * K
        group = torch.where(g.easy, ps.batch * K + g.cls, torch.full_like(g.cls, G))
        sums = ps.x.new_zeros(G + 1, ps.x.shape[1]).index_add(0, group, ps.x)[:G]
        counts = torch.zeros(G + 1, device=g.cls.device, dtype=ps.x.dtype).index_add_(
            0, group, torch.ones_like(ps.x[:, 0])
        )[:G]
        image = torch.arange(G, device=g.cls.device) // K
        return Extra(sums / counts.clamp(min=1)[:, None], image, counts > 0)

    def finish(self, stream: TokenStream, head: SegHead, norm: nn.Module, state: RunState) -> None:
        """The decode head predicts the tokens left after the last stage (patch tokens, as the dense model's)."""
        _, ps = stream.patches()
        if ps.x.shape[0] == 0:
            return
        out = head(norm(ps.x), ps)
        state.write_canvas(state.flat(ps), out.logits)
        state.count_head(state.num_stages - 1, head, "patches")
        state.presence = out.presence
