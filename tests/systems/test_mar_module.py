"""MARModule (src/systems/mar_module.py): network and checkpoint checks, the initialisation (exact
T0 and centres, cache), state restored on resume, the finite check."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from src.losses.mar import DiscriminativeLoss, JointLoss, MultilabelLoss
from src.systems import MARModule
from tests.systems._mar_helpers import mar_net, save_stage1

K = 5  # source identities = agents
N_TARGET = 24
CAMS = 3


def make_module(tmp_path: Path | None = None, net=None, **kwargs) -> MARModule:
    defaults = {
        "net": net or mar_net(),
        "optimizer": partial(torch.optim.SGD, lr=2e-4, momentum=0.9, weight_decay=0.025),
        "joint_loss": JointLoss(1.0),
        "multilabel_loss": partial(MultilabelLoss, batch_size=32),
        "discriminative_loss": DiscriminativeLoss(mining_ratio=0.05),
        "num_classes": K,
        "num_target_train": N_TARGET,
        "num_target_cameras": CAMS,
        "init_cache_dir": None if tmp_path is None else str(tmp_path / "cache"),
    }
    defaults.update(kwargs)
    return MARModule(**defaults)


class FakeTargetData:
    """Stands in for ReIDDataModule in the init: a fixed list of target batches."""

    def __init__(self, seed: int = 0, root: str = "data/synthetic/B") -> None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(N_TARGET, generator=g)
        self.images = torch.randn(N_TARGET, 3, 32, 16, generator=g)
        self.cams = torch.arange(N_TARGET) % CAMS
        self.batches = [
            {"img": self.images[rows], "camid": self.cams[rows], "index": rows}
            for rows in order.split(10)
        ]
        self.target_spec = {"name": "synthetic", "root": root}
        self.height, self.width = 32, 16
        self.stats = {"target": ([0.5] * 3, [0.2] * 3)}
        self.calls = 0

    def target_init_dataloader(self, augment: bool = True):
        self.calls += 1
        return self.batches


def reference_init(module: MARModule, data: FakeTargetData):
    """T0 by sorting every pair's agreement, centres from MultilabelLoss.init_centers."""
    module.net.eval()
    with torch.no_grad():
        feats = torch.nn.functional.normalize(module.net.embed(data.images), dim=1)
        logits = 30.0 * feats @ module.agents.t()
    ml = torch.softmax(logits.double(), dim=1).numpy()
    agreements = np.sort(1 - pdist(ml, "minkowski", p=1) / 2)[::-1]
    k = max(1, int(len(agreements) * 0.05))
    cml = MultilabelLoss(batch_size=1, num_classes=K)
    cml.init_centers(torch.log_softmax(logits, dim=1), data.cams)
    return agreements[k - 1], cml.center_mean, cml.center_std


# ----------------------------------------------------------------------------------------------
# construction and pretrained weights
# ----------------------------------------------------------------------------------------------
def test_network_and_data_checks():
    with pytest.raises(ValueError, match="model.neck=none"):
        make_module(net=mar_net(neck="bnneck"))
    with pytest.raises(ValueError, match="classifier_bias=false"):
        make_module(net=mar_net(classifier_bias=True))
    with pytest.raises(ValueError, match="data.target"):
        make_module(num_target_train=0)
    with pytest.raises(ValueError, match="init_mode"):
        make_module(init_mode="fast")
    module = make_module()
    assert module.memory.shape == (N_TARGET, K) and not module.memory_visited.any()
    assert module.multilabel_loss.num_views == CAMS
    assert module.multilabel_loss.center_mean.shape == (K,)
    assert not module.initialised
    # only primitives are saved as hyper-parameters (safe weights_only loading)
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in module.hparams.values())


def test_default_losses_are_the_paper_ones():
    module = MARModule(
        net=mar_net(),
        optimizer=partial(torch.optim.SGD, lr=2e-4),
        num_classes=K,
        num_target_train=N_TARGET,
        num_target_cameras=CAMS,
    )
    assert module.joint_loss.margin == 1.0
    assert module.discriminative_loss.mining_ratio == 0.005
    assert module.multilabel_loss.moment == pytest.approx(0.0368)
    assert (module.weights.lambda_cml, module.weights.lambda_ral, module.weights.beta) == (
        2e-4,
        50.0,
        0.2,
    )


