"""Segmenter's mask-transformer decode head (Strudel et al. 2021; mmseg ``SegmenterMaskTransformerHead``).

Per image: the tokens are projected to ``d_model`` (``proj_dec``), K learnable class embeddings are
appended, ``num_layers`` pre-norm transformer layers run on the joint [tokens + K class tokens]
sequence, then ``decoder_norm``; patches and class embeddings are projected (``proj_patch``,
``proj_classes``, Linear d→d without bias), L2-normalised, and the masks are their scalar products
(``patches @ classes^T``), normalised over the classes by ``mask_norm`` (LayerNorm(K)). The result
is one logit per (token, class), so the head fits the shared per-token interface.

Packed streams: each image's segment becomes [its tokens, its K class tokens] in one joint
:class:`~dtop.models.packed.TokenStream`, built without a host sync, and the layers (timm ``Block``,
weights named as timm's) run through :func:`~dtop.models.blocks.block_forward`, i.e. attention
stays within each image. With DToP the class tokens therefore attend only to the image's tokens that
are still active; with DoViT the head sees the full reconstructed map.

Weights: names follow the official Segmenter (``proj_dec``, ``cls_emb``, ``blocks``,
``decoder_norm``, ``proj_patch``, ``proj_classes``, ``mask_norm``); the official ``proj_patch`` /
``proj_classes`` are raw [d, d] matrices applied as ``x @ P``, i.e. the transpose of our Linear
weights. Norms are ``nn.LayerNorm`` (eps 1e-5) as in both reference implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dtop.models.blocks import block_forward
from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.macs import block_mmcv, blocks_macs
from dtop.models.packed import TokenStream


def _per_image(t: Tensor, stream: TokenStream) -> tuple[Tensor, bool]:
    """Packed [T, C] → [B, L, C]; ``True`` when that was a plain view (all segments full)."""
    B = stream.batch_size
    if stream.uniform and t.shape[0] == B * stream.max_len:
        return t.view(B, stream.max_len, t.shape[-1]), True
    return stream.pad(t)[0], False


class SegmenterHead(SegHead):
    """Mask transformer: per-token logits [T, K] from class-embedding/patch similarity.

    ``d_model`` defaults to ``in_channels`` and ``num_heads`` to ``d_model // 64`` (Segmenter's
    ViT-S/B/L settings); ``mlp_ratio`` 4. ``input_norm`` adds a LayerNorm on the input tokens (off:
    the engine already applies the backbone's final norm before the decode head; turn it on when the
    head grades raw features as an aux head).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        d_model: int | None = None,
        num_heads: int | None = None,
        num_layers: int = 2,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        d = in_channels if d_model is None else int(d_model)
        heads = max(d // 64, 1) if num_heads is None else int(num_heads)
        if num_layers < 1:
            raise ValueError(f"SegmenterHead needs at least one transformer layer; got num_layers={num_layers}.")
        if d % heads:
            raise ValueError(f"SegmenterHead width d_model={d} is not divisible by num_heads={heads}.")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.d_model, self.num_heads, self.num_layers = d, heads, num_layers
        self.norm = nn.LayerNorm(in_channels, eps=1e-6) if input_norm else nn.Identity()
        self.proj_dec = nn.Linear(in_channels, d)
        self.cls_emb = nn.Parameter(torch.zeros(num_classes, d))
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList(
            Block(
                d,
                heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=dropout,
                drop_path=rate,
                norm_layer=nn.LayerNorm,
            )
            for rate in rates
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.proj_patch = nn.Linear(d, d, bias=False)
        self.proj_classes = nn.Linear(d, d, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Segmenter/mmseg init: trunc-normal (std 0.02) linears and class embeddings, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def joint_stream(self, x: Tensor, stream: TokenStream) -> tuple[TokenStream, Tensor, Tensor]:
        """[tokens, K class tokens] per image; returns the stream and both groups' indices in it.

        Relies on the stream invariant that segments are contiguous and in image order, so token
        ``t`` of image ``b`` moves to ``t + K·b`` and image ``b``'s class tokens fill the last K
        slots of its new segment.
        """
        T, d = x.shape
        B, K = stream.batch_size, self.num_classes
        dev = x.device
        cu = stream.cu_seqlens + K * torch.arange(B + 1, device=dev, dtype=stream.cu_seqlens.dtype)
        tok_idx = torch.arange(T, device=dev) + K * stream.batch
        cls_idx = (cu[1:, None].long() - K + torch.arange(K, device=dev)).reshape(-1)
        src = torch.empty(T + B * K, dtype=torch.long, device=dev)
        src[tok_idx] = torch.arange(T, device=dev)
        src[cls_idx] = T + torch.arange(B * K, device=dev)
        cls = self.cls_emb.to(x.dtype).expand(B, K, d).reshape(B * K, d)
        img = torch.arange(B, device=dev).repeat_interleave(K)
        joint = TokenStream(
            x=torch.cat([x, cls])[src],
            batch=torch.cat([stream.batch, img])[src],
            pos=torch.cat([stream.pos, torch.full_like(img, -1)])[src],
            cu_seqlens=cu,
            max_len=stream.max_len + K,
            batch_size=B,
            num_special=stream.num_special + B * K,
            uniform=stream.uniform,
            fixed=stream.fixed,
        )
        return joint, tok_idx, cls_idx

    def forward(self, x: Tensor, stream: TokenStream) -> HeadOutput:
        B, K = stream.batch_size, self.num_classes
        joint, tok_idx, cls_idx = self.joint_stream(self.proj_dec(self.norm(x)), stream)
        for block in self.blocks:
            joint = joint.with_x(block_forward(block, joint.x, joint))
        y = self.decoder_norm(joint.x)
        patches = F.normalize(self.proj_patch(y[tok_idx]), dim=-1)  # [T, d]
        classes = F.normalize(self.proj_classes(y[cls_idx]), dim=-1).view(B, K, -1)  # [B, K, d]
        per_image, plain = _per_image(patches, stream)  # [B, L, d]
        masks = torch.bmm(per_image, classes.transpose(1, 2))  # [B, L, K]
        masks = masks.reshape(-1, K) if plain else stream.unpad(masks)
        return HeadOutput(self.mask_norm(masks))

    def macs(self, n: Tensor) -> tuple[Tensor, Tensor]:
        """(all, linear) MACs for ``n`` tokens per image.

        Linear: proj_dec (n·C·d), the transformer layers on n + K tokens, proj_patch (n·d²),
        proj_classes (K·d²) and the mask matmul (n·K·d; a matmul, not attention, so it is in both
        conventions). All adds the layers' attention matmuls over n + K tokens. Norms, GELU and the
        L2 normalisation are not counted (as in :mod:`dtop.models.macs`).
        """
        K, d = self.num_classes, self.d_model
        n = n.to(torch.float64)
        linear = n * (self.in_channels * d + d * d + K * d) + K * d * d
        a, lin = blocks_macs(self.blocks, n + K)
        return linear + a, linear + lin

    def macs_mmcv(self, n: Tensor) -> Tensor:
        """The linears (with biases where they have them) and LayerNorms, not the mask matmul."""
        K, d, C = self.num_classes, self.d_model, self.in_channels
        n = n.to(torch.float64)
        linear = n * (C * d + d + d * d) + K * d * d  # proj_dec (bias), proj_patch, proj_classes
        norms = 2 * (n * C * isinstance(self.norm, nn.LayerNorm) + (n + K) * d + n * K)  # input, decoder, mask norm
        blocks = (n + K) * sum(block_mmcv(b) for b in self.blocks)
        return linear + norms + blocks
