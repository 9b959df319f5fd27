"""DoViT — Dynamic Token-Pass (Sec. 3.2 token pass and separate attention, Sec. 3.3 reconstruction).

At each decision point the active tokens are put back into the full feature map over the stopped
tokens' kept features (reconstruction), and the aux head grades the whole map. Tokens whose
confidence exceeds ξ stop: they keep their features and skip every later block (the active tokens
attend only among themselves). The cls token absorbs the mean of the stopped tokens (Eq. 8) once more
than ``agg_rate`` of them have stopped, and the decode head predicts every token from the final
reconstructed map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dtop.errors import ConfigError
from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.packed import TokenStream
from dtop.models.policies.base import Decision, Policy
from dtop.models.state import RunState
from dtop.ops.grade import confidence
from dtop.ops.token_pass import merge_cls


class DoViT(Policy):
    """Token pass with separate attention, reconstruction and cls merging.

    ``diff_conf``: tokens whose confidence is *below* it stop as well (the official code's option for
    tokens no later layer will make confident); ``merge_cls``: Eq. 8 on or off; ``grade_upsample``:
    grade on the head's map bilinearly upsampled by this factor, a token's confidence being the mean
    over its sub-pixels of the top class probability (the official code with SETR heads, which output
    ×4 maps); 1 grades the token-grid logits.
    """

    def __init__(
        self,
        threshold: float | Sequence[float] = 1.0,
        diff_conf: float | None = None,
        agg_rate: float = 0.1,
        merge_cls: bool = True,
        grade_upsample: int = 1,
    ) -> None:
        super().__init__(threshold)
        if grade_upsample < 1:
            raise ConfigError(f"grade_upsample must be an integer ≥ 1; got {grade_upsample}.")
        self.grade_upsample = int(grade_upsample)
        if diff_conf is not None and not 0.0 <= diff_conf <= 1.0:
            raise ValueError(f"diff_conf must lie in [0, 1] or be null; got {diff_conf}.")
        if not 0.0 <= agg_rate <= 1.0:
            raise ValueError(f"agg_rate must lie in [0, 1]; got {agg_rate}.")
        self.diff_conf, self.agg_rate, self.merge_cls = diff_conf, agg_rate, merge_cls

    def prunes_at(self, stage: int, num_aux: int) -> bool:
        return self.enabled and (self.diff_conf is not None or self.threshold_at(stage, num_aux) < 1.0)

    def graph_key(self) -> tuple:
        return super().graph_key() + (self.diff_conf, self.agg_rate, self.merge_cls, self.grade_upsample)

    def stage_end(self, stage: int, num_aux: int, stream: TokenStream, head: SegHead, state: RunState) -> Decision:
        flat = state.flat(stream)
        full = state.scatter_features(stream, flat)  # reconstruction
        fs = state.full_stream(full)
        out = head(full, fs)
        state.snapshot(out.logits, out.presence)
        state.count_head(stage, head, "grid")
        if not self.prunes_at(stage, num_aux):
            return stream, None, None
        conf = self._confidence(out, head, fs, state)
        # non-patch tokens map to the trash row, never stopped
        keep = state.stop(conf, self.threshold_at(stage, num_aux), self.diff_conf, stage, flat)
        if self.merge_cls and state.has_cls:
            stream = self._merge_cls(stream, full, state, stage)
        return stream, keep, None

    def _confidence(self, out: HeadOutput, head: SegHead, fs: TokenStream, state: RunState) -> Tensor:
        """[B·N] each token's confidence: its top class probability, or with ``grade_upsample`` the mean of
        that over its sub-pixels of the bilinearly upsampled map."""
        if self.grade_upsample == 1:
            return confidence(out.logits, out.presence, head.grading_rule, lambda: head.token_probs(out, fs), fs.batch)
        if head.grading_rule != "softmax":
            raise ConfigError(f"grade_upsample needs a head graded by softmax; {type(head).__name__} is not.")
        (h, w), u, K = state.grid, self.grade_upsample, out.logits.shape[-1]
        grid = out.logits.float().view(-1, h, w, K).permute(0, 3, 1, 2)
        top = F.interpolate(grid, scale_factor=u, mode="bilinear", align_corners=False).softmax(1).amax(1)
        return F.avg_pool2d(top[:, None], u).reshape(-1)

    def _merge_cls(self, stream: TokenStream, full: Tensor, state: RunState, stage: int) -> TokenStream:
        """Eq. 8: cls ← ½(cls + mean of stopped tokens), once more than ``agg_rate`` have stopped."""
        B, N, n = state.batch_size, state.num_patches, state.num_images
        stopped = state.stopped[:-1].view(B, N)[:n]
        first = stream.cu_seqlens[:n].long()
        state.count_policy(stage, N * full.shape[-1])  # the stopped tokens' sum: a [1, N] × [N, C] product per image
        x = merge_cls(stream.x, first, full.view(B, N, -1)[:n], stopped, self.agg_rate, state.inplace)
        return stream.with_x(x)

    def finish(self, stream: TokenStream, head: SegHead, norm: nn.Module, state: RunState) -> None:
        """The decode head predicts every token from the final reconstructed map."""
        full = state.scatter_features(stream)
        out = head(norm(full), state.full_stream(full))
        state.fill_canvas(out.logits)
        state.count_head(state.num_stages - 1, head, "grid")
        state.presence, state.features = out.presence, full