def test_cml_momentum_follows_the_global_batch():
    """cml_batch_size=None: η = (source + target per rank) × world size / 10000 at train start;
    an explicit value (or a factory with its own batch_size) is kept."""
    from types import SimpleNamespace

    def started(world: int, **kwargs) -> MARModule:
        module = make_module(multilabel_loss=partial(MultilabelLoss), **kwargs)
        data = SimpleNamespace(batch_size=46, target_batch_size=46)
        module._trainer = SimpleNamespace(datamodule=data, world_size=world)
        module._set_cml_momentum()
        return module

    assert started(4).multilabel_loss.moment == pytest.approx(368 / 10000)  # 46 + 46 on 4 GPUs
    assert started(1).multilabel_loss.moment == pytest.approx(92 / 10000)
    assert started(4, cml_batch_size=100).multilabel_loss.moment == pytest.approx(0.01)
    fixed = make_module()  # partial(MultilabelLoss, batch_size=32): its own value
    fixed._trainer = SimpleNamespace(datamodule=None, world_size=4)
    fixed._set_cml_momentum()
    assert fixed.multilabel_loss.moment == pytest.approx(32 / 10000)
    with pytest.raises(ValueError, match="cml_batch_size"):
        module = make_module(multilabel_loss=partial(MultilabelLoss))
        module._trainer = SimpleNamespace(datamodule=None, world_size=1)
        module._set_cml_momentum()


@pytest.mark.parametrize("lightning", [True, False])
def test_load_pretrained(tmp_path, lightning):
    path = save_stage1(tmp_path / "stage1.ckpt", seed=3, lightning=lightning)
    module = make_module()
    module.load_pretrained(path)
    saved = torch.load(path, weights_only=True)
    saved = saved["state_dict"] if lightning else {f"net.{k}": v for k, v in saved.items()}
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, saved[f"net.{name}"]), name


def test_pretrained_errors_name_the_path(tmp_path):
    module = make_module()
    with pytest.raises(ValueError, match="system.pretrained_ckpt is not set"):
        module.load_pretrained(None)
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        module.load_pretrained(missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=str(garbage)):
        module.load_pretrained(garbage)
    wrong_k = save_stage1(tmp_path / "k.ckpt", num_classes=K + 2)
    with pytest.raises(ValueError, match=rf"{wrong_k}.*{K + 2} agents"):
        module.load_pretrained(wrong_k)
    wrong_arch = save_stage1(tmp_path / "arch.ckpt", local_branch=True)
    with pytest.raises(ValueError, match=rf"{wrong_arch}.*does not match"):
        module.load_pretrained(wrong_arch)
    no_classifier = tmp_path / "nocls.ckpt"
    torch.save({"state_dict": {"net.backbone.conv1.weight": torch.zeros(1)}}, no_classifier)
    with pytest.raises(ValueError, match="no classifier"):
        module.load_pretrained(no_classifier)


