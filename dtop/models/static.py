"""Fixed-shape inference, for graph formats such as ONNX: the dense model, and pruning at a static capacity.

The engine prunes every token whose confidence passes ξ, a number of tokens that depends on the image,
which no fixed-shape graph can hold. :class:`StaticSegmentor` keeps instead a fixed number ``C_s`` of
patch tokens per image after each pruning stage: the ``C_s`` *least* confident of those still active
(one ``topk`` of constant size); every shape is then known when the graph is built. The tokens that
leave do what the model's policy does with leaving tokens:

- **DToP** (exit): their aux-head logits are written into the output map and they run no later layer.
  No per-class top-k context is kept (the kept tokens are the hard ones only), and no ξ is applied: a
  token stays if it is among the ``C_s`` least confident, however confident it is.
- **DoViT** (stop): they keep their features; the aux heads and the decode head see the full map
  rebuilt from the active and the stopped tokens, and the cls token absorbs the stopped tokens' mean
  (Eq. 8) where their share exceeds ``agg_rate`` (a constant here). ``diff_conf`` is not applied.

Given one image and the per-stage token counts the engine kept for it, a DoViT model here makes the
engine's very decisions (its stopped tokens are exactly the most confident ones), which the tests check.
Without capacities the module is the dense model (no aux head runs), as ``Segmentor.dense_mode``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtop.errors import ConfigError
from dtop.models.engine import Segmentor
from dtop.models.heads.fcn import FCNHead
from dtop.models.policies import DoViT, DToP
from dtop.models.vit import _patch_embed
from dtop.ops.resize import resize_operator

OUTPUT_NAMES = ("logits", "labels", "exit_stage")


def capacity_tokens(ratios: Sequence[float], num_patches: int) -> list[int]:
    """Patch tokens kept per image after each pruning stage: ⌈ratio · N⌉, never more than the stage before."""
    counts: list[int] = []
    for r in ratios:
        if not 0.0 < float(r) <= 1.0:
            raise ConfigError(f"capacity ratios must lie in (0, 1] (a share of the patch tokens); got {list(ratios)}.")
        counts.append(min(math.ceil(float(r) * num_patches), counts[-1] if counts else num_patches))
    return counts


class StaticSegmentor(nn.Module):
    """A :class:`Segmentor`'s inference at one input size with fixed shapes (see the module docstring).

    ``capacity``: patch tokens per image still active after each pruning stage (one per aux head,
    non-increasing), None for the dense model. The forward takes normalised images [B, 3, H, W] at
    ``input_size`` and returns token-grid ``logits`` [B, K, h, w] (float32), pixel ``labels`` [B, H, W]
    and the ``exit_stage`` [B, h, w] of every token (the last stage: it reached the decode head).
    """

    def __init__(self, model: Segmentor, input_size: Sequence[int], capacity: Sequence[int] | None = None) -> None:
        super().__init__()
        heads = [model.decode_head, *(model.aux_heads if capacity is not None else [])]
        if not all(type(h) is FCNHead for h in heads):
            raise ConfigError(
                f"Fixed-shape export supports FCN / SETR-naive heads (per-token); this model has "
                f"{sorted({type(h).__name__ for h in heads})}."
            )
        if capacity is not None and not isinstance(model.pruning, (DToP, DoViT)):
            raise ConfigError(f"Fixed-capacity pruning knows DToP and DoViT; not {type(model.pruning).__name__}.")
        self.model = model
        self.stop = isinstance(model.pruning, DoViT)
        H, W = int(input_size[0]), int(input_size[1])
        p, bb = model.backbone.patch_size, model.backbone
        Hp, Wp = -(-H // p) * p, -(-W // p) * p
        self.input_size, self.padded_size, self.grid = (H, W), (Hp, Wp), (Hp // p, Wp // p)
        N = self.grid[0] * self.grid[1]
        capacity = list(capacity) if capacity is not None else []
        if capacity and (
            len(capacity) != len(model.aux_heads)
            or any(not 1 <= c <= N for c in capacity)
            or any(b > a for a, b in zip(capacity, capacity[1:]))
        ):
            raise ConfigError(
                f"capacity needs one token count per pruning stage ({len(model.aux_heads)}), non-increasing, "
                f"in [1, {N}] for a {H}×{W} input; got {capacity}."
            )
        self.capacity = capacity
        param = next(model.parameters())
        with torch.no_grad():  # prefix tokens and position embedding at this grid: one constant
            base = bb.vit._pos_embed(param.new_zeros(1, *self.grid, bb.embed_dim))
        self.register_buffer("base", base, persistent=False)
        for name, (grid, padded, size) in zip(("rows", "cols"), zip(self.grid, (Hp, Wp), (H, W))):
            op = resize_operator(grid, padded, size, None, torch.device("cpu"))
            self.register_buffer(name, torch.eye(grid) if op is None else op.clone(), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model, bb = self.model, self.model.backbone
        B, (H, W), (Hp, Wp) = images.shape[0], self.input_size, self.padded_size
        N, K, P, S = self.grid[0] * self.grid[1], model.num_classes, bb.num_prefix_tokens, model.num_stages
        images = F.pad(images, (0, Wp - W, 0, Hp - H)) if (Hp, Wp) != (H, W) else images
        patches = _patch_embed(bb.vit.patch_embed, images).reshape(B, N, -1)
        x = bb.vit.norm_pre(self.base + F.pad(patches, (0, 0, P, 0)))
        idx = torch.arange(N, device=images.device).expand(B, N)  # grid position of each active patch token
        canvas = images.new_zeros(B, N, K, dtype=torch.float32)
        exit_stage = torch.full((B, N), S - 1, dtype=torch.long, device=images.device)
        full = x[:, P:] if self.stop else None  # DoViT's reconstructed map
        for stage in range(S):
            for block in model.stage_blocks(stage):
                x = block(x)
            if stage < S - 1 and self.capacity:
                keep = self.capacity[stage]
                if self.stop and keep < N:
                    x, idx, full, exit_stage = self._stop(stage, keep, x, idx, full, exit_stage)
                elif not self.stop and keep < x.shape[1] - P:
                    x, idx, canvas, exit_stage = self._exit(stage, keep, x, idx, canvas, exit_stage)
        tokens = x[:, P:]
        if self.stop:
            full = full.scatter(1, _expand(idx, full), tokens)
            canvas = self._head(model.decode_head, bb.norm(full))
        else:
            canvas = canvas.scatter(1, _expand(idx, canvas), self._head(model.decode_head, bb.norm(tokens)))
        logits = canvas.transpose(1, 2).reshape(B, K, *self.grid)
        labels = torch.matmul(torch.matmul(self.rows, logits), self.cols.T).argmax(1)
        return logits, labels, exit_stage.view(B, *self.grid)

    @staticmethod
    def _head(head: nn.Module, tokens: Tensor) -> Tensor:
        """A per-token head on [B, n, C] tokens: float32 logits [B, n, K]."""
        B, n, C = tokens.shape
        return head(tokens.reshape(B * n, C), None).logits.float().view(B, n, -1)

    @staticmethod
    def _order(conf: Tensor, keep: int) -> tuple[Tensor, Tensor]:
        """(the ``keep`` least confident, in grid order; the others), as indices into ``conf``'s last axis."""
        order = torch.topk(conf, conf.shape[1], dim=1, largest=False, sorted=True).indices
        return order[:, :keep].sort(dim=1).values, order[:, keep:]

    def _exit(
        self, stage: int, keep: int, x: Tensor, idx: Tensor, canvas: Tensor, exit_stage: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """DToP: the aux head grades the active tokens; all but the ``keep`` least confident exit with its logits."""
        P = self.model.backbone.num_prefix_tokens
        tokens = x[:, P:]
        logits = self._head(self.model.aux_heads[stage], tokens)
        kept, gone = self._order(logits.softmax(-1).amax(-1), keep)
        gone_pos = idx.gather(1, gone)
        canvas = canvas.scatter(1, _expand(gone_pos, canvas), logits.gather(1, _expand(gone, logits)))
        exit_stage = exit_stage.scatter(1, gone_pos, stage)
        x = torch.cat([x[:, :P], tokens.gather(1, _expand(kept, tokens))], 1)
        return x, idx.gather(1, kept), canvas, exit_stage

    def _stop(
        self, stage: int, keep: int, x: Tensor, idx: Tensor, full: Tensor, exit_stage: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """DoViT: the aux head grades the rebuilt map; all active tokens but the ``keep`` least confident stop."""
        policy: DoViT = self.model.pruning  # type: ignore[assignment]
        bb, (h, w) = self.model.backbone, self.grid
        B, N, P = x.shape[0], h * w, bb.num_prefix_tokens
        tokens = x[:, P:]
        full = full.scatter(1, _expand(idx, full), tokens)
        logits = self._head(self.model.aux_heads[stage], full)
        if policy.grade_upsample == 1:
            conf = logits.softmax(-1).amax(-1)
        else:  # the mean over each token's sub-pixels of the upsampled map's top probability
            u, grid = policy.grade_upsample, logits.transpose(1, 2).reshape(B, -1, h, w)
            top = F.interpolate(grid, scale_factor=u, mode="bilinear", align_corners=False).softmax(1).amax(1)
            conf = F.avg_pool2d(top[:, None], u).reshape(B, N)
        kept, gone = self._order(conf.gather(1, idx), keep)
        exit_stage = exit_stage.scatter(1, idx.gather(1, gone), stage)
        idx = idx.gather(1, kept)
        prefix = x[:, :P]
        if policy.merge_cls and bb.has_cls_token and (N - keep) / N > policy.agg_rate:  # Eq. 8, a constant test
            stopped = torch.ones_like(full[..., 0]).scatter(1, idx, 0.0)
            mean = (full * stopped[..., None]).sum(1) / (N - keep)
            prefix = torch.cat([(0.5 * (prefix[:, 0] + mean))[:, None], prefix[:, 1:]], 1)
        return torch.cat([prefix, tokens.gather(1, _expand(kept, tokens))], 1), idx, full, exit_stage


def _expand(index: Tensor, like: Tensor) -> Tensor:
    """[B, n] token indices as gather/scatter indices over ``like``'s last axis [B, n, C]."""
    return index[..., None].expand(-1, -1, like.shape[-1])


def export_onnx(module: StaticSegmentor, path: str | Path, batch_size: int = 1, opset: int = 18) -> Path:
    """Write ``module`` as an ONNX graph with a fixed [batch_size, 3, H, W] input ``images`` and the outputs
    :data:`OUTPUT_NAMES`, through torch.export (``torch.onnx.export(dynamo=True)``, which needs onnxscript)."""
    if opset < 17:
        raise ConfigError(f"opset must be ≥ 17 (LayerNormalization); got {opset}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(module.parameters())
    images = torch.zeros(batch_size, 3, *module.input_size, dtype=param.dtype, device=param.device)
    large = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > 1.8 * 2**30
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]  # INFO lines for every rewrite
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            module.eval(),
            (images,),
            str(path),
            input_names=["images"],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            external_data=large,  # one self-contained file below protobuf's 2 GiB limit
            verbose=False,
        )
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
    return path
