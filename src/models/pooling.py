"""Global pooling of a feature map ``(N, C, h, w)`` into a vector ``(N, C)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GeneralizedMeanPooling", "GlobalAvgPool", "build_pooling"]


class GlobalAvgPool(nn.Module):
    """Global average pooling: ``(N, C, h, w) -> (N, C)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class GeneralizedMeanPooling(nn.Module):
    """Generalized-mean (GeM) pooling (Radenovic et al., TPAMI 2018), used in re-ID by FastReID.

    ``y_c = (mean_{i,j} clamp(x_cij, min=eps)^p)^(1/p)``: ``p = 1`` is average pooling on positive
    inputs and ``p -> inf`` tends to max pooling. Inputs are clamped to ``eps`` because a
    fractional power of a negative number is undefined, so GeM treats negative activations (e.g.
    from a backbone with ``last_relu=False``) as ``eps``.

    Computed in fp32 (``x^p`` overflows fp16 for ``p >= 3`` and moderate activations).

    Args:
        p: initial exponent (3.0 in Radenovic et al.).
        eps: lower clamp of the input.
        p_trainable: learn ``p`` (a scalar ``nn.Parameter``) or keep it fixed (a buffer).

    Shape:
        ``(N, C, h, w) -> (N, C)``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, p_trainable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}.")
        p_tensor = torch.tensor(float(p))
        if p_trainable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3))
        return pooled.pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4f}, eps={self.eps}"


def build_pooling(name: str = "avg", **kwargs) -> nn.Module:
    """``"avg"`` -> :class:`GlobalAvgPool`; ``"gem"`` -> :class:`GeneralizedMeanPooling`
    (``kwargs``: ``p``, ``eps``, ``p_trainable``)."""
    if name == "avg":
        if kwargs:
            raise ValueError(f"avg pooling takes no options, got {sorted(kwargs)}.")
        return GlobalAvgPool()
    if name == "gem":
        return GeneralizedMeanPooling(**kwargs)
    raise ValueError(f"Unknown pooling {name!r} (model.pooling); expected 'avg' or 'gem'.")
