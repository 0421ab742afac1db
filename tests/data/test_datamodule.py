"""ReIDDataModule in both modes: batch structure, keys, shapes, cycling, DDP sharding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader

from src.data import ReIDDataModule
from src.data.samplers import DistributedPKSampler, ShardedSampler
from src.data.seeding import SeededSampler

H, W = 32, 16


def _spec(root: Path, domain: str) -> dict[str, Any]:
    return {"name": "synthetic", "root": str(root), "domain": domain, "preset": "tiny"}


def _dm(tiny_synth, target: bool = False, **kwargs: Any) -> ReIDDataModule:
    defaults: dict[str, Any] = dict(height=H, width=W, batch_size=8, num_instances=4,
                                    num_workers=0, test_batch_size=16)  # fmt: skip
    dm = ReIDDataModule(
        _spec(tiny_synth["A"], "A"),
        _spec(tiny_synth["B"], "B") if target else None,
        **{**defaults, **kwargs},
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _check_pk(pids: torch.Tensor, P: int, K: int) -> None:
    groups = pids.view(P, K)
    assert (groups == groups[:, :1]).all() and groups[:, 0].unique().numel() == P


def test_supervised_batches(tiny_synth) -> None:
    dm = _dm(tiny_synth)
    assert dm.num_classes == 12 and dm.num_target_train is None and dm.target_data is None
    assert dm.eval_data is dm.source_data
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, SeededSampler) and loader.drop_last
    assert isinstance(loader.sampler.sampler, DistributedPKSampler)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for raw in batches:
        # uint8 images and their drawn augmentation, applied batch-wise after the transfer
        assert set(raw) == {"img", "aug", "aug_norm", "pid", "camid", "index"}
        assert raw["img"].dtype == torch.uint8 and raw["aug"].shape == (8, 7)
        batch = dm.on_after_batch_transfer(raw, 0)
        assert set(batch) == {"img", "pid", "camid", "index"}
        assert batch["img"].shape == (8, 3, H, W) and batch["img"].dtype == torch.float32
        assert batch["pid"].dtype == batch["camid"].dtype == batch["index"].dtype == torch.int64
        _check_pk(batch["pid"], P=2, K=4)
        train = dm.source_data.train
        assert all(
            train[i].pid == p for i, p in zip(batch["index"].tolist(), batch["pid"].tolist())
        )
        assert all(
            train[i].camid == c for i, c in zip(batch["index"].tolist(), batch["camid"].tolist())
        )


def test_eval_loader_query_then_gallery(tiny_synth) -> None:
    dm = _dm(tiny_synth)
    data = dm.eval_data
    batches = list(dm.val_dataloader())
    cat = {k: torch.cat([b[k] for b in batches]) for k in ("pid", "camid", "index", "is_query")}
    n_q, n_g = len(data.query), len(data.gallery)
    assert cat["index"].tolist() == list(range(n_q + n_g))  # unique over query + gallery
    assert cat["is_query"].dtype == torch.bool
    assert cat["is_query"].tolist() == [True] * n_q + [False] * n_g
    assert cat["pid"].tolist() == [r.pid for r in data.query + data.gallery]
    assert cat["camid"].tolist() == [r.camid for r in data.query + data.gallery]
    assert (cat["pid"][~cat["is_query"]] == 0).any()  # distractors in the gallery
    test = list(dm.test_dataloader())
    assert torch.equal(torch.cat([b["img"] for b in test]), torch.cat([b["img"] for b in batches]))


def test_domain_adaptation_combined_loader_cycles_target(tiny_synth) -> None:
    dm = _dm(tiny_synth, target=True, target_batch_size=16)
    assert dm.num_target_train == len(dm.target_data.train)
    assert dm.num_target_cameras == 4 and dm.eval_data is dm.target_data
    combined = dm.train_dataloader()
    assert isinstance(combined, CombinedLoader) and combined._mode == "max_size_cycle"
    source_len = len(combined.iterables["source"])
    target_len = len(combined.iterables["target"])
    assert target_len < source_len  # so the target cycles within the epoch
    steps = []
    for raw, _, _ in iter(combined):
        batch = dm.on_after_batch_transfer(raw, 0)
        assert set(batch) == {"source", "target"}
        assert batch["source"]["img"].shape == (8, 3, H, W)
        _check_pk(batch["source"]["pid"], P=2, K=4)
        tgt = batch["target"]
        assert set(tgt) == {"img", "pid", "camid", "index"} and tgt["img"].shape == (16, 3, H, W)
        records = dm.target_data.train
        assert all(
            records[i].camid == c for i, c in zip(tgt["index"].tolist(), tgt["camid"].tolist())
        )
        steps.append(tgt["index"])
    assert len(steps) == source_len  # one epoch = one pass over the source
    passes = [torch.cat(steps[i : i + target_len]) for i in range(0, source_len, target_len)]
    assert len(passes) >= 2 and not torch.equal(passes[0], passes[1][: len(passes[0])])
    for p in passes:  # within a pass, each target image at most once
        assert p.unique().numel() == p.numel()


def test_target_longer_than_source_is_cut_to_the_source(tiny_synth) -> None:
    dm = _dm(tiny_synth, target=True, batch_size=16, target_batch_size=4)
    combined = dm.train_dataloader()
    source_len = len(combined.iterables["source"])
    iterator = iter(combined)
    assert len(combined.iterables["target"]) == source_len == len(combined)
    assert sum(1 for _ in iterator) == source_len


def test_random_source_sampler(tiny_synth) -> None:
    dm = _dm(tiny_synth, target=True, source_sampler="random")
    source = dm.train_dataloader().iterables["source"]
    assert isinstance(source.sampler.sampler, ShardedSampler)
    idx = torch.cat([b["index"] for b in source])
    assert idx.unique().numel() == idx.numel() == len(source) * 8


def test_target_init_loader_visits_every_sample_once(tiny_synth) -> None:
    dm = _dm(tiny_synth, target=True, target_batch_size=16)
    loader = dm.target_init_dataloader()
    batches = list(loader)
    # iterated outside the Trainer (MAR / cluster contrast initialisation): finished float
    # images from the per-sample augmentation, not the uint8 + parameters of the batched one
    assert all(b["img"].dtype == torch.float32 and "aug" not in b for b in batches)
    idx = torch.cat([b["index"] for b in batches])
    assert sorted(idx.tolist()) == list(range(dm.num_target_train))
    assert idx.tolist() != sorted(idx.tolist())  # shuffled
    with pytest.raises(RuntimeError, match="target"):
        _dm(tiny_synth).target_init_dataloader()


def test_two_simulated_ranks(tiny_synth) -> None:
    ranks = []
    for rank in (0, 1):
        dm = _dm(tiny_synth, target=True, target_batch_size=4)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what Lightning provides
        ranks.append(dm)
    combined = [dm.train_dataloader() for dm in ranks]
    lengths = [len(c.iterables["source"]) for c in combined]
    assert lengths[0] == lengths[1] and [len(c.iterables["target"]) for c in combined] == lengths
    src = [list(c.iterables["source"]) for c in combined]
    for b0, b1 in zip(*src):
        _check_pk(b0["pid"], 2, 4)
        _check_pk(b1["pid"], 2, 4)
        assert not set(b0["pid"].tolist()) & set(b1["pid"].tolist())
    tgt = [torch.cat([b["index"] for b in c.iterables["target"]]) for c in combined]
    assert len(tgt[0]) == len(tgt[1]) and not set(tgt[0].tolist()) & set(tgt[1].tolist())
    evals = [torch.cat([b["index"] for b in dm.val_dataloader()]) for dm in ranks]
    n_eval = len(ranks[0].eval_data.query) + len(ranks[0].eval_data.gallery)
    assert len(evals[0]) == len(evals[1]) == (n_eval + 1) // 2
    assert set(torch.cat(evals).tolist()) == set(range(n_eval))  # padding de-duplicates by index
    inits = [torch.cat([b["index"] for b in dm.target_init_dataloader()]) for dm in ranks]
    assert set(torch.cat(inits).tolist()) == set(range(ranks[0].num_target_train))


def test_auto_normalisation_per_domain_and_state_dict(tiny_synth) -> None:
    dm = _dm(tiny_synth, target=True, mean="auto", std="auto")
    (mean_a, _), (mean_b, _) = dm.stats["source"], dm.stats["target"]
    assert sum(mean_b) < sum(mean_a)  # domain B is darker
    assert (Path(tiny_synth["A"]) / ".marlin_mean_std.json").is_file()
    # test images of the evaluation (target) domain are normalised with the target statistics
    x = torch.cat([b["img"] for b in dm.val_dataloader()])
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=0.15, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=0.15, rtol=0)
    list(dm.train_dataloader())
    state = dm.state_dict()
    restored = _dm(tiny_synth, target=True)
    restored.load_state_dict(state)
    assert restored.stats == dm.stats
    combined = restored.train_dataloader()
    assert combined.iterables["source"].sampler.state_dict() == state["samplers"]["source"]


def test_colour_augmentation_reaches_the_train_loaders_only(tiny_synth) -> None:
    grey = dict(mean=[0.5] * 3, std=[0.25] * 3, grayscale_p=1.0, random_erasing_p=0.0,
                color_jitter=[0.2, 0.2, 0.2, 0.05], color_jitter_p=1.0)  # fmt: skip
    dm = _dm(tiny_synth, target=True, **grey)
    batch, _, _ = next(iter(dm.train_dataloader()))
    for domain in ("source", "target"):
        x = batch[domain]["img"]
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    x = next(iter(dm.val_dataloader()))["img"]  # evaluation images keep their colours
    assert not torch.equal(x[:, 0], x[:, 1])


def test_bad_arguments(tiny_synth) -> None:
    with pytest.raises(ValueError, match="'name' and 'root'"):
        ReIDDataModule({"root": "x"})
    with pytest.raises(ValueError, match="source_sampler"):
        ReIDDataModule(_spec(tiny_synth["A"], "A"), source_sampler="pks")
    with pytest.raises(ValueError, match="multiple of num_instances"):
        ReIDDataModule(_spec(tiny_synth["A"], "A"), batch_size=30, num_instances=4)
    with pytest.raises(ValueError, match="both be 'auto'"):
        ReIDDataModule(_spec(tiny_synth["A"], "A"), mean="auto")
    with pytest.raises(RuntimeError, match="setup"):
        _ = ReIDDataModule(_spec(tiny_synth["A"], "A")).num_classes
    dm = _dm(tiny_synth, target=True, target_batch_size=1000)
    with pytest.raises(ValueError, match="target train split"):
        dm.train_dataloader()


class _Recorder(L.LightningModule):
    """Records the target indices of every step (one float parameter to optimise)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch["target"]["index"].tolist()))
        return (self.w * batch["source"]["img"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no")
def test_lightning_fit_epochs_follow_the_source(tiny_synth, tmp_path: Path) -> None:
    dm = ReIDDataModule(_spec(tiny_synth["A"], "A"), _spec(tiny_synth["B"], "B"), height=H,
                        width=W, batch_size=8, target_batch_size=16, num_workers=0)  # fmt: skip
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    # Lightning called set_epoch on both samplers of the combined loader
    assert dm._samplers["source"].epoch == dm._samplers["target"].epoch == 1
    source_len = len(dm._samplers["source"]) // 8
    per_epoch = [[idx for e, idx in model.seen if e == epoch] for epoch in (0, 1)]
    assert [len(p) for p in per_epoch] == [source_len, source_len]
    assert per_epoch[0] != per_epoch[1]  # reshuffled by the epoch


def test_world_from_torch_distributed_without_trainer(tiny_synth, monkeypatch) -> None:
    import src.data.datamodule as datamodule

    dm = _dm(tiny_synth)
    assert dm._world() == (1, 0)
    monkeypatch.setattr(datamodule.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(datamodule.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(datamodule.dist, "get_rank", lambda: 2)
    sampler = dm.train_dataloader().sampler.sampler
    assert (sampler.num_replicas, sampler.rank) == (3, 2)
    assert (dm.val_dataloader().sampler.num_replicas, dm.val_dataloader().sampler.rank) == (3, 2)


def test_worker_processes_cycle_with_persistent_workers(tiny_synth) -> None:
    dm = _dm(tiny_synth, target=True, target_batch_size=16, num_workers=1)
    combined = dm.train_dataloader()
    assert combined.iterables["target"].persistent_workers
    iterator = iter(combined)
    target = [batch["target"]["index"] for batch, _, _ in iterator]
    assert len(target) == len(combined)  # the target loader was re-iterated in its workers
    n = len(combined.iterables["target"])
    assert not torch.equal(torch.cat(target[:n]), torch.cat(target[n : 2 * n]))
