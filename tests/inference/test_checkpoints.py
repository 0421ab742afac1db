"""Self-describing checkpoints: metadata, load_from_checkpoint with a path, src.eval defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from src.eval import evaluate
from src.inference import FeatureExtractor
from src.metrics.functional import compute_distance_matrix, evaluate_rank
from src.systems import MARModule, TripletReIDModule, checkpoint_meta
from tests.conftest import tiny_overrides
from tests.inference._helpers import eval_reference
from tests.inference.conftest import compose_cfg


@pytest.fixture
def eval_cfg(tmp_path):
    def _make(overrides):
        return compose_cfg(overrides, tmp_path / "eval", config_name="eval")

    yield _make
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


def test_checkpoint_carries_config_and_protocol_as_primitives(supervised_ckpt, mar_ckpt):
    for ckpt, system, metric, feature in (
        (supervised_ckpt, "src.systems.TripletReIDModule", "euclidean", "bn"),
        (mar_ckpt, "src.systems.MARModule", "cosine", "global"),
    ):
        meta = torch.load(ckpt, weights_only=True)["marlin"]  # safe loading reads it
        assert meta["system"]["_target_"] == system
        assert meta["system"]["net"]["_target_"] == "src.models.ReIDNet"
        assert meta["protocol"] == {
            "feature": feature,
            "metric": metric,
            "ap": "standard",
            "flip": False,
            "rerank": False,
        }
        # the tiny overrides' 32x16 and the evaluation domain's statistics (MAR: B's, "auto")
        datamodule = hydra.utils.instantiate(meta["data"], _convert_="all")
        datamodule.setup("test")
        domain = "target" if datamodule.target_data is not None else "source"
        mean, std = datamodule.stats[domain]
        assert meta["input"] == {
            "height": 32,
            "width": 16,
            "mean": mean,
            "std": std,
            "interpolation": "bilinear",
        }
        assert meta["data"]["height"] == 32 and meta["marlin_version"] == "0.1.0"
        assert len(meta["git_commit"]) == 40 or meta["git_commit"] == "unknown"
    mar_meta = torch.load(mar_ckpt, weights_only=True)["marlin"]
    assert mar_meta["datasets"] == {
        "source": "synthetic",
        "target": "synthetic",
        "eval": "synthetic",
    }
    assert mar_meta["data"]["target"]["domain"] == "B"
    assert torch.load(supervised_ckpt, weights_only=True)["marlin"]["input"]["mean"] == [
        0.485,
        0.456,
        0.406,
    ]


@pytest.mark.parametrize("which", ["supervised", "mar"])
def test_load_from_checkpoint_with_only_a_path(which, supervised_ckpt, mar_ckpt):
    ckpt, cls, other = (
        (supervised_ckpt, TripletReIDModule, MARModule)
        if which == "supervised"
        else (mar_ckpt, MARModule, TripletReIDModule)
    )
    system = cls.load_from_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    state = system.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # the losses and optimizer come back too (a module that can train on)
    assert system.configure_optimizers()["optimizer"].param_groups
    if which == "supervised":
        assert system.metric_loss.margin == 0.3 and system.ce_loss is not None
    with pytest.raises(ValueError, match=f"load it with {cls.__name__}.load_from_checkpoint"):
        other.load_from_checkpoint(ckpt)


def _strip_metadata(ckpt: Path, out: Path) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["marlin"]
    torch.save(checkpoint, out)
    return out


def test_old_checkpoint_gives_a_clear_error(supervised_ckpt, tmp_path, tiny_data_root, eval_cfg):
    old = _strip_metadata(supervised_ckpt, tmp_path / "old.ckpt")
    with pytest.raises(checkpoint_meta.MissingMetadataError, match="experiment=<its experiment>"):
        FeatureExtractor.from_checkpoint(old)
    with pytest.raises(checkpoint_meta.MissingMetadataError, match="old.ckpt"):
        TripletReIDModule.load_from_checkpoint(old)
    base = tiny_overrides(tiny_data_root, train=False)
    with pytest.raises(checkpoint_meta.MissingMetadataError, match="experiment="):
        evaluate(eval_cfg([*base, f"ckpt_path={old}"]))
    # with the training config it evaluates as before, and as the self-describing checkpoint
    legacy = evaluate(eval_cfg([*base, "experiment=synthetic_triplet", f"ckpt_path={old}"]))
    described = evaluate(eval_cfg([*base, f"ckpt_path={supervised_ckpt}"]))
    assert legacy == described


def test_eval_uses_the_runs_data_and_protocol(mar_ckpt, tiny_data_root, eval_cfg):
    """A MAR (A -> B) checkpoint evaluated with only its path: on B with cosine distance, not on
    conf/eval.yaml's defaults (synthetic A, euclidean); explicit overrides still win."""
    base = [o for o in tiny_overrides(tiny_data_root, train=False) if "preset" not in o]
    cfg = eval_cfg([*base, f"ckpt_path={mar_ckpt}"])
    rows = evaluate(cfg)
    written = json.loads(Path(cfg.paths.output_dir, "metrics.json").read_text())
    assert written["protocol"] == {
        "metric": "cosine",
        "ap": "standard",
        "flip": False,
        "rerank": False,
    }
    # the evaluator's own features of B, ranked by cosine: the same mAP, exactly
    ref = eval_reference(mar_ckpt)
    assert rows["plain"]["mAP"] == ref.map_score
    explicit = evaluate(
        eval_cfg(
            [
                *base,
                f"ckpt_path={mar_ckpt}",
                "metric=euclidean",
                "ap=market_trapezoid",
            ]
        )
    )
    q = ref.is_query
    dist = compute_distance_matrix(ref.raw[q], ref.raw[~q], metric="euclidean")
    _, mAP, _ = evaluate_rank(
        dist, ref.pids[q], ref.pids[~q], ref.camids[q], ref.camids[~q], ap="market_trapezoid"
    )
    assert explicit["plain"]["mAP"] == pytest.approx(float(mAP), abs=1e-6)
    # conf/eval.yaml's default data (synthetic A) is another dataset: another result
    on_a = evaluate(
        eval_cfg(
            [
                *tiny_overrides(tiny_data_root, train=False),
                "data=synthetic_a",
                f"ckpt_path={mar_ckpt}",
            ]
        )
    )
    assert on_a["plain"]["mAP"] != rows["plain"]["mAP"]