# ----------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------
def test_init_matches_brute_force_and_cache_skips_recomputation(tmp_path, monkeypatch):
    ckpt = save_stage1(tmp_path / "stage1.ckpt", seed=1)
    data = FakeTargetData()
    module = make_module(tmp_path)
    module.load_pretrained(ckpt)
    module.initialise_mar_state(data)
    assert module.initialised and data.calls == 1
    assert module.net.training  # back in train mode after the eval-mode pass
    threshold, center_mean, center_std = reference_init(module, data)
    assert float(module.discriminative_loss.threshold) == pytest.approx(threshold, abs=1e-6)
    torch.testing.assert_close(module.multilabel_loss.center_mean, center_mean)
    torch.testing.assert_close(module.multilabel_loss.center_std, center_std)
    assert module.multilabel_loss.initialized and module.discriminative_loss.initialized
    assert len(list((tmp_path / "cache").glob("mar_init_*.pt"))) == 1

    # same checkpoint + data + settings: the cache is hit, nothing is recomputed
    again = make_module(tmp_path)
    again.load_pretrained(ckpt)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(MARModule, "compute_init_state", fail)
    again.initialise_mar_state(data)
    assert data.calls == 1
    assert torch.equal(again.discriminative_loss.threshold, module.discriminative_loss.threshold)
    assert torch.equal(again.multilabel_loss.center_mean, module.multilabel_loss.center_mean)
    assert torch.equal(again.multilabel_loss.center_std, module.multilabel_loss.center_std)
    monkeypatch.undo()

    # another mining ratio (or checkpoint, or target data) is a miss
    other = make_module(tmp_path, discriminative_loss=DiscriminativeLoss(mining_ratio=0.1))
    other.load_pretrained(ckpt)
    other.initialise_mar_state(data)
    assert data.calls == 2
    assert len(list((tmp_path / "cache").glob("mar_init_*.pt"))) == 2


class _Records:
    def __init__(self, records):
        self.train = records


def _key_data(tmp_path: Path) -> FakeTargetData:
    """FakeTargetData with what ReIDDataModule offers the cache key: target records on disk,
    augmentation settings, seeds, loader sizes."""
    from src.data.records import ReIDRecord

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    records = []
    for i in range(4):
        path = folder / f"{i}.jpg"
        if not path.exists():
            path.write_bytes(bytes([i]) * 10)
        records.append(ReIDRecord(str(path), i % 2, i % 3, i))
    data = FakeTargetData()
    data.target_data = _Records(records)
    data.augment = {
        "flip_p": 0.5,
        "pad": 10,
        "random_erasing_p": 0.5,
        "erasing_value": "mean",
        "interpolation": "bilinear",
        "color_jitter": (0.0, 0.0, 0.0, 0.0),
        "color_jitter_p": 0.0,
        "grayscale_p": 0.0,
    }
    data.seed, data.target_batch_size, data.num_workers = 0, 10, 2
    return data


def test_cache_key_covers_every_input_of_the_init(tmp_path, monkeypatch):
    """Changing any one input of the initialisation (weights, architecture flags that do not
    change the checkpoint bytes, target data, image pipeline, augmentation, seeds, loader,
    world size, precision, MAR settings) gives another cache key: a hit cannot serve stale
    T0/centres."""
    import copy
    import dataclasses
    from types import SimpleNamespace

    from src.systems import mar_init

    ckpt = save_stage1(tmp_path / "stage1.ckpt", seed=1)
    other_ckpt = save_stage1(tmp_path / "other.ckpt", seed=2)

    def key(data=None, ckpt_path=ckpt, seed=0, **module_kwargs):
        module = make_module(tmp_path, **module_kwargs)
        module.load_pretrained(ckpt_path)
        if data is None:
            data = _key_data(tmp_path)
        torch.manual_seed(seed)
        return module._cache_key(data)

    def data_with(**changes):
        data = _key_data(tmp_path)
        for name, value in changes.items():
            if name in data.augment:
                data.augment = {**data.augment, name: value}
            else:
                setattr(data, name, value)
        return data

    base = key()
    assert base == key()  # deterministic
    touched = _key_data(tmp_path)
    relabelled = copy.deepcopy(touched)
    first = relabelled.target_data.train[0]
    relabelled.target_data.train[0] = dataclasses.replace(first, pid=first.pid + 1)
    variants = {
        "checkpoint": key(ckpt_path=other_ckpt),
        "last_relu": key(net=mar_net(backbone={"name": "resnet18", "last_stride": 2})),
        "last_stride": key(
            net=mar_net(backbone={"name": "resnet18", "last_stride": 1, "last_relu": False})
        ),
        "run seed": key(seed=1),
        "data seed": key(data_with(seed=1)),
        "target root": key(FakeTargetData(root="data/synthetic/C")),
        "record labels": key(relabelled),
        "size": key(data_with(height=64)),
        "stats": key(data_with(stats={"target": ([0.4] * 3, [0.2] * 3)})),
        "batch size": key(data_with(target_batch_size=20)),
        "workers": key(data_with(num_workers=0)),
        "init_augment": key(init_augment=False),
        "scale": key(scale=20.0),
        "mining ratio": key(discriminative_loss=DiscriminativeLoss(mining_ratio=0.1)),
        "init mode": key(init_mode="sampled"),
        "sampled pairs": key(init_mode="sampled", init_sampled_pairs=1000),
    }
    for name, value in (
        ("flip_p", 0.0),
        ("pad", 0),
        ("random_erasing_p", 0.0),
        ("erasing_value", "random"),
        ("interpolation", "bicubic"),
        ("color_jitter", (0.1, 0.0, 0.0, 0.0)),
        ("color_jitter_p", 0.5),
        ("grayscale_p", 0.1),
    ):
        variants[f"augmentation {name}"] = key(data_with(**{name: value}))
    # a target image rewritten on disk (size/mtime)
    Path(touched.target_data.train[2].img_path).write_bytes(b"changed image")
    variants["image file"] = key(_key_data(tmp_path))
    monkeypatch.setattr(mar_init, "dist_world", lambda: (2, 0))
    variants["world size"] = key()
    monkeypatch.undo()
    module = make_module(tmp_path)
    module.load_pretrained(ckpt)
    module._trainer = SimpleNamespace(precision="bf16-mixed")
    torch.manual_seed(0)
    variants["precision"] = module._cache_key(_key_data(tmp_path))

    for name, value in variants.items():
        assert value != base, name
    assert len(set(variants.values())) == len(variants)  # each input moves the key on its own


