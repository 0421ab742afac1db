"""Heads on top of the pooled feature: BNNeck and identity classifiers."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BNNeck", "build_classifier", "init_classifier"]


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
