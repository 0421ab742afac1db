"""ResNet backbones for re-ID, built from torchvision.

Options used across re-ID papers:

* ``last_stride=1`` (Sun et al. PCB 2018; Luo et al. "Bag of Tricks" 2019): layer4 keeps the
  spatial size of layer3, so a 256x128 input gives a 16x8 final map instead of 8x4.
* ``last_relu=False`` (MAR, Yu et al. CVPR 2019 reference code): the last residual block of
  layer4 returns ``bn3(...) + identity`` without the final ReLU, so pooled features can be
  negative.

ImageNet weights come from torchvision's weights API (``IMAGENET1K_V1``, the weights re-ID papers
were trained from). They are looked up in torch's hub cache first, then downloaded with a socket
timeout; if neither works a :class:`RuntimeError` explains how to proceed. A local file in
torchvision's format can be given with ``weights_path``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = [
    "BACKBONES",
    "DOWNLOAD_TIMEOUT_S",
    "ResNetBackbone",
    "build_backbone",
    "load_backbone_weights",
    "pretrained_weights_url",
    "strip_fc",
]

# name -> (torchvision constructor, ImageNet weights enum, channels of the last feature map)
BACKBONES: dict[str, tuple[Callable[..., tvm.ResNet], Any, int]] = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, 2048),
}

# Per socket operation (connect / each read), so a dead or stalled network fails fast while a
# slow but progressing download of ResNet-101 (170 MB) still completes.
DOWNLOAD_TIMEOUT_S = 15.0

_GUIDANCE = (
    "To proceed, either train from scratch with `model.backbone.pretrained=false`, or download "
    "{url} on a machine with internet access and pass it with "
    "`model.backbone.weights_path=/path/to/{file}` (or copy it to {cache})."
)


class _BasicBlockNoReLU(BasicBlock):
    """torchvision BasicBlock whose output is ``bn2(conv2(...)) + identity`` (no final ReLU)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity


class _BottleneckNoReLU(Bottleneck):
    """torchvision Bottleneck whose output is ``bn3(conv3(...)) + identity`` (no final ReLU)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity


class ResNetBackbone(nn.Module):
    """torchvision ResNet without avgpool/fc; returns the layer4 feature map.

    Parameter names are torchvision's (``conv1.weight``, ``layer4.2.bn3.weight``, ...) minus
    ``fc.*``, so torchvision state dicts load directly.

    Args:
        resnet: a torchvision ``ResNet``; its stem and layers are reused (not copied).
        out_channels: channels of layer4's output (512 for resnet18/34, 2048 for resnet50/101).

    Shape:
        input ``(N, 3, H, W)`` -> output ``(N, C, h, w)`` with ``C = out_channels`` and
        ``h = ceil(H / 16)`` for last stride 1 (``/ 32`` for last stride 2).
    """

    def __init__(self, resnet: tvm.ResNet, out_channels: int) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _set_last_stride(backbone: ResNetBackbone, stride: int) -> None:
    """Set the stride of layer4's first block (its strided conv and its downsample shortcut)."""
    block = backbone.layer4[0]
    # torchvision puts the stride on conv2 in Bottleneck ("ResNet v1.5") and conv1 in BasicBlock.
    strided_conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    strided_conv.stride = (stride, stride)
    block.stride = stride
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def _remove_last_relu(backbone: ResNetBackbone) -> None:
    """Drop the ReLU after the final residual addition of layer4's last block only.

    The block's class is swapped in place (same submodules, same parameter names), so weights
    load exactly as for torchvision; the block's ``relu`` module is still used inside the block.
    """
    last = backbone.layer4[-1]
    last.__class__ = _BottleneckNoReLU if isinstance(last, Bottleneck) else _BasicBlockNoReLU


