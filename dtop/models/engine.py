"""The segmentor: a plain ViT split into stages by aux heads, driven by a pruning policy.

Read in the paper's order: embed → for each stage: run its blocks on the packed active tokens, then
let the policy grade the tokens with the stage's aux head and decide who leaves → decode head on what
is left → assemble every token's logits into one map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtop.models.blocks import blocks_forward
from dtop.models.heads.base import SegHead
from dtop.models.hub import HubMixin
from dtop.models.macs import block_coefficients, block_mmcv, blocks_macs, patch_embed_macs, patch_embed_mmcv
from dtop.models.packed import TokenStream
from dtop.models.policies import Decision, DToP, Policy
from dtop.models.state import RunState
from dtop.models.vit import ViTBackbone
from dtop.ops import labels as label_op
from dtop.ops.resize import Upsampled


@dataclass
class SegOutput:
    """Token-grid outputs of one forward; ``logits`` maps are [B, K, h, w] over the patch grid."""

    logits: Tensor
    presence: Tensor | None
    stage_logits: list[Tensor]
    stage_presence: list[Tensor | None]
    stats: dict[str, Tensor]
    features: Tensor | None  # [B, N, C] reconstructed final features (DoViT), else None
    input_size: tuple[int, int]  # (H, W) of the unpadded input
    padded_size: tuple[int, int]


def _chains(logits: Tensor, out: SegOutput, size: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    """Per axis (grid, padded, input, output) sizes: the resize chain from token-grid logits to pixels."""
    return [
        (int(n), int(p), int(c), int(s))
        for n, p, c, s in zip(logits.shape[-2:], out.padded_size, out.input_size, size or out.input_size)
    ]


class Segmentor(HubMixin, nn.Module):
    """Backbone + aux heads at ``prune_layers`` (1-based layer indices) + decode head + ``pruning`` policy.

    ``save_pretrained`` / ``from_pretrained`` (:mod:`dtop.models.hub`) make it a portable folder.
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        decode_head: SegHead,
        aux_heads: Sequence[SegHead] = (),
        prune_layers: Sequence[int] = (),
        pruning: Policy | None = None,
    ) -> None:
        super().__init__()
        prune_layers = [int(p) for p in prune_layers]
        depth = backbone.depth
        if any(not 1 <= p < depth for p in prune_layers) or sorted(set(prune_layers)) != prune_layers:
            raise ValueError(
                f"prune_layers must be strictly increasing layer indices in [1, {depth - 1}] for a "
                f"{depth}-layer backbone (1-based; the decode head sits after layer {depth}); "
                f"got {prune_layers}."
            )
        if len(aux_heads) != len(prune_layers):
            raise ValueError(
                f"{len(aux_heads)} aux heads for {len(prune_layers)} prune layers: need one head per layer."
            )
        for name, head in [("decode_head", decode_head)] + [(f"aux_heads[{i}]", h) for i, h in enumerate(aux_heads)]:
            if head.in_channels != backbone.embed_dim:
                raise ValueError(
                    f"{name} expects {head.in_channels} input channels but the backbone "
                    f"{backbone.name!r} has width {backbone.embed_dim}."
                )
            if head.num_classes != decode_head.num_classes:
                raise ValueError(f"{name} predicts {head.num_classes} classes, decode head {decode_head.num_classes}.")
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_heads = nn.ModuleList(aux_heads)
        self.prune_layers = prune_layers
        self.pruning = pruning if pruning is not None else DToP(1.0)
        self._dense_macs: dict[tuple[int, int], tuple[float, float, float]] = {}
        self._coefficients: dict[torch.device, Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    @property
    def num_stages(self) -> int:
        return len(self.prune_layers) + 1

    def forward(self, images: Tensor, keep_stages: bool = True) -> SegOutput:
        """``keep_stages=False`` (inference) skips the per-stage maps that only the aux losses need."""
        stream, state, sizes = self.begin(images, keep_stages)
        for stage in range(self.num_stages):
            stream, keep, extra = self.run_stage(stage, stream, state)
            if keep is not None:
                stream = stream.select(keep, extra)
        return self.assemble(state, *sizes)

    def prunes_after(self, stage: int) -> bool:
        """Whether inference may remove tokens after ``stage`` (else its aux head is not even run)."""
        return stage < len(self.aux_heads) and self.pruning.prunes_at(stage, len(self.aux_heads))

    def begin(
        self, images: Tensor, keep_stages: bool, phantom: bool = False, state: RunState | None = None
    ) -> tuple[TokenStream, RunState, tuple[tuple[int, int], tuple[int, int]]]:
        """Embed the images (padded to patch multiples) and start the run's state.

        ``phantom`` adds the padding image of graph replay (:mod:`dtop.models.state`); a given ``state``
        is reset in place.
        Returns the stream, the state and (input size, padded size).
        """
        B, _, H, W = images.shape
        p = self.backbone.patch_size
        Hp, Wp = -(-H // p) * p, -(-W // p) * p
        if (Hp, Wp) != (H, W):
            images = F.pad(images, (0, Wp - W, 0, Hp - H))
        grid = (Hp // p, Wp // p)
        N = grid[0] * grid[1]
        stream = TokenStream.from_dense(self.backbone.embed(images), self.backbone.num_prefix_tokens, phantom)
        if state is None:
            dev, nb, S = images.device, stream.batch_size, self.num_stages
            state = RunState(
                batch_size=nb,
                grid=grid,
                num_classes=self.num_classes,
                num_stages=S,
                canvas=stream.x.new_zeros(nb * N + 1, self.num_classes, dtype=torch.float32),
                exit_stage=torch.full((nb * N + 1,), S - 1, dtype=torch.long, device=dev),
                lengths=torch.zeros(nb, S, dtype=torch.int32, device=dev),
                has_cls=self.backbone.has_cls_token,
                keep_stages=keep_stages,
                phantom=phantom,
            )
        else:
            state.reset()
        C = self.backbone.embed_dim
        state.embed_macs = float(patch_embed_macs(N, p, images.shape[1], C))
        state.embed_macs_mmcv = float(patch_embed_mmcv(N, p, images.shape[1], C))
        return stream, state, ((H, W), (Hp, Wp))

    def run_stage(self, stage: int, stream: TokenStream, state: RunState) -> Decision:
        """One stage: its blocks on the packed stream, then the policy's decision (or, last, the decode head)."""
        state.lengths[:, stage] = stream.cu_seqlens.diff()
        stream = blocks_forward(self.stage_blocks(stage), stream, self.backbone.compile_blocks)
        if stage == self.num_stages - 1:
            self.pruning.finish(stream, self.decode_head, self.backbone.norm, state)
        elif self.training or self.prunes_after(stage):
            return self.pruning.stage_end(stage, len(self.aux_heads), stream, self.aux_heads[stage], state)
        return stream, None, None

    def stage_blocks(self, stage: int) -> nn.ModuleList:
        """The backbone blocks that ``stage`` runs (between two prune layers)."""
        starts, ends = [0] + self.prune_layers, self.prune_layers + [self.backbone.depth]
        return self.backbone.blocks[starts[stage] : ends[stage]]

    def _block_coefficients(self, device: torch.device) -> Tensor:
        """[S, 3] float64: per stage, the blocks' (linear MACs per token, attention MACs per token pair,
        mmcv MACs per token)."""
        if device not in self._coefficients:  # built by the first (eager) run, before any graph capture
            rows = [
                [float(sum(block_coefficients(b)[i] for b in self.stage_blocks(s))) for i in (0, 1)]
                + [float(sum(block_mmcv(b) for b in self.stage_blocks(s)))]
                for s in range(self.num_stages)
            ]
            self._coefficients[device] = torch.tensor(rows, dtype=torch.float64, device=device)
        return self._coefficients[device]

    def _macs(self, state: RunState, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image (macs, macs_linear, macs_mmcv) of the run from its token counts, all stages at once.

        ``tokens`` [B, S]: active patch tokens entering each stage. Blocks cost ``a·n + b·n²`` for
        ``n`` tokens (:func:`~dtop.models.macs.blocks_macs`); heads cost what ``head.macs`` says
        for the tokens they saw (:meth:`RunState.count_head`), and the final norm 2 MACs per element
        of what the decode head saw in the mmcv count (:mod:`dtop.models.macs`).
        """
        B = tokens.shape[0]
        n = state.lengths[:B].to(torch.float64)
        coef = self._block_coefficients(n.device)
        linear, mmcv = [n @ coef[:, 0]], [n @ coef[:, 2]]
        total = [linear[0], (n * n) @ coef[:, 1]]
        const = [state.embed_macs, state.embed_macs, state.embed_macs_mmcv]
        final = 2 * self.backbone.embed_dim * isinstance(self.backbone.norm, nn.LayerNorm)
        for macs in state.policy_macs.values():  # not in mmcv's count, which sees modules only
            const[0] += macs
            const[1] += macs
        for stage, (head, seen) in sorted(state.head_tokens.items()):
            norm = final if stage == self.num_stages - 1 else 0
            if seen == "grid":  # the same for every image: computed on the host
                count = torch.tensor([float(state.num_patches)])
                a, lin = head.macs(count)
                for i, v in enumerate((a, lin, head.macs_mmcv(count) + norm * count)):
                    const[i] += float(v)
                continue
            seen_tokens = n[:, stage] if seen == "stream" else tokens[:, stage]
            a, lin = head.macs(seen_tokens)
            total.append(a)
            linear.append(lin)
            mmcv.append(head.macs_mmcv(seen_tokens) + norm * seen_tokens)
        return tuple(torch.stack(m).sum(0) + c for m, c in zip((total, linear, mmcv), const, strict=True))

    def assemble(self, state: RunState, input_size: tuple[int, int], padded_size: tuple[int, int]) -> SegOutput:
        """Every token's logits as one map per image, plus the run's statistics (real images only)."""
        B, K, S = state.num_images, state.num_classes, state.num_stages
        h, w = state.grid
        N = h * w

        def as_map(flat: Tensor) -> Tensor:
            return flat[: B * N].view(B, h, w, K).permute(0, 3, 1, 2)

        logits = as_map(state.canvas)
        presence = None if state.presence is None else state.presence[:B]
        with torch.no_grad():
            pred = self.decode_head.scores(logits.detach(), presence).argmax(1).view(B, -1)
            exit_stage = state.exit_stage[: B * N].view(B, -1)
            exits = torch.zeros(B, S, dtype=torch.long, device=pred.device)
            exits.scatter_add_(1, exit_stage, torch.ones_like(exit_stage))
            tokens = N - F.pad(exits.cumsum(1)[:, :-1], (1, 0))  # a token leaves after its exit stage
            per_class = torch.zeros(B * S * K, dtype=torch.long, device=pred.device)
            per_class.index_add_(
                0,
                ((torch.arange(B, device=pred.device)[:, None] * S + exit_stage) * K + pred).view(-1),
                torch.ones_like(pred).view(-1),
            )
        stats = {
            "tokens_per_stage": tokens,
            "exits_per_stage": exits,
            "exits_per_class": per_class.view(B, S, K),
            "exit_stage": exit_stage.view(B, h, w),
        }
        stats["macs"], stats["macs_linear"], stats["macs_mmcv"] = self._macs(state, tokens)
        return SegOutput(
            logits=logits,
            presence=presence,
            stage_logits=[as_map(c) for c in state.stage_logits],
            stage_presence=[None if p is None else p[:B] for p in state.stage_presence],
            stats=stats,
            features=None if state.features is None else state.features[: B * N].view(B, N, -1),
            input_size=input_size,
            padded_size=padded_size,
        )

    @contextmanager
    def dense_mode(self) -> Iterator[None]:
        """Temporarily switch pruning off: the same model and heads, every token to the end."""
        before = self.pruning.enabled
        self.pruning.enabled = False
        try:
            yield
        finally:
            self.pruning.enabled = before

    def dense_macs_parts(self, height: int, width: int) -> list[tuple[str, float, float, float]]:
        """(part, macs, macs_linear, macs_mmcv) of the unpruned model at inference for one H×W image.

        Without pruning, inference runs no aux head (they only train), as mmseg's dense models.
        """
        p, C = self.backbone.patch_size, self.backbone.embed_dim
        N = -(-height // p) * (-(-width // p))
        n_all = torch.tensor([N + self.backbone.num_prefix_tokens])
        embed = float(patch_embed_macs(N, p, 3, C))
        parts = [("patch embed", embed, embed, float(patch_embed_mmcv(N, p, 3, C)))]
        parts += [
            (f"block {i + 1} ({int(n_all)} tokens)", *map(float, blocks_macs([b], n_all)), float(n_all) * block_mmcv(b))
            for i, b in enumerate(self.backbone.blocks)
        ]
        if isinstance(self.backbone.norm, nn.LayerNorm):  # mmcv counts it over every token, prefix ones too
            parts.append(("final norm", 0.0, 0.0, float(2 * C * n_all)))
        n = torch.tensor([N])
        head = self.decode_head
        parts.append((f"decode head ({type(head).__name__})", *map(float, head.macs(n)), float(head.macs_mmcv(n))))
        return parts

    def dense_macs(self, height: int, width: int) -> tuple[float, float, float]:
        """Analytic (macs, macs_linear, macs_mmcv) of the unpruned model at inference for one H×W image."""
        key = (height, width)
        if key not in self._dense_macs:  # constant per input size; eval asks once per batch
            parts = self.dense_macs_parts(height, width)
            self._dense_macs[key] = tuple(sum(part[i] for part in parts) for i in (1, 2, 3))
        return self._dense_macs[key]

    def upsampled(self, logits: Tensor, out: SegOutput, size: tuple[int, int] | None = None) -> Upsampled:
        """Token-grid logits → the input's pixels (crop the padding), then optionally to ``size``; factored."""
        return label_op.upsampled(logits, _chains(logits, out, size))

    def upsample(self, logits: Tensor, out: SegOutput, size: tuple[int, int] | None = None) -> Tensor:
        """:meth:`upsampled`, materialised: [B, K, H, W]."""
        return self.upsampled(logits, out, size).dense()

    def scores(self, out: SegOutput, size: tuple[int, int] | None = None) -> Tensor:
        """Per-pixel class scores [B, K, H, W] of an output at ``size`` (or the input size)."""
        return self.decode_head.scores(self.upsample(out.logits, out, size), out.presence)

    def labels(self, out: SegOutput, size: tuple[int, int] | None = None) -> Tensor:
        """Per-pixel classes [B, H, W] at ``size`` (or the input size): the argmax of :meth:`scores`,
        without forming the score maps where a kernel can (:mod:`dtop.ops.labels`)."""
        head = self.decode_head
        return label_op.labels(out.logits, out.presence, head.scores, head.scoring_rule, _chains(out.logits, out, size))

    def predict(self, images: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, SegOutput]:
        """Per-pixel class scores [B, K, H, W] (at ``size`` or the input size) and the raw output."""
        out = self(images, keep_stages=False)
        return self.scores(out, size), out

    def segment(self, images: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, SegOutput]:
        """Per-pixel classes [B, H, W] (at ``size`` or the input size) and the raw output."""
        out = self(images, keep_stages=False)
        return self.labels(out, size), out
