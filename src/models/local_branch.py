"""AlignedReID local branch (Zhang et al., "AlignedReID", arXiv 1711.08184, 2017)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LocalBranch"]


class LocalBranch(nn.Module):
    """Horizontal-stripe local features for AlignedReID's shortest-path local distance.

    Each row of the last feature map is one horizontal stripe: the row is pooled across the width
    (max pooling as in the AlignedReID paper; ``pool="avg"`` gives the mean used by the
    huanghoujing re-production), then a 1x1 conv reduces C to ``local_dim`` (128 in the paper),
    followed by BN and ReLU. The conv has no bias because BN follows it.

    Args:
        in_channels: C of the feature map.
        local_dim: d, channels of each local feature.
        pool: ``"max"`` or ``"avg"`` across the width.

    Shape:
        ``(N, C, h, w) -> (N, h, local_dim)``: m = h stripes, ordered top to bottom.
    """

    def __init__(self, in_channels: int, local_dim: int = 128, pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"Unknown local pooling {pool!r}; expected 'max' or 'avg'.")
        self.pool = pool
        self.conv = nn.Conv2d(in_channels, local_dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(local_dim)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, feature_map: Tensor) -> Tensor:
        if self.pool == "max":
            stripes = feature_map.amax(dim=3, keepdim=True)  # (N, C, h, 1)
        else:
            stripes = feature_map.mean(dim=3, keepdim=True)
        local = self.relu(self.bn(self.conv(stripes)))  # (N, d, h, 1)
        return local.squeeze(3).transpose(1, 2)  # (N, h, d)
