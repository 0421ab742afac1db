"""`trainer.sync_batchnorm=true` on every device: BatchNorm statistics over the global batch.

Lightning's default (`TorchSyncBatchNorm`) converts BatchNorm to `torch.nn.SyncBatchNorm`, whose
kernels exist only on accelerators (on CPU it raises "SyncBatchNorm expected input tensor to be
on GPU"). `DeviceSyncBatchNorm` is that layer with a device-agnostic path used off the
accelerators: per-channel sums all-reduced with gradient (two passes: mean, then centred
squares), the same statistics and gradients as SyncBatchNorm. On CUDA it runs SyncBatchNorm.
`SyncBatchNormPlugin` is the Lightning plugin (conf/trainer/ddp_cpu.yaml).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from src.losses.distributed import all_reduce_sum_with_grad

__all__ = ["DeviceSyncBatchNorm", "SyncBatchNormPlugin", "sync_batch_norm"]

_NATIVE = ("cuda", "hpu", "xpu")


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    group: object = None,
) -> Tensor:
    """Training-mode BatchNorm of ``x`` (N, C, *) with the statistics of all ranks' batches.

    Biased variance for normalising, unbiased for the running variance (as `F.batch_norm`);
    computed in fp32 (fp64 for fp64 input), returned in ``x``'s dtype.
    """
    dims = [0, *range(2, x.dim())]
    xf = x.double() if x.dtype == torch.float64 else x.float()
    channels = xf.shape[1]
    count = torch.full((1,), xf.numel() // channels, dtype=xf.dtype, device=xf.device)
    totals = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), count]), group=group)
    n = totals[-1]
    mean = totals[:channels] / n
    shape = [1, channels] + [1] * (x.dim() - 2)
    centred = xf - mean.reshape(shape)
    var = all_reduce_sum_with_grad(centred.pow(2).sum(dims), group=group) / n
    out = centred * torch.rsqrt(var + eps).reshape(shape)
    if weight is not None:
        out = out * weight.to(xf.dtype).reshape(shape)
    if bias is not None:
        out = out + bias.to(xf.dtype).reshape(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = var.detach() * n / (n - 1).clamp(min=1)
            running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            running_var.mul_(1 - momentum).add_(momentum * unbiased)
    return out.to(x.dtype)


class DeviceSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch on every device: `torch.nn.SyncBatchNorm`'s forward on
    accelerators, `sync_batch_norm` elsewhere (CPU). Not a SyncBatchNorm subclass, which DDP
    refuses on CPU. Made by `SyncBatchNormPlugin` by swapping a BatchNorm's class in place
    (parameters, buffers and optimizer references unchanged)."""

    process_group: object = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        distributed = dist.is_available() and dist.is_initialized()
        if not (self.training and distributed):
            return super().forward(input)
        if input.device.type in _NATIVE:
            return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return sync_batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            momentum,
            self.eps,
            group,
        )


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning `LayerSync` plugin: every BatchNorm becomes a `DeviceSyncBatchNorm` when
    ``enabled`` (``revert`` restores the original classes).

    Pass ``enabled: ${trainer.sync_batchnorm}`` so that the trainer flag decides (a LayerSync
    plugin is applied whenever it is given).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)

    def apply(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        for module in model.modules():
            if isinstance(module, _BatchNorm) and not isinstance(module, DeviceSyncBatchNorm):
                module._sync_original_class = type(module)  # type: ignore[assignment]
                module.__class__ = DeviceSyncBatchNorm
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, DeviceSyncBatchNorm):
                module.__class__ = module.__dict__.pop("_sync_original_class")
        return model
