"""SETR-naive / FCN heads, applied per token.

SETR-naive (mmseg ``SETRUPHead``, num_convs=1, kernel 1): LN → 1×1 conv → BN → ReLU → bilinear ×4 →
1×1 classifier → resize to the input. Every operation before the upsampling is per token, and a 1×1
classifier commutes with bilinear upsampling (the interpolation weights sum to one), so the head is
exactly a per-token MLP whose logits are upsampled afterwards. That is what lets exited tokens keep
their logits while the rest of the map is still computing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dtop.models.heads.base import HeadOutput, SegHead
from dtop.models.packed import TokenStream


class FCNHead(SegHead):
    """Per-token FCN head; ``channels=None`` gives DoViT's single 1×1-conv classifier.

    ``classifier_scale``: where the mirrored mmseg head applies its classifier, in output pixels per
    token side (SETR-naive: 4, after its ×4 upsampling). Ours runs it per token — the same logits,
    since a 1×1 classifier commutes with bilinear upsampling — so it only changes ``macs_mmcv``,
    the count that follows the papers' architecture.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int | None = 256,
        input_norm: bool = True,
        dropout: float = 0.0,
        classifier_scale: int = 1,
    ) -> None:
        super().__init__()
        self.classifier_scale = int(classifier_scale)
        self.in_channels, self.num_classes, self.channels = in_channels, num_classes, channels
        self.norm = nn.LayerNorm(in_channels, eps=1e-6) if input_norm else nn.Identity()
        if channels is None:
            self.conv = nn.Identity()
            width = in_channels
        else:
            self.conv = nn.Sequential(
                nn.Linear(in_channels, channels, bias=False), nn.BatchNorm1d(channels), nn.ReLU(inplace=True)
            )
            width = channels
        self.dropout = nn.Dropout(dropout)
        self.cls = nn.Linear(width, num_classes)

    @property
    def token_local(self) -> bool:
        return not self.training  # training BatchNorm pools statistics over the tokens it sees

    def forward(self, x: Tensor, stream: TokenStream) -> HeadOutput:
        return HeadOutput(self.cls(self.dropout(self.conv(self.norm(x)))))

    def macs(self, n: Tensor) -> tuple[Tensor, Tensor]:
        per_token = (
            self.in_channels * self.channels + self.channels * self.num_classes
            if self.channels is not None
            else self.in_channels * self.num_classes
        )
        m = n.to(torch.float64) * per_token
        return m, m

    def macs_mmcv(self, n: Tensor) -> Tensor:
        """LayerNorm, 1×1 conv (no bias before its BatchNorm), ReLU, and the classifier with its bias on
        ``classifier_scale``² pixels per token (mmcv does not count BatchNorm: SyncBN in mmseg)."""
        n = n.to(torch.float64)
        width = self.in_channels if self.channels is None else self.channels
        per_token = 2 * self.in_channels * isinstance(self.norm, nn.LayerNorm)
        if self.channels is not None:
            per_token += self.in_channels * self.channels + self.channels
        return n * (per_token + self.classifier_scale**2 * (width * self.num_classes + self.num_classes))