def test_sampled_init_is_close_to_exact(tmp_path):
    ckpt = save_stage1(tmp_path / "stage1.ckpt", seed=1)
    data = FakeTargetData()
    exact = make_module()
    exact.load_pretrained(ckpt)
    exact.initialise_mar_state(data)
    sampled = make_module(init_mode="sampled", init_sampled_pairs=50_000)
    sampled.load_pretrained(ckpt)
    sampled.initialise_mar_state(data)
    assert float(sampled.discriminative_loss.threshold) == pytest.approx(
        float(exact.discriminative_loss.threshold), abs=0.05
    )
    torch.testing.assert_close(
        sampled.multilabel_loss.center_mean, exact.multilabel_loss.center_mean
    )


def test_state_restored_exactly_from_a_checkpoint(tmp_path):
    ckpt = save_stage1(tmp_path / "stage1.ckpt", seed=2)
    module = make_module()
    module.load_pretrained(ckpt)
    module.initialise_mar_state(FakeTargetData())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rows = torch.tensor([0, 5, 7])
        module.memory[rows] = torch.softmax(torch.randn(3, K, generator=g), dim=1)
        module.memory_visited[rows] = True
        module.discriminative_loss.threshold.fill_(0.123)
        module.multilabel_loss.center_mean.add_(1.5)
    path = tmp_path / "stage2.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)

    fresh = make_module()
    assert not fresh.initialised and not fresh.discriminative_loss.initialized
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    for name, value in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    # the Python mirrors follow the buffers: a resumed run skips the init and can step
    assert fresh.initialised
    assert fresh.multilabel_loss.initialized and fresh.discriminative_loss.initialized


def test_nonfinite_state_stops_training():
    module = make_module()
    module._check_state()  # all finite: no error
    module._nonfinite[1] = True
    with pytest.raises(FloatingPointError, match="MDL threshold T"):
        module._check_state()


def test_init_rejects_nonfinite_statistics():
    module = make_module()
    bad = {
        "threshold": torch.tensor(float("nan")),
        "center_mean": torch.zeros(K),
        "center_std": torch.zeros(K),
    }
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.load_init_state(bad)


def test_fake_data_covers_every_index():
    data = FakeTargetData()
    seen = torch.cat([b["index"] for b in data.target_init_dataloader()])
    assert sorted(seen.tolist()) == list(range(N_TARGET))
