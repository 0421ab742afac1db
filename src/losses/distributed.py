"""All-gather that keeps gradients, for losses computed over the global (all-rank) batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum_with_grad", "gather_with_grad"]


def _is_distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1


class _GatherWithGrad(torch.autograd.Function):
    """Concatenating all-gather whose backward returns this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any, reduce_grad: bool) -> Tensor:
        ctx.group = group
        ctx.reduce_grad = reduce_grad
        ctx.rank = dist.get_rank(group=group)
        ctx.local_size = tensor.size(0)
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(gathered, tensor, group=group)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        if ctx.reduce_grad:
            # Every rank's loss may depend on this rank's rows: sum their gradients. (all_reduce
            # instead of reduce_scatter because gloo has no reduce_scatter; the slice is cheap.)
            grad_output = grad_output.contiguous()
            dist.all_reduce(grad_output, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_size
        return grad_output[start : start + ctx.local_size], None, None


def gather_with_grad(tensor: Tensor, *, group: Any = None, reduce_grad: bool = True) -> Tensor:
    """All-gather ``tensor`` over the ranks of ``group`` and concatenate, keeping the gradient.

    Args:
        tensor: ``(n, *)`` local rows; every rank must pass the same shape (as a P×K sampler
            with ``drop_last`` guarantees).
        group: process group (default: the world).
        reduce_grad: how the backward pass treats the gathered rows.

            * ``True`` (default, same as ``torch.distributed.nn.functional.all_gather``): the
              gradients of the gathered tensor are summed over ranks and each rank receives the
              slice of its own rows, i.e. ``∂(Σ_r L_r)/∂x_local``. Under DDP, which averages
              parameter gradients over ranks, this yields exactly the gradient of the mean of the
              per-rank losses; when every rank computes the same global loss L it yields ∇L.
              Costs one all-reduce of the gathered gradient in backward.
            * ``False``: no communication in backward; each rank keeps only the gradient of its
              own loss with respect to its own rows (rows from other ranks are constants). This
              drops the cross-rank terms (the "local loss" approximation).

    Returns:
        ``(world_size · n, *)`` rows ordered by rank, identical on every rank; rows
        ``rank·n : (rank+1)·n`` are this rank's ``tensor``. When torch.distributed is not
        initialised or the world has one process, ``tensor`` itself is returned unchanged.
    """
    if not _is_distributed(group):
        return tensor
    if tensor.dim() == 0:
        raise ValueError("gather_with_grad: tensor must have a leading (batch) dimension, got 0-d")
    return _GatherWithGrad.apply(tensor, group, reduce_grad)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(tensor: Tensor, *, group: Any = None) -> Tensor:
    """Differentiable sum of ``tensor`` over the ranks of ``group`` (identity in one process).

    Every rank's loss may depend on the sum, so the backward pass sums the ranks' gradients:
    ``∂(Σ_r L_r)/∂x_local``, the same convention as `gather_with_grad`.
    """
    if not _is_distributed(group):
        return tensor
    return _AllReduceSumWithGrad.apply(tensor, group)
