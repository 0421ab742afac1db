"""Heads on top of the pooled feature: BNNeck, the TriNet embedding head and identity
classifiers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BNNeck", "EmbeddingHead", "build_classifier", "init_classifier"]


class BNNeck(nn.Module):
    """BatchNorm1d "bottleneck" of the strong baseline (Luo et al., "Bag of Tricks", CVPRW 2019).

    The triplet loss is applied to the feature before this BN and the ID (CE) loss to a classifier
    after it. The BN shift is fixed at 0 (``bias.requires_grad = False``) as in the reference code,
    so the normalised features stay centred; BN weight starts at 1 (its ``weights_init_kaiming``).

    Args:
        dim: feature dimension D.

    Shape:
        ``(N, D) -> (N, D)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


class EmbeddingHead(nn.Module):
    """TriNet's embedding head (Hermans et al. 2017, §4 "TriNet"; triplet-reid
    ``heads/fc1024.py``): for every hidden width a bias-free Linear -> BatchNorm1d -> ReLU, then a
    Linear to the embedding (``dims=(1024, 128)``: 2048 -> 1024-BN-ReLU -> 128).

    Initialisation as the original (TF-slim): hidden Linear weights Glorot-uniform, BN weight 1
    and shift 0 (momentum 0.1 = TF decay 0.9, eps 1e-5), final Linear orthogonal with zero bias.

    Args:
        in_dim: D, the pooled feature dimension.
        dims: hidden widths then the embedding dimension (at least one value).

    Shape:
        ``(N, in_dim) -> (N, dims[-1])``.
    """

    def __init__(self, in_dim: int, dims: Sequence[int]) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims or min(dims) < 1:
            raise ValueError(f"model.head_dims needs positive widths, got {dims}")
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in dims[:-1]:
            linear = nn.Linear(width, hidden, bias=False)
            nn.init.xavier_uniform_(linear.weight)
            layers += [linear, nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1), nn.ReLU(True)]
            width = hidden
        out = nn.Linear(width, dims[-1])
        nn.init.orthogonal_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.layers = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def init_classifier(linear: nn.Linear, std: float = 0.001) -> nn.Linear:
    """Normal(0, std) weights and zero bias (``weights_init_classifier`` of Bag of Tricks,
    also AlignedReID's classifier init)."""
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def build_classifier(in_dim: int, num_classes: int, bias: bool = False) -> nn.Linear:
    """Identity classifier ``Linear(in_dim, num_classes)``.

    Bag of Tricks uses ``bias=False`` after BNNeck. MAR uses a bias-free Linear whose weight rows
    (``num_classes x in_dim``) are the reference agents. Initialised by :func:`init_classifier`.

    Shape:
        ``(N, in_dim) -> (N, num_classes)``.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0 for a classifier, got {num_classes}.")
    return init_classifier(nn.Linear(in_dim, num_classes, bias=bias))
