"""BNNeck and classifier heads."""

from __future__ import annotations

import pytest
import torch

from src.models.heads import BNNeck, build_classifier


def test_bnneck_shift_is_frozen_at_zero():
    neck = BNNeck(16)
    assert torch.equal(neck.bn.weight, torch.ones(16))
    assert torch.equal(neck.bn.bias, torch.zeros(16))
    assert not neck.bn.bias.requires_grad and neck.bn.weight.requires_grad
    optimizer = torch.optim.SGD(neck.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    x = torch.randn(8, 16) * 3 + 2
    for _ in range(3):
        optimizer.zero_grad()
        (neck(x) * torch.arange(16.0)).sum().backward()
        optimizer.step()
    assert neck.bn.bias.grad is None
    assert torch.equal(neck.bn.bias, torch.zeros(16))
    assert not torch.equal(neck.bn.weight, torch.ones(16))


def test_bnneck_normalises_with_batch_statistics_in_training():
    neck = BNNeck(4).train()
    x = torch.randn(32, 4) * 5 + 3
    out = neck(x)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + neck.bn.eps)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_classifier_init(bias):
    torch.manual_seed(0)
    classifier = build_classifier(256, 1000, bias=bias)
    assert classifier.weight.shape == (1000, 256)
    # normal(0, 0.001): the sample std of 256k values is within 1% of 0.001.
    assert abs(classifier.weight.std().item() - 1e-3) < 1e-5
    assert abs(classifier.weight.mean().item()) < 1e-5
    if bias:
        assert torch.equal(classifier.bias, torch.zeros(1000))
    else:
        assert classifier.bias is None


def test_classifier_needs_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier(16, 0)


def test_trinet_embedding_head_structure_and_init():
    """TriNet (triplet-reid heads/fc1024.py): Linear(no bias) -> BN -> ReLU -> Linear(orthogonal,
    zero bias)."""
    from torch import nn

    from src.models.heads import EmbeddingHead

    torch.manual_seed(0)
    head = EmbeddingHead(64, [32, 8])
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    first, bn, _, out = head.layers
    assert first.bias is None and first.weight.shape == (32, 64)
    assert bn.momentum == 0.1 and bn.eps == 1e-5
    torch.testing.assert_close(out.weight @ out.weight.t(), torch.eye(8), atol=1e-5, rtol=0)
    assert out.bias.abs().sum() == 0
    x = torch.randn(5, 64)
    head.train()
    y = head(x)
    hidden = torch.relu(nn.functional.batch_norm(x @ first.weight.t(), None, None, training=True))
    torch.testing.assert_close(y, hidden @ out.weight.t() + out.bias)
    assert head.out_dim == 8
    with pytest.raises(ValueError, match="head_dims"):
        EmbeddingHead(64, [])


def test_reid_net_with_the_trinet_head():
    from src.models import ReIDNet

    torch.manual_seed(0)
    net = ReIDNet("resnet18", last_stride=2, head_dims=[16, 8], neck="none", embed="global").eval()
    assert net.feat_dim == 8
    x = torch.randn(2, 3, 64, 32)
    out = net(x)
    assert out["global_feat"].shape == (2, 8)
    pooled = net.pool(net.backbone(x))
    assert pooled.shape == (2, 512)
    torch.testing.assert_close(out["global_feat"], net.head(pooled))
    torch.testing.assert_close(net.embed(x), out["global_feat"])
