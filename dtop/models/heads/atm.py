"""ATM (attention-to-mask) head, DToP's query-matching auxiliary block (DToP Sec. 3.3, SegViT's ATM).

One learnable query per class goes through ``num_layers`` transformer-decoder layers: self-attention
among the K queries, cross-attention from the queries to the image's tokens, FFN. The layers are
**post-norm** (``x = norm(x + sublayer(x))``, ReLU FFN), as SegViT's ``TPN_DecoderLayer`` (a
``torch.nn.TransformerDecoderLayer`` with its default ``norm_first=False``), so SegViT/DToP weights
map one to one. The tokens (memory) are ``LayerNorm(Linear(in_channels, dim)(x))`` — SegViT's
``input_proj`` + ``proj_norm`` — and every layer projects that same memory to its own keys/values.

Outputs per token, which is what the DToP canvas stores:

- mask logit of class c at token t = the cross-attention similarity ``q_c · k_t / sqrt(d_head)``
  *before* the softmax, averaged over heads, of the **last** decoder layer (SegViT's prediction; the
  earlier layers' similarities are available through :meth:`ATMHead.forward_layers` for optional deep
  supervision, which nothing uses by default);
- class presence: DToP's binary variant, ``Linear(dim, 1)`` on each output query → [B, K] logits.

Score of class c at a pixel = ``sigmoid(presence_c) · sigmoid(mask logit_c)``. Cross-attention is
per image and vectorised over the batch: keys/values are computed on the packed stream, padded to
[B, L, ·] (a plain reshape when every image has the same token count) and the padding is masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtop.losses import dice_loss, presence_loss, sigmoid_focal_loss
from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.packed import TokenStream
from dtop.ops.resize import Upsampled, dense


class ATMDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention → query-to-token cross-attention → FFN."""

    def __init__(self, dim: int, num_heads: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ATM width {dim} is not divisible by {num_heads} heads.")
        self.dim, self.num_heads, self.head_dim, self.hidden = dim, num_heads, dim // num_heads, hidden
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        # query self-attention
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        # cross-attention (queries → image tokens)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        # FFN
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, mem: Tensor, stream: TokenStream) -> tuple[Tensor, Tensor]:
        """``tgt`` [B, K, dim] queries, ``mem`` [T, dim] packed tokens → (queries, similarity [B, K, L]).

        The similarity is over the padded layout of :func:`_pad` (columns past an image's token
        count are meaningless).
        """
        B, K, d = tgt.shape
        H, D = self.num_heads, self.head_dim
        p = self.dropout if self.training else 0.0

        q, k, v = self.self_qkv(tgt).view(B, K, 3, H, D).permute(2, 0, 3, 1, 4)
        sa = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, K, d)
        tgt = self.norm1(tgt + self.drop(self.self_proj(sa)))

        q = self.q(tgt).view(B, K, H, D).transpose(1, 2)  # [B, H, K, D]
        kv, valid = _pad(self.kv(mem), stream)  # [B, L, 2d], [B, L] | None
        k, v = kv.view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)  # [B, H, L, D] each
        sim = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B, H, K, L]
        logits = sim if valid is None else sim.masked_fill(~valid[:, None, None, :], torch.finfo(sim.dtype).min)
        attn = F.dropout(logits.softmax(-1), p, self.training)
        ca = torch.matmul(attn, v).transpose(1, 2).reshape(B, K, d)
        tgt = self.norm2(tgt + self.drop(self.proj(ca)))

        tgt = self.norm3(tgt + self.drop(self.fc2(self.drop(F.relu(self.fc1(tgt))))))
        return tgt, sim.mean(1)

    def macs(self, n: Tensor, num_queries: int) -> tuple[Tensor, Tensor]:
        K, d, h = num_queries, self.dim, self.hidden
        n = n.to(torch.float64)
        linear_q = K * (d * 3 * d + d * d + d * d + d * d + d * h + h * d)  # self qkv, self proj, q, proj, FFN
        linear = n * (d * 2 * d) + linear_q  # + k, v of the n tokens
        attn = 2 * K * K * d + 2 * K * n * d  # self QKᵀ + AV; cross QKᵀ + AV
        return linear + attn, linear


def _pad(t: Tensor, stream: TokenStream) -> tuple[Tensor, Tensor | None]:
    """Packed [T, C] → [B, L, C] (+ validity mask, or None when the segments are all full)."""
    B = stream.batch_size
    if stream.uniform and t.shape[0] == B * stream.max_len:
        return t.view(B, stream.max_len, t.shape[-1]), None
    return stream.pad(t)


def _unpad(t: Tensor, stream: TokenStream) -> Tensor:
    """[B, L, C] → packed [T, C] (inverse of :func:`_pad`)."""
    B = stream.batch_size
    if stream.uniform and stream.batch.shape[0] == B * stream.max_len and t.shape[1] == stream.max_len:
        return t.reshape(B * stream.max_len, t.shape[-1])
    return stream.unpad(t)


