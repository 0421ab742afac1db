"""loss=bot through the Hydra entry point: the centre loss is in the objective, its centres are
trained by their own unscheduled SGD group, and a resumed run continues exactly."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from src.losses import CenterLoss, CrossEntropyLabelSmooth, TripletLoss
from src.systems.optim import WithSGDGroups
from src.systems.steps import supervised_objective
from src.train import train
from tests.conftest import tiny_overrides


def test_bot_objective_has_the_center_term_and_the_centre_sgd(make_cfg, tiny_data_root):
    cfg = make_cfg(
        ["experiment=market_bot"]
        + tiny_overrides(tiny_data_root)
        + ["data=synthetic_a", "model.backbone.name=resnet18", "model.backbone.pretrained=false"]
        + ["debug=fdr", "test=false"]
    )
    metrics, objects = train(cfg)
    system = objects["system"]
    assert isinstance(system.center_loss, CenterLoss)
    assert system.center_loss.centers.shape == (system.net.num_classes, system.net.feat_dim)
    assert metrics["train/loss_center_step"] > 0
    opt = system.trainer.optimizers[0]
    assert isinstance(opt, WithSGDGroups)
    center = [g for g in opt.param_groups if g.get("name") == "center"]
    assert len(center) == 1 and center[0]["lr"] == 0.5
    assert center[0]["grad_scale"] == 1 / 5e-4
    # BoT decays BN too (optimizer.norm_weight_decay); a ResNet + BNNeck has no other bias
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays == {"decay": 5e-4, "norm": 5e-4, "center": 0.0}


@pytest.mark.slow
def test_bot_resume_restores_the_centres_and_both_optimizers(make_cfg, tiny_data_root):
    common = tiny_overrides(tiny_data_root) + [
        "loss=bot",
        "scheduler.warmup_epochs=1",
        "scheduler.milestones=[1]",
        "data.random_erasing_p=0.0",
        "test=false",
        "trainer.deterministic=true",
        "trainer.check_val_every_n_epoch=10",
    ]
    _, full = train(make_cfg(common + ["trainer.max_epochs=2"]))
    first_cfg = make_cfg(common + ["trainer.max_epochs=1"])
    train(first_cfg)
    last = Path(first_cfg.paths.output_dir, "checkpoints", "last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    assert set(ckpt["optimizer_states"][0]) == {"main", "sgd"}
    _, resumed = train(make_cfg(common + ["trainer.max_epochs=2", f"ckpt_path={last}"]))
    a, b = full["system"].state_dict(), resumed["system"].state_dict()
    assert "center_loss.centers" in a and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_supervised_objective_adds_the_weighted_center_term():
    torch.manual_seed(0)
    feats, pids = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logits = torch.randn(8, 4)
    outputs = {"global_feat": feats, "bn_feat": feats, "logits": logits, "local_feat": None}
    tri, ce = TripletLoss(margin=0.3), CrossEntropyLabelSmooth(4, epsilon=0.1)
    center = CenterLoss(num_classes=4, feat_dim=6, weight=5e-4)
    weights = {"metric": 1.0, "ce": 1.0, "center": 5e-4}
    total, terms = supervised_objective(outputs, pids, tri, ce, weights, center_loss=center)
    want = tri(feats, pids) + ce(logits, pids) + 5e-4 * center(feats, pids)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(terms["loss_center"], center(feats, pids))


def test_center_weight_must_match_the_loss_weight(make_cfg):
    cfg = make_cfg(
        ["experiment=market_bot", "model.backbone.name=resnet18", "model.backbone.pretrained=false"]
        + ["loss.weights.center=0.001"]
    )
    with pytest.raises(Exception, match="must equal the center loss weight"):
        hydra.utils.instantiate(cfg.system, num_classes=5)
