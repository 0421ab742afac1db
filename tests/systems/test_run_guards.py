"""What must fail before training (and how clearly), what must not fail at all, and the
validation split. Guards docs/guarantees.md "data errors before training", "verified checkpoint
writes", "no test-set selection", "short runs exit 0", "clear messages"."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from src.callbacks.checkpoint import CheckpointWriteError
from src.data import ReIDDataModule
from src.data.validation import DataValidationError
from src.train import train
from src.utils import sweep_metric_value
from src.utils import utils as utils_module
from src.utils.config import quote_home_paths
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def _copy_a(tiny_data_root: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_data_root / "synthetic" / "A", dest))


def _market_overrides(tiny_data_root: Path, root: Path) -> list[str]:
    base = [o for o in tiny_overrides(tiny_data_root) if "preset" not in o]
    return [*base, "data=market1501", f"data.source.root={root}", "trainer.max_epochs=1"]


def _no_step(monkeypatch) -> None:
    """Fail the test if a training step runs."""

    def step(*args, **kwargs):
        raise AssertionError("training started")

    from src.systems.triplet_module import TripletReIDModule

    monkeypatch.setattr(TripletReIDModule, "training_step", step)


def test_empty_query_folder_fails_within_seconds_naming_query(
    make_cfg, tiny_data_root, tmp_path, monkeypatch
):
    root = _copy_a(tiny_data_root, tmp_path / "market")
    for f in (root / "query").iterdir():
        f.unlink()
    _no_step(monkeypatch)
    cfg = make_cfg(_market_overrides(tiny_data_root, root))
    start = time.perf_counter()
    with pytest.raises(DataValidationError, match=r"test split\): the query split is empty"):
        train(cfg)
    assert time.perf_counter() - start < 30
    assert not Path(cfg.paths.output_dir, "checkpoints").exists()


def test_test_split_without_cross_camera_match_fails_before_training(
    make_cfg, tiny_data_root, tmp_path, monkeypatch
):
    """Every gallery image of the queries' identities in the query's own camera: nothing can be
    evaluated (the check used to print OK and training ran to the first validation)."""
    root = _copy_a(tiny_data_root, tmp_path / "market")
    query_cams = {}
    for f in (root / "query").glob("*.jpg"):
        pid, cam = f.name.split("_")[:2]
        query_cams.setdefault(pid, set()).add(cam)
    for f in (root / "bounding_box_test").glob("*.jpg"):
        pid, cam = f.name.split("_")[:2]
        if pid in query_cams:
            f.rename(f.with_name(f.name.replace(cam, sorted(query_cams[pid])[0], 1)))
    for f in (root / "query").glob("*.jpg"):  # keep one query camera per identity
        pid, cam = f.name.split("_")[:2]
        if cam != sorted(query_cams[pid])[0]:
            f.unlink()
    _no_step(monkeypatch)
    with pytest.raises(
        DataValidationError, match="has a gallery image of its identity from another"
    ):
        train(make_cfg(_market_overrides(tiny_data_root, root)))


def test_folder_data_without_camera_ids_fails_before_training(make_cfg, tiny_data_root, tmp_path):
    root = tmp_path / "folder"
    src_root = tiny_data_root / "synthetic" / "A"
    layout = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, folder in layout.items():
        for f in (src_root / folder).glob("*.jpg"):
            pid = f.name.split("_")[0]
            dest = root / split / pid / f"img{len(list((root / split).glob('*/*')))}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    base = [o for o in tiny_overrides(tiny_data_root) if "preset" not in o]
    cfg = make_cfg([*base, "data=custom", f"data.source.root={root}"])
    with pytest.raises(DataValidationError, match=r"same camera id.*c<N> token"):
        train(cfg)


def test_verify_images_lists_every_unreadable_file(tiny_data_root, tmp_path):
    root = _copy_a(tiny_data_root, tmp_path / "market")
    bad = sorted((root / "bounding_box_train").glob("*.jpg"))[:2]
    for f in bad:
        f.write_bytes(b"\xff\xd8 not a jpeg")
    dm = ReIDDataModule({"name": "market1501", "root": str(root)}, batch_size=8, num_instances=4)
    dm.setup()  # off by default: parsing does not decode
    dm = ReIDDataModule(
        {"name": "market1501", "root": str(root)}, batch_size=8, num_instances=4, verify_images=True
    )
    with pytest.raises(DataValidationError, match="2 of .* images cannot be decoded") as err:
        dm.setup()
    assert all(str(f) in str(err.value) for f in bad)


# ------------------------------------------------------------------ the validation split
def _tiny_dm(tiny_data_root: Path, **kwargs) -> ReIDDataModule:
    spec = {"name": "synthetic", "root": str(tiny_data_root / "synthetic" / "A"), "preset": "tiny"}
    options = {"height": 32, "width": 16, "batch_size": 8, "num_instances": 2, "num_workers": 0}
    dm = ReIDDataModule(spec, **{**options, **kwargs})
    dm.setup()
    return dm


def test_the_default_run_holds_out_a_tenth_of_the_identities(make_cfg):
    assert make_cfg([]).data.val_ids == 0.1


def test_validation_split_holds_out_training_identities(tiny_data_root):
    full = _tiny_dm(tiny_data_root)
    assert full.val_is_test and full.eval_records("val") == full.eval_records("test")
    dm = _tiny_dm(tiny_data_root, val_ids=3, seed=0)
    query, gallery = dm.eval_records("val")
    assert not dm.val_is_test and dm.num_classes == full.num_classes - 3
    held = {r.img_path for r in (*query, *gallery)}
    train = {r.img_path for r in dm.source_train}
    assert held and not held & train and held | train == {r.img_path for r in full.source_train}
    assert len({r.pid for r in (*query, *gallery)}) == 3
    assert sorted({r.pid for r in dm.source_train}) == list(range(dm.num_classes))
    # one query per camera of each held-out identity, every query with a cross-camera match
    assert len({(q.pid, q.camid) for q in query}) == len(query) > 0
    # the validation loader serves the split, the test loader the test split
    val_idx = torch.cat([b["index"] for b in dm.val_dataloader()])
    assert len(val_idx) == len(query) + len(gallery)
    assert sum(len(b["index"]) for b in dm.test_dataloader()) == sum(
        map(len, full.eval_records("test"))
    )
    # deterministic by seed, and the seed matters
    again = _tiny_dm(tiny_data_root, val_ids=3, seed=0).eval_records("val")
    assert again == (query, gallery)
    other = _tiny_dm(tiny_data_root, val_ids=3, seed=1).eval_records("val")
    assert {r.pid for r in other[1]} != {r.pid for r in gallery}
    assert _tiny_dm(tiny_data_root, val_ids=0.25).num_classes == full.num_classes - 3


@pytest.mark.parametrize("bad", [12, 11, -1, "some"])
def test_validation_split_errors_name_the_key(tiny_data_root, bad):
    with pytest.raises(ValueError, match="data.val_ids"):
        _tiny_dm(tiny_data_root, val_ids=bad)


def test_test_ckpt_best_needs_a_validation_split(make_cfg, tiny_data_root, monkeypatch):
    _no_step(monkeypatch)
    cfg = make_cfg(tiny_overrides(tiny_data_root) + ["data.val_ids=0", "test_ckpt=best"])
    with pytest.raises(
        ValueError, match="test_ckpt=best would report the checkpoint chosen on the test"
    ):
        train(cfg)


def test_test_ckpt_best_tests_the_best_validation_checkpoint(make_cfg, tiny_data_root):
    overrides = tiny_overrides(tiny_data_root) + [
        "data.val_ids=3",
        "test_ckpt=best",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "scheduler.warmup_epochs=1",
        "scheduler.milestones=[1]",
    ]
    metrics, objects = train(make_cfg(overrides))
    best = objects["trainer"].callbacks
    (cb,) = [c for c in best if getattr(c, "monitor", None) == "val/mAP"]
    assert Path(cb.best_model_path).name.startswith("best_epoch_")
    assert objects["trainer"].ckpt_path == cb.best_model_path  # what trainer.test loaded
    assert "test/mAP" in metrics


# ------------------------------------------------------------------ checkpoint writes
def test_unwritable_checkpoint_folder_fails_at_start(
    make_cfg, tiny_data_root, tmp_path, monkeypatch
):
    _no_step(monkeypatch)
    cfg = make_cfg(tiny_overrides(tiny_data_root) + ["trainer.max_epochs=1"])
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint folder should be")
    with open_dict(cfg):
        cfg.callbacks.model_checkpoint.dirpath = str(blocker / "checkpoints")
    with pytest.raises(CheckpointWriteError, match="not_a_dir/checkpoints is not writable"):
        train(cfg)


def test_a_silently_failed_save_stops_the_run(make_cfg, tiny_data_root, monkeypatch):
    """Lightning's _atomic_save swallows PermissionError: a save that leaves no file must stop
    the run with the path, not train on."""
    from lightning.pytorch import Trainer

    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, *a, **k: None)
    cfg = make_cfg(tiny_overrides(tiny_data_root) + ["trainer.max_epochs=2"])
    with pytest.raises(CheckpointWriteError, match=r"checkpoints/last\.ckpt was not written"):
        train(cfg)


# ------------------------------------------------------------------ short and debug runs
def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args, f"paths.log_dir={tmp_path}/logs"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra, validates",
    [(["trainer.max_epochs=1"], False), (["debug=fdr"], True)],
    ids=["max_epochs=1", "debug=fdr"],
)
def test_short_runs_exit_0(extra, validates, tiny_data_root, tmp_path):
    """A run that never validates (1 epoch, validation every 2nd) has no val/mAP_best: a
    warning, exit status 0 (it used to train, test, write metrics.json and exit 1)."""
    proc = _cli([*tiny_overrides(tiny_data_root), *extra], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = "optimized_metric='val/mAP_best' was not logged" in proc.stdout + proc.stderr
    assert warned != validates
    assert list(tmp_path.glob("logs/*/runs/*/metrics.json"))


def test_missing_sweep_metric_fails_only_for_an_optimising_sweeper(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        assert sweep_metric_value({"train/loss": 1.0}, "val/mAP_best") is None
    assert "was not logged" in caplog.text
    assert sweep_metric_value({"val/mAP_best": 0.5}, "val/mAP_best") == 0.5
    monkeypatch.setattr(utils_module, "_sweeper_optimises", lambda: True)
    with pytest.raises(KeyError, match="val/mAP_best"):
        sweep_metric_value({"train/loss": 1.0}, "val/mAP_best")


def test_trainer_keys_settable_without_plus(make_cfg, tiny_data_root):
    cfg = make_cfg(
        tiny_overrides(tiny_data_root)
        + [
            "trainer.max_steps=3",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.accumulate_grad_batches=2",
            "trainer.gradient_clip_val=1.0",
            "trainer.deterministic=true",
            "trainer.benchmark=false",
            "test=false",
        ]
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 3 and trainer.accumulate_grad_batches == 2
    assert trainer.gradient_clip_val == 1.0
    assert make_cfg(
        tiny_overrides(tiny_data_root) + ["trainer.fast_dev_run=true"]
    ).trainer.fast_dev_run


# ------------------------------------------------------------------ messages
def test_a_string_for_a_number_names_the_key(make_cfg, tiny_data_root, monkeypatch):
    _no_step(monkeypatch)
    with pytest.raises(TypeError, match=r"loss\.margin='abc': expected a number"):
        train(make_cfg(tiny_overrides(tiny_data_root) + ["loss.margin=abc"]))
    with pytest.raises(TypeError, match=r"data\.batch_size=16\.5: expected an integer"):
        train(make_cfg(tiny_overrides(tiny_data_root) + ["data.batch_size=16.5"]))
    with pytest.raises(
        ValueError, match=r"gives P=1 identity per batch: P x K batches need P >= 2"
    ):
        train(make_cfg(tiny_overrides(tiny_data_root) + ["data.batch_size=4"]))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short"], ids=["empty", "truncated"])
def test_bad_ckpt_path_names_the_file(content, make_cfg, tiny_data_root, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(content)
    cfg = make_cfg(tiny_overrides(tiny_data_root) + [f"ckpt_path={bad}"])
    with pytest.raises(ValueError, match=r"ckpt_path=.*broken\.ckpt is"):
        train(cfg)


def test_home_paths_in_overrides(tiny_data_root, tmp_path, monkeypatch):
    assert quote_home_paths(["prog", "paths.data_dir=~/datasets", "a=b", "x='~/q'"]) == [
        "prog",
        "paths.data_dir='~/datasets'",
        "a=b",
        "x='~/q'",
    ]
    monkeypatch.setenv("HOME", str(tiny_data_root))
    dm = ReIDDataModule(
        {"name": "synthetic", "root": "~/synthetic/A", "preset": "tiny"},
        height=32, width=16, batch_size=8, num_instances=2,
    )  # fmt: skip
    dm.setup()
    assert dm.source_data.root == str(tiny_data_root / "synthetic" / "A")


def test_warnings_for_oversubscribed_ddp_and_short_identities(make_cfg, tiny_data_root, caplog):
    from src.utils.config import validate_config

    cfg = make_cfg(
        tiny_overrides(tiny_data_root)
        + ["trainer=ddp_cpu", f"trainer.devices={(os.cpu_count() or 1) + 1}"]
    )
    with caplog.at_level(logging.WARNING):
        validate_config(cfg)
    assert "CPU processes on" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _tiny_dm(tiny_data_root, num_instances=8, batch_size=16)
    assert "fewer than K=data.num_instances=8 images" in caplog.text