class ATMHead(SegHead):
    """Per-class queries decoding an image's tokens; mask logits per token + class presence per image.

    ``dim`` defaults to ``in_channels // 2`` (ViT-B 768 → 384, ViT-L 1024 → 512) and ``num_heads``
    to ``dim // 64`` (6 and 8). ``dropout`` is used for attention probabilities, residual branches
    and the FFN (SegViT trains with 0.1; the default 0 keeps evaluation deterministic).
    """

    grading = "sigmoid"  # a token's class score: its mask sigmoid times the class presence sigmoid

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dim: int | None = None,
        num_heads: int | None = None,
        num_layers: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        mask_loss_pixels: str = "labelled",
    ) -> None:
        super().__init__()
        if mask_loss_pixels not in ("labelled", "all"):
            raise ValueError(f"mask_loss_pixels must be 'labelled' or 'all'; got {mask_loss_pixels!r}.")
        self.mask_loss_pixels = mask_loss_pixels
        dim = in_channels // 2 if dim is None else dim
        num_heads = max(dim // 64, 1) if num_heads is None else num_heads
        if num_layers < 1:
            raise ValueError(f"ATMHead needs at least one decoder layer; got num_layers={num_layers}.")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.dim, self.num_heads, self.num_layers = dim, num_heads, num_layers
        self.input_proj = nn.Linear(in_channels, dim)
        self.proj_norm = nn.LayerNorm(dim)
        self.query = nn.Embedding(num_classes, dim)
        self.layers = nn.ModuleList(
            ATMDecoderLayer(dim, num_heads, int(dim * mlp_ratio), dropout) for _ in range(num_layers)
        )
        self.presence_embed = nn.Linear(dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SegViT's init: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_layers(self, x: Tensor, stream: TokenStream) -> list[HeadOutput]:
        """Outputs after every decoder layer (the last one is :meth:`forward`'s), for deep supervision."""
        return self._decode(x, stream, all_layers=True)

    def forward(self, x: Tensor, stream: TokenStream) -> HeadOutput:
        return self._decode(x, stream, all_layers=False)[-1]

    def _decode(self, x: Tensor, stream: TokenStream, all_layers: bool) -> list[HeadOutput]:
        mem = self.proj_norm(self.input_proj(x))
        tgt = self.query.weight.to(mem.dtype).unsqueeze(0).expand(stream.batch_size, -1, -1)
        outs = []
        for i, layer in enumerate(self.layers):
            tgt, sim = layer(tgt, mem, stream)
            if all_layers or i == len(self.layers) - 1:
                logits = _unpad(sim.transpose(1, 2), stream)  # [T, K]
                outs.append(HeadOutput(logits, self.presence_embed(tgt).squeeze(-1)))
        return outs

    def loss(
        self,
        logits: Tensor | Upsampled,
        presence: Tensor | None,
        target: Tensor,
        ignore_index: int = 255,
        presence_weight: float = 1.0,
        absent_weight: float = 0.1,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
    ) -> dict[str, Tensor]:
        """SegViT/mmseg-style terms with query c ↔ class c fixed (no Hungarian matching).

        - ``presence``: BCE-with-logits against "class occurs among the image's labelled pixels",
          absent terms weighted ``absent_weight``, normalised by the total weight (as DETR/SegViT's
          ``eos_coef``-weighted classification loss);
        - ``focal`` (α 0.25, γ 2) and ``dice`` on the masks of the classes **present** in each image
          only, over its labelled pixels (``mask_loss_pixels="all"``: over every pixel of the crop,
          unlabelled ones as negatives, as the official DToP/SegViT code): each mask's focal loss is its
          mean over those pixels, and both terms are summed over the (image, present class) masks and
          divided by their number (DETR's ``num_masks``). Absent classes are supervised only through
          the presence loss.
        """
        logits = dense(logits)
        B, K = logits.shape[:2]
        valid = (target != ignore_index).flatten(1)  # [B, P]
        labels = torch.where(valid, target.flatten(1).long(), K)  # K = "unlabelled"
        counts = torch.zeros(B, K + 1, dtype=torch.long, device=labels.device)
        present = counts.scatter_add_(1, labels, torch.ones_like(labels))[:, :K] > 0  # [B, K]
        out = {}
        if presence is not None:
            out["presence"] = presence_weight * presence_loss(presence, present, absent_weight)
        b, c = present.nonzero(as_tuple=True)
        masks = logits.flatten(2)[b, c]  # [M, P] masks of the present (image, class) pairs
        tgt = labels[b] == c[:, None]
        pix = valid[b] if self.mask_loss_pixels == "labelled" else None
        num_masks = max(int(b.numel()), 1)
        out["focal"] = focal_weight * sigmoid_focal_loss(masks, tgt, pix).sum() / num_masks
        out["dice"] = dice_weight * dice_loss(masks, tgt, pix).sum() / num_masks
        return out

    def macs(self, n: Tensor) -> tuple[Tensor, Tensor]:
        K, d = self.num_classes, self.dim
        n = n.to(torch.float64)
        linear = n * (self.in_channels * d) + K * d  # input projection, presence classifier
        total = linear.clone()
        for layer in self.layers:
            a, lin = layer.macs(n, K)
            total, linear = total + a, linear + lin
        return total, linear

    def macs_mmcv(self, n: Tensor) -> Tensor:
        """The linears and LayerNorms (the input's, and three per layer on the K queries)."""
        n = n.to(torch.float64)
        return self.macs(n)[1] + 2 * self.dim * (n + 3 * self.num_layers * self.num_classes)
