"""ReIDNet outputs for every option, embeddings and the MAR configuration."""

from __future__ import annotations

import itertools

import pytest
import torch

from src.models import ReIDNet
from src.models.heads import BNNeck

OPTIONS = list(
    itertools.product(
        ["bnneck", "none"],  # neck
        [0, 7],  # num_classes
        [False, True],  # local_branch
        ["avg", "gem"],  # pooling
    )
)


@pytest.fixture(scope="module")
def trunk_state():
    """One resnet18 trunk state shared by all option combinations (identical backbones)."""
    torch.manual_seed(0)
    return ReIDNet("resnet18", neck="none").backbone.state_dict()


@pytest.mark.parametrize(("neck", "num_classes", "local_branch", "pooling"), OPTIONS)
def test_forward_outputs_for_each_option(
    neck, num_classes, local_branch, pooling, images, trunk_state
):
    model = ReIDNet(
        "resnet18",
        neck=neck,
        num_classes=num_classes,
        local_branch=local_branch,
        pooling=pooling,
        classifier_bias=True,
        local_dim=16,
    )
    model.backbone.load_state_dict(trunk_state)
    if model.neck is not None:  # non-trivial running statistics for the eval-mode BN
        model.neck.bn.running_mean.fill_(0.3)
        model.neck.bn.running_var.fill_(4.0)
    model.eval()
    with torch.no_grad():
        out = model(images)
        fmap = model.backbone(images)
    assert set(out) == {"global_feat", "bn_feat", "logits", "local_feat"}
    assert model.feat_dim == 512 and model.num_classes == num_classes
    torch.testing.assert_close(out["global_feat"], model.pool(fmap))
    assert out["global_feat"].shape == out["bn_feat"].shape == (2, 512)
    if neck == "none":
        assert model.neck is None and out["bn_feat"] is out["global_feat"]
    else:
        assert isinstance(model.neck, BNNeck)
        expected = (out["global_feat"] - 0.3) / torch.sqrt(torch.tensor(4.0 + model.neck.bn.eps))
        torch.testing.assert_close(out["bn_feat"], expected)
    if num_classes:
        assert isinstance(model.classifier, torch.nn.Linear)
        assert out["logits"].shape == (2, num_classes)
        torch.testing.assert_close(out["logits"], model.classifier(out["bn_feat"]))
    else:
        assert model.classifier is None and out["logits"] is None
    if local_branch:
        assert out["local_feat"].shape == (2, 4, 16)  # 64/16 = 4 stripes
        torch.testing.assert_close(out["local_feat"], model.local_branch(fmap))
    else:
        assert out["local_feat"] is None


@pytest.mark.parametrize(
    ("neck", "embed", "key"),
    [
        ("bnneck", "bn", "bn_feat"),
        ("bnneck", "global", "global_feat"),
        ("none", "bn", "global_feat"),
        ("none", "global", "global_feat"),
    ],
)
def test_embed_returns_the_configured_feature(neck, embed, key, images):
    model = ReIDNet("resnet18", neck=neck, embed=embed, num_classes=5, local_branch=True)
    if model.neck is not None:  # make bn_feat clearly differ from global_feat
        model.neck.bn.running_mean.fill_(0.5)
        model.neck.bn.running_var.fill_(9.0)
    model.eval()
    with torch.no_grad():
        out = model(images)
        embedding = model.embed(images)
    torch.testing.assert_close(embedding, out[key])
    if neck == "bnneck":
        other = "global_feat" if key == "bn_feat" else "bn_feat"
        assert not torch.allclose(embedding, out[other])


def test_resnet50_shapes(images):
    model = ReIDNet("resnet50", num_classes=11, local_branch=True).eval()
    with torch.no_grad():
        out = model(images)
    assert model.feat_dim == 2048
    assert out["global_feat"].shape == out["bn_feat"].shape == (2, 2048)
    assert out["logits"].shape == (2, 11)
    assert out["local_feat"].shape == (2, 4, 128)
    assert model.classifier.bias is None  # Bag of Tricks: bias-free classifier after BNNeck


def test_mar_configuration(images):
    """MAR: ResNet-50, standard stride, no final ReLU, no neck, bias-free agents."""
    model = ReIDNet(
        "resnet50",
        last_stride=2,
        last_relu=False,
        neck="none",
        num_classes=13,
        classifier_bias=False,
    ).eval()
    with torch.no_grad():
        out = model(images)
    assert model.classifier.bias is None and model.classifier.weight.shape == (13, 2048)
    assert out["bn_feat"] is out["global_feat"]
    assert (out["global_feat"] < 0).any()  # possible only without the final ReLU
    torch.testing.assert_close(out["logits"], out["global_feat"] @ model.classifier.weight.T)
    with torch.no_grad():
        assert model.backbone(images).shape[2:] == (2, 1)  # stride 32


def test_losses_reach_every_trainable_parameter(images):
    model = ReIDNet("resnet18", num_classes=3, local_branch=True, pooling="gem").train()
    out = model(images)
    loss = out["global_feat"].sum() + out["logits"].sum() + out["local_feat"].sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.neck.bn.bias.grad is None


def test_state_dict_names():
    keys = ReIDNet("resnet18", num_classes=4, local_branch=True).state_dict().keys()
    for key in (
        "backbone.layer4.1.conv2.weight",
        "neck.bn.weight",
        "classifier.weight",
        "local_branch.conv.weight",
    ):
        assert key in keys


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neck": "bn"}, "model.neck"),
        ({"embed": "after"}, "model.embed"),
        ({"pooling": "max"}, "model.pooling"),
        ({"num_classes": -1}, "num_classes"),
        ({"backbone": "vgg16"}, "model.backbone.name"),
    ],
)
def test_bad_options_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReIDNet(**{"backbone": "resnet18", **kwargs})


def test_backbone_given_as_a_hydra_mapping():
    """conf/model/*.yaml nests the backbone options: the mapping form builds the same network."""
    from src.models import ReIDNet

    net = ReIDNet(backbone={"name": "resnet18", "last_stride": 2, "last_relu": False}, neck="none")
    flat = ReIDNet(backbone="resnet18", last_stride=2, last_relu=False, neck="none")
    assert net.state_dict().keys() == flat.state_dict().keys()
    x = torch.randn(2, 3, 64, 32)
    assert net(x)["global_feat"].shape == flat(x)["global_feat"].shape
    with pytest.raises(ValueError, match="model.backbone"):
        ReIDNet(backbone={"name": "resnet18", "stride": 1})
