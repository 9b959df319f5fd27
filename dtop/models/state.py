"""What one forward accumulates besides the token stream, and the rules that make it graph-capturable.

Inference can be replayed as CUDA graphs (:mod:`dtop.models.graphs`), which fix every tensor's
address and shape at capture. The engine and the policies need not know; they keep to these rules,
all of which live here and in :class:`~dtop.models.packed.TokenStream`:

- **In place where possible.** When no gradient flows and no per-stage snapshot holds the old
  values (:attr:`RunState.inplace`: inference), the canvas, exit stages and DoViT's buffers are
  overwritten in place, so a replay writes into the buffers the capture saw. In training they are
  replaced out of place, which autograd needs.
- **The trash row.** Per-token tensors are flat over (image, patch) with one extra last row; tokens
  that are not patches (cls, registers, DToP's class summaries, padding) write there, so no write
  needs a data-dependent filter (:func:`~dtop.ops.grade.flat_rows`).
- **The phantom image.** A replayed stage runs a fixed number of tokens; the tokens past the real
  ones form one extra image (``TokenStream.phantom``, ``RunState.phantom``) that every per-image
  computation treats as ordinary and whose results nobody reads.
- **Buffers on first use.** Buffers whose width only the stream knows (DoViT's reconstruction,
  its stopped mask) are allocated by the first, eager warm-up run, before any capture.
- **No host sync inside a stage group.** A policy returns its decision as device tensors; only
  :meth:`TokenStream.select` (eager) or the graph runner (one small vector per pruning stage) reads
  anything back.
- **Python-side records persist.** What each head saw (:meth:`RunState.count_head`) is fixed by the
  model and policy, so it is recorded once and survives :meth:`RunState.reset` (a replay runs no
  Python).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.packed import TokenStream
from dtop.ops.grade import Grades, flat_rows, grade, mark_exits, write_rows
from dtop.ops.token_pass import stop_tokens


@dataclass
class RunState:
    """Everything one forward accumulates besides the token stream itself."""

    batch_size: int  # images, including a phantom image when ``phantom``
    grid: tuple[int, int]
    num_classes: int
    num_stages: int
    canvas: Tensor  # [B·N + 1, K] assembled logits, flat over (image, patch), then the trash row
    # [B·N + 1] stage at which each token left the blocks (DToP: whose head wrote its canvas logits; DoViT:
    # where it stopped, the decode head still predicts it), then the trash row
    exit_stage: Tensor
    lengths: Tensor  # [B, S] int32: tokens (patch and other) entering each stage
    embed_macs: float = 0.0  # patch embedding, per image
    embed_macs_mmcv: float = 0.0  # the same with the convolution's bias (mmcv's count)
    head_tokens: dict[int, tuple[SegHead, str]] = field(default_factory=dict)  # stage → (head, what it saw)
    policy_macs: dict[int, float] = field(default_factory=dict)  # stage → per-image MACs of a policy's own GEMMs
    stage_logits: list[Tensor] = field(default_factory=list)  # [B·N, K] per aux stage
    stage_presence: list[Tensor | None] = field(default_factory=list)
    buffer: Tensor | None = None  # [B·N + 1, C] reconstructed features (DoViT), then the trash row
    stopped: Tensor | None = None  # [B·N + 1] bool (DoViT); the trash row never stops
    has_cls: bool = False  # each segment starts with a cls token
    keep_stages: bool = True  # keep per-stage maps (for aux losses); inference drops them to save memory
    phantom: bool = False
    presence: Tensor | None = None  # [B, K] final presence logits (ATM decode head)
    features: Tensor | None = None  # [B·N, C] final reconstructed features (DoViT)
    full_index: tuple[Tensor, Tensor, Tensor] | None = None  # batch, pos, cu_seqlens of the full patch map

    @property
    def num_images(self) -> int:
        return self.batch_size - self.phantom

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def trash(self) -> int:
        """Row of the flat per-token tensors that non-patch tokens write to (and nobody reads)."""
        return self.batch_size * self.num_patches

    @property
    def inplace(self) -> bool:
        """Whether tensors may be overwritten: no gradient flows through them and no snapshot holds them."""
        return not (self.keep_stages or torch.is_grad_enabled())

    def reset(self) -> None:
        """Start a new forward in the same buffers (a replayed graph reuses one state)."""
        self.canvas.zero_()
        self.exit_stage.fill_(self.num_stages - 1)
        for t in (self.buffer, self.stopped):
            if t is not None:
                t.zero_()
        self.stage_logits, self.stage_presence = [], []
        self.presence = self.features = None

    def tensors(self) -> list[Tensor]:
        """Every tensor the state holds (a graph capture saves and restores them around its warm-up)."""
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def flat(self, stream: TokenStream) -> Tensor:
        """Each token's row in the flat per-token tensors (the trash row for non-patch tokens)."""
        return flat_rows(stream.batch, stream.pos, self.num_patches, self.trash)

    def write_canvas(self, flat: Tensor, logits: Tensor) -> None:
        """Overwrite the canvas at rows ``flat``."""
        self.canvas = write_rows(self.canvas, flat, logits, self.inplace)

    def fill_canvas(self, logits: Tensor) -> None:
        """Overwrite every patch row of the canvas with ``logits`` [B·N, K]."""
        if self.inplace:
            self.canvas[:-1].copy_(logits)
        else:
            self.canvas = torch.cat([logits.to(self.canvas.dtype), self.canvas[-1:]])

    def grade(
        self,
        out: HeadOutput,
        head: SegHead,
        ps: TokenStream,
        stage: int,
        threshold: float,
        mask: Tensor | None,
        final: bool,
    ) -> Grades:
        """Write ``head``'s logits for the tokens ``ps`` into the canvas and grade them
        (:func:`~dtop.ops.grade.grade`); with ``final`` the easy tokens exit at ``stage``."""
        g = grade(
            out.logits,
            out.presence,
            head.grading_rule,
            lambda: head.token_probs(out, ps),
            ps.batch,
            ps.pos,
            self.num_patches,
            self.canvas,
            self.exit_stage,
            stage,
            threshold,
            mask,
            final,
            self.inplace,
        )
        self.canvas = g.canvas
        return g

    def mark_exits(self, flat: Tensor, exits: Tensor, stage: int) -> None:
        """Record ``stage`` as the exit stage of the tokens at rows ``flat`` where ``exits``."""
        mark_exits(self.exit_stage, flat, exits, stage)

    def snapshot(self, logits: Tensor, presence: Tensor | None) -> None:
        """Keep a stage's map for its aux loss (training only), in the canvas's dtype."""
        if self.keep_stages:
            self.stage_logits.append(logits.to(self.canvas.dtype))
            self.stage_presence.append(presence)

    def count_head(self, stage: int, head: SegHead, seen: str) -> None:
        """Record that ``stage``'s head ran on ``seen`` tokens: "stream" (every active token, non-patch
        ones riding along), "patches" (the active patch tokens) or "grid" (the full patch map).

        The MACs follow from these records and the per-stage token counts once, at assembly.
        """
        self.head_tokens[stage] = (head, seen)

    def count_policy(self, stage: int, macs: float) -> None:
        """Record the per-image MACs of a policy's own matrix products at ``stage`` (DoViT's cls merge),
        which the MAC count adds to the blocks' and heads' (a FLOP counter sees them too)."""
        self.policy_macs[stage] = float(macs)

    def full_stream(self, x: Tensor) -> TokenStream:
        """The stream of the whole patch map (every token, in grid order); its indices are built once."""
        B, N = self.batch_size, self.num_patches
        if self.full_index is None or self.full_index[0].device != x.device:
            dev = x.device
            self.full_index = (
                torch.arange(B, device=dev).repeat_interleave(N),
                torch.arange(N, device=dev).repeat(B),
                torch.arange(B + 1, device=dev, dtype=torch.int32) * N,
            )
        return TokenStream(x, *self.full_index, N, B, 0, True, self.phantom, True)

    def scatter_features(self, stream: TokenStream, flat: Tensor | None = None) -> Tensor:
        """The full [B·N, C] feature map: the stream's patch tokens at their positions, over the features
        the earlier stages left (DoViT's reconstruction; zeros before anything was written). Non-patch
        tokens go to the buffer's trash row; ``flat``: the stream's rows, if already known."""
        if self.buffer is None:
            self.buffer = stream.x.new_zeros(self.batch_size * self.num_patches + 1, stream.x.shape[1])
        rows = self.flat(stream) if flat is None else flat
        self.buffer = write_rows(self.buffer, rows, stream.x, self.inplace)
        return self.buffer[:-1]

    def stop(self, conf: Tensor, threshold: float, diff_conf: float | None, stage: int, flat: Tensor) -> Tensor:
        """Stop the patch tokens whose confidence ``conf`` [B·N] passes ``threshold`` (or is below
        ``diff_conf``; those not stopped yet exit at ``stage``); returns the keep mask of the stream tokens
        at map rows ``flat`` (:func:`~dtop.ops.token_pass.stop_tokens`; the trash row never stops)."""
        if self.stopped is None:
            self.stopped = torch.zeros(conf.shape[0] + 1, dtype=torch.bool, device=conf.device)
        return stop_tokens(conf, threshold, diff_conf, self.stopped, self.exit_stage, stage, flat)
