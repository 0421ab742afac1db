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
