"""Backbone construction, architecture options and weight loading."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from src.models import backbones
from src.models.backbones import build_backbone, pretrained_weights_url, strip_fc


def _torchvision(name: str, seed: int = 0) -> tvm.ResNet:
    torch.manual_seed(seed)
    model = getattr(tvm, name)(weights=None)
    # Non-trivial BN statistics so that eval-mode comparisons exercise them.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def _layer4_output(model: tvm.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _assert_same_weights(backbone: nn.Module, reference: tvm.ResNet) -> None:
    ours = backbone.state_dict()
    theirs = strip_fc(reference.state_dict())
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)],
)
def test_feature_map_shape_and_channels(name, channels, images):
    backbone, out_channels = build_backbone(name, last_stride=1)
    assert out_channels == channels == backbone.out_channels
    with torch.no_grad():
        fmap = backbone.eval()(images)
    # 64x32 input, overall stride 16 with last stride 1.
    assert fmap.shape == (2, channels, 4, 2)


def test_resnet101_builds_with_2048_channels():
    backbone, out_channels = build_backbone("resnet101", last_stride=2)
    assert out_channels == 2048
    assert len(backbone.layer3) == 23  # really a ResNet-101


def test_last_stride_one_doubles_final_map(images):
    stride1, _ = build_backbone("resnet18", last_stride=1)
    stride2, _ = build_backbone("resnet18", last_stride=2)
    with torch.no_grad():
        h1, w1 = stride1.eval()(images).shape[2:]
        h2, w2 = stride2.eval()(images).shape[2:]
    assert (h1, w1) == (2 * h2, 2 * w2) == (4, 2)
    block = stride1.layer4[0]
    assert block.conv1.stride == (1, 1) and block.downsample[0].stride == (1, 1)
    bottleneck = build_backbone("resnet50", last_stride=1)[0].layer4[0]
    # torchvision's Bottleneck strides its 3x3 conv2 ("v1.5"), conv1 stays 1.
    assert bottleneck.conv2.stride == (1, 1) and bottleneck.downsample[0].stride == (1, 1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_matches_torchvision_exactly_with_copied_weights(name, images):
    reference = _torchvision(name)
    backbone, _ = build_backbone(name, last_stride=2, last_relu=True)
    backbone.load_state_dict(strip_fc(reference.state_dict()))
    backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(images), _layer4_output(reference, images))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_last_relu_false_returns_torchvision_pre_activation(name, images):
    reference = _torchvision(name)
    # The last block's `relu` module is called 2 (BasicBlock) or 3 (Bottleneck) times; its last
    # input is the residual sum before the final ReLU. Clone it: the ReLU is in-place.
    relu_inputs: list[torch.Tensor] = []
    hook = reference.layer4[-1].relu.register_forward_pre_hook(
        lambda _module, args: relu_inputs.append(args[0].clone())
    )
    with torch.no_grad():
        after_relu = _layer4_output(reference, images)
    hook.remove()
    pre_activation = relu_inputs[-1]

    backbone, _ = build_backbone(name, last_stride=2, last_relu=False)
    backbone.load_state_dict(strip_fc(reference.state_dict()))
    with torch.no_grad():
        fmap = backbone.eval()(images)
    torch.testing.assert_close(fmap, pre_activation, rtol=0, atol=0)
    assert torch.equal(fmap.clamp(min=0), after_relu)
    assert (fmap < 0).any()
    # Only the last block changes: the other blocks are still torchvision's classes.
    assert type(backbone.layer4[0]) is type(reference.layer4[0])
    assert type(backbone.layer4[-1]) is not type(reference.layer4[-1])
    # Pooled features can be negative (not possible with the final ReLU).
    assert (fmap.mean(dim=(2, 3)) < 0).any()


def test_parameter_names_are_torchvision_names():
    backbone, _ = build_backbone("resnet50", last_relu=False)
    assert backbone.state_dict().keys() == strip_fc(tvm.resnet50().state_dict()).keys()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="resnet152"):
        build_backbone("resnet152")
    with pytest.raises(ValueError, match="last_stride"):
        build_backbone("resnet18", last_stride=3)


# --- weights from a local file ------------------------------------------------------------


def test_weights_path_loads_torchvision_state_dict(tmp_path):
    reference = _torchvision("resnet18", seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone, _ = build_backbone("resnet18", weights_path=path)
    _assert_same_weights(backbone, reference)


@pytest.mark.parametrize("wrap", ["state_dict", "module", "state_dict+module"])
def test_weights_path_tolerates_wrappers_and_prefixes(tmp_path, wrap):
    reference = _torchvision("resnet18", seed=2)
    state = reference.state_dict()
    if "module" in wrap:
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {"state_dict": state, "epoch": 3} if "state_dict" in wrap else state
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    backbone, _ = build_backbone("resnet18", weights_path=str(path), last_relu=False)
    _assert_same_weights(backbone, reference)


def test_weights_path_ignores_fc_of_any_size(tmp_path):
    reference = _torchvision("resnet18", seed=3)
    reference.fc = nn.Linear(512, 751)  # a re-ID classifier instead of ImageNet's
    path = tmp_path / "reid.pth"
    torch.save(reference.state_dict(), path)
    backbone, _ = build_backbone("resnet18", weights_path=path)
    _assert_same_weights(backbone, reference)


def test_weights_path_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/resnet50.pth"):
        build_backbone("resnet18", weights_path=path)


def test_weights_path_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(tvm.resnet50().state_dict(), path)
    with pytest.raises(RuntimeError) as info:
        build_backbone("resnet18", weights_path=path)
    message = str(info.value)
    assert str(path) in message
    assert "do not match" in message and "unexpected keys" in message
    assert "shape mismatches" in message and "layer1.0.conv1.weight" in message


def test_weights_path_missing_keys_are_listed(tmp_path):
    state = tvm.resnet18().state_dict()
    del state["layer4.1.bn2.running_var"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"missing keys: layer4\.1\.bn2\.running_var"):
        build_backbone("resnet18", weights_path=path)


@pytest.mark.parametrize("content", [{"epoch": 3}, [torch.zeros(2)]])
def test_weights_path_not_a_state_dict(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(RuntimeError, match="does not hold a state dict"):
        build_backbone("resnet18", weights_path=path)


def test_weights_path_unreadable_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pth"):
        build_backbone("resnet18", weights_path=path)


# --- ImageNet weights (hub cache / download) ----------------------------------------------


def _fail_download(*_args, **_kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


@pytest.mark.timeout(60)
def test_pretrained_without_network_or_cache_raises_guidance(hub_dir, monkeypatch):
    monkeypatch.setattr(backbones, "_download_url", _fail_download)
    with pytest.raises(RuntimeError) as info:
        build_backbone("resnet50", pretrained=True)
    message = str(info.value)
    assert "could not be had" in message
    assert "model.backbone.pretrained=false" in message
    assert "model.backbone.weights_path=" in message
    assert tvm.ResNet50_Weights.IMAGENET1K_V1.url in message
    assert str(hub_dir / "checkpoints" / "resnet50-0676ba61.pth") in message


@pytest.mark.timeout(60)
def test_pretrained_uses_hub_cache_without_downloading(hub_dir, monkeypatch):
    reference = _torchvision("resnet18", seed=4)
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    assert pretrained_weights_url("resnet18") == url
    cached = hub_dir / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    monkeypatch.setattr(backbones, "_download_url", _fail_download)
    backbone, _ = build_backbone("resnet18", pretrained=True)
    _assert_same_weights(backbone, reference)


@pytest.mark.timeout(60)
def test_pretrained_downloads_into_hub_cache(hub_dir, monkeypatch):
    reference = _torchvision("resnet18", seed=5)
    calls = []

    def fake_download(url, dst, timeout_s):
        calls.append((url, dst, timeout_s))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(backbones, "_download_url", fake_download)
    backbone, _ = build_backbone("resnet18", pretrained=True)
    _assert_same_weights(backbone, reference)
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    assert calls == [(url, hub_dir / "checkpoints" / Path(url).name, backbones.DOWNLOAD_TIMEOUT_S)]


def test_weights_path_takes_precedence_over_pretrained(tmp_path, hub_dir, monkeypatch):
    reference = _torchvision("resnet18", seed=6)
    path = tmp_path / "local.pth"
    torch.save(reference.state_dict(), path)
    monkeypatch.setattr(backbones, "_download_url", _fail_download)
    backbone, _ = build_backbone("resnet18", pretrained=True, weights_path=path)
    _assert_same_weights(backbone, reference)


def test_corrupt_cache_file_is_reported(hub_dir, monkeypatch):
    cached = hub_dir / "checkpoints" / Path(pretrained_weights_url("resnet18")).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    monkeypatch.setattr(backbones, "_download_url", _fail_download)
    with pytest.raises(RuntimeError, match="delete the file"):
        build_backbone("resnet18", pretrained=True)


@pytest.mark.timeout(60)
def test_stalled_server_times_out_instead_of_hanging(hub_dir, monkeypatch):
    """The real download path against a local server that accepts and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []

    def accept_and_stall():
        connection, _ = server.accept()
        accepted.append(connection)  # keep it open, send nothing

    thread = threading.Thread(target=accept_and_stall, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    monkeypatch.setattr(backbones, "pretrained_weights_url", lambda _name: url)
    monkeypatch.setattr(backbones, "DOWNLOAD_TIMEOUT_S", 0.5)
    default_timeout = socket.getdefaulttimeout()
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="model.backbone.pretrained=false") as info:
            build_backbone("resnet18", pretrained=True)
    finally:
        for connection in accepted:
            connection.close()
        server.close()
    assert time.monotonic() - start < 20
    assert "timed out" in str(info.value)
    assert socket.getdefaulttimeout() == default_timeout
    assert not (hub_dir / "checkpoints" / "resnet18-f37072fd.pth").exists()