def strip_fc(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return ``state_dict`` without the ImageNet classifier (``fc.*``) entries."""
    return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """Accept a plain state dict, or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``,
    with any number of DataParallel ``module.`` prefixes."""
    if isinstance(obj, Mapping):
        for wrapper_key in ("state_dict", "model"):
            if wrapper_key in obj and isinstance(obj[wrapper_key], Mapping):
                obj = obj[wrapper_key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise RuntimeError(
            f"Backbone weights file {source} does not hold a state dict (a mapping from parameter "
            f"names to tensors, optionally under a 'state_dict' key); got {type(obj).__name__}."
        )
    state = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def load_backbone_weights(
    backbone: ResNetBackbone, state_dict: Mapping[str, Tensor], source: str
) -> None:
    """Load a torchvision-format ResNet state dict into ``backbone`` (``fc.*`` ignored).

    Every backbone parameter and buffer must be present with the right shape; a mismatch raises a
    :class:`RuntimeError` naming ``source`` and listing the offending keys.
    """
    state = strip_fc(state_dict)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:

        def _head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {_head(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_head(unexpected)}")
        if wrong_shape:
            problems.append(f"shape mismatches: {_head(wrong_shape)}")
        raise RuntimeError(
            f"Backbone weights in {source} do not match the model's architecture "
            f"({backbone.__class__.__name__} with {backbone.out_channels} output channels): "
            + "; ".join(problems)
            + ". Check that model.backbone.name matches the file (e.g. resnet50 weights for "
            "resnet50) and that it is a torchvision ResNet state dict."
        )
    backbone.load_state_dict(state, strict=True)


def _load_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Backbone weights file {path} not found (model.backbone.weights_path). Give the path "
            "to a torchvision ResNet state dict (.pth), or set model.backbone.weights_path=null."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, full pickled model, ...
        raise RuntimeError(
            f"Could not read backbone weights file {path}: {err}. Expected a state dict saved "
            "with torch.save(model.state_dict(), path)."
        ) from err
    return _unwrap_state_dict(obj, str(path))


def pretrained_weights_url(name: str) -> str:
    """URL of the torchvision ImageNet weights used for backbone ``name``."""
    _check_name(name)
    return BACKBONES[name][1].url


def _hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


@contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_url(url: str, dst: Path, timeout_s: float) -> None:
    """Download ``url`` to ``dst`` (atomically, hash-checked by torch.hub) with a socket timeout.

    Module-level so tests can replace it.
    """
    # torchvision file names embed the first hex digits of the file's sha256.
    match = torch.hub.HASH_REGEX.search(dst.name)
    hash_prefix = match.group(1) if match else None
    with _socket_timeout(timeout_s):
        torch.hub.download_url_to_file(url, str(dst), hash_prefix, progress=True)


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """ImageNet weights of ``name``: hub cache, else a download; RuntimeError when neither works."""
    url = pretrained_weights_url(name)
    cached = _hub_checkpoint_path(url)
    guidance = _GUIDANCE.format(url=url, file=cached.name, cache=cached)
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _download_url(url, cached, DOWNLOAD_TIMEOUT_S)
        except Exception as err:  # no network, timeout, HTTP error, hash mismatch, disk full...
            raise RuntimeError(
                f"ImageNet weights for {name} could not be had: not in the torch hub cache "
                f"({cached}) and downloading {url} failed ({type(err).__name__}: {err}). "
                + guidance
            ) from err
    try:
        obj = torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"Cached ImageNet weights {cached} for {name} could not be read ({err}); delete the "
            "file to download it again. " + guidance
        ) from err
    return _unwrap_state_dict(obj, str(cached))


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone {name!r} (model.backbone.name); expected one of {sorted(BACKBONES)}."
        )


def build_backbone(
    name: str = "resnet50",
    pretrained: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
    last_stride: int = 1,
    last_relu: bool = True,
) -> tuple[ResNetBackbone, int]:
    """Build a torchvision ResNet trunk that returns its last feature map.

    Args:
        name: ``"resnet18" | "resnet34" | "resnet50" | "resnet101"``.
        pretrained: load torchvision's ``IMAGENET1K_V1`` weights (hub cache, else download with a
            socket timeout of ``DOWNLOAD_TIMEOUT_S``); raises RuntimeError with instructions when
            they cannot be had. Never falls back to a random init silently.
        weights_path: local torchvision-format state dict (``{"state_dict": ...}`` wrappers and
            ``module.`` prefixes tolerated, ``fc.*`` ignored). Takes precedence over
            ``pretrained`` (no download is attempted when it is given).
        last_stride: stride of layer4, 1 (re-ID standard, 2x larger final map) or 2 (ImageNet).
        last_relu: ``False`` removes the ReLU after the final residual addition of the last block.

    Returns:
        ``(backbone, out_channels)``; ``backbone(x)`` maps ``(N, 3, H, W)`` to
        ``(N, out_channels, h, w)``; out_channels is 512 (resnet18/34) or 2048 (resnet50/101).
    """
    _check_name(name)
    if last_stride not in (1, 2):
        raise ValueError(f"model.backbone.last_stride must be 1 or 2, got {last_stride!r}.")
    constructor, _, out_channels = BACKBONES[name]
    # Never pass `weights=` to torchvision: its download has no timeout and could hang offline.
    resnet = constructor(weights=None)
    backbone = ResNetBackbone(resnet, out_channels)
    # Weights are loaded before the architecture tweaks; neither changes a parameter's shape.
    if weights_path is not None:
        load_backbone_weights(backbone, _load_file(weights_path), str(weights_path))
    elif pretrained:
        load_backbone_weights(backbone, _imagenet_state_dict(name), pretrained_weights_url(name))
    _set_last_stride(backbone, last_stride)
    if not last_relu:
        _remove_last_relu(backbone)
    return backbone, out_channels