def test_eval_run_dir_picks_the_runs_checkpoint(supervised_ckpt, tiny_data_root, eval_cfg):
    run_dir = supervised_ckpt.parent.parent
    base = tiny_overrides(tiny_data_root, train=False)
    by_dir = evaluate(eval_cfg([*base, f"run_dir={run_dir}"]))
    by_path = evaluate(eval_cfg([*base, f"ckpt_path={supervised_ckpt}"]))
    assert by_dir == by_path
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        evaluate(eval_cfg([*base, f"run_dir={run_dir / 'nope'}"]))


def test_checkpoint_targets_are_restricted(supervised_ckpt, tmp_path):
    checkpoint = torch.load(supervised_ckpt, weights_only=True)
    checkpoint["marlin"]["system"]["metric_loss"]["_target_"] = "os.system"
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match="only targets under"):
        TripletReIDModule.load_from_checkpoint(bad)
    assert hydra.utils.get_class("src.systems.TripletReIDModule") is TripletReIDModule


def test_run_dir_takes_the_checkpoint_the_run_tested(supervised_ckpt, tmp_path):
    """run_dir=DIR evaluates what the run's own test reported: last.ckpt (test_ckpt: last), or
    the best checkpoint recorded in last.ckpt when the run had test_ckpt: best."""
    import yaml
    from omegaconf import OmegaConf

    from src.eval import resolve_ckpt_path

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    best = checkpoints / "best_epoch_003.ckpt"
    shutil.copy(supervised_ckpt, best)
    last = torch.load(supervised_ckpt, weights_only=True)
    state = {"monitor": "val/mAP", "best_model_path": str(best)}
    last["callbacks"] = {"VerifiedModelCheckpoint{'monitor': 'val/mAP'}": state}
    torch.save(last, checkpoints / "last.ckpt")
    cfg = OmegaConf.create({"ckpt_path": None, "run_dir": str(tmp_path / "run")})
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"test_ckpt": "last"}))
    assert resolve_ckpt_path(cfg) == checkpoints / "last.ckpt"
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"test_ckpt": "best"}))
    assert resolve_ckpt_path(cfg) == best
    best.unlink()  # a best checkpoint that is gone: the last one
    assert resolve_ckpt_path(cfg) == checkpoints / "last.ckpt"
