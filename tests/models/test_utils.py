"""Optimizer parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.models import ReIDNet, param_groups


@pytest.fixture(scope="module")
def model():
    return ReIDNet(
        "resnet18", num_classes=5, classifier_bias=True, local_branch=True, pooling="gem"
    )


def _ids(params):
    return {id(p) for p in params}


def test_bn_params_are_not_decayed(model):
    groups = {g["name"]: g for g in param_groups(model, weight_decay=5e-4)}
    assert set(groups) == {"decay", "norm", "no_decay"}
    norm_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    expected_norm = {id(p) for m in norm_layers for p in m.parameters() if p.requires_grad}
    assert _ids(groups["norm"]["params"]) == expected_norm
    assert groups["norm"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 5e-4
    decay = _ids(groups["decay"]["params"])
    assert id(model.classifier.weight) in decay  # MAR decays the agents
    assert id(model.classifier.bias) in decay
    assert id(model.backbone.conv1.weight) in decay
    assert _ids(groups["no_decay"]["params"]) == {id(model.pool.p)}
    # Every trainable parameter exactly once; the frozen BNNeck shift nowhere.
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.neck.bn.bias) not in set(all_ids)


def test_bias_and_bn_decay_options(model):
    groups = {
        g["name"]: g
        for g in param_groups(model, weight_decay=1e-2, bn_weight_decay=1e-3, bias_weight_decay=0)
    }
    assert groups["norm"]["weight_decay"] == 1e-3
    assert _ids(groups["bias"]["params"]) == {id(model.classifier.bias)}
    assert groups["bias"]["weight_decay"] == 0.0


def test_sgd_step_decays_only_the_decay_group():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    nn.init.uniform_(net[1].weight, 0.5, 1.5)
    nn.init.uniform_(net[1].bias, -1.0, 1.0)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(param_groups(net, weight_decay=0.1), lr=1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # Linear weight and bias shrink by (1 - lr * wd); BN weight and bias are untouched.
    torch.testing.assert_close(net[0].weight, before[0] * 0.9)
    torch.testing.assert_close(net[0].bias, before[1] * 0.9)
    assert torch.equal(net[1].weight, before[2]) and torch.equal(net[1].bias, before[3])
