"""Benchmark: the default recipe's training step fed by the real loader vs from memory.

The default run (`python -m src.train`: experiment=synthetic_triplet, ResNet-18, 64x32, P x K =
16 x 4, 2 loader workers) on the generated synthetic domain A. Side by side, in one process:

* **in memory**: the batches of one epoch, transformed beforehand, fed from a list (the limit);
* **loader**: the `ReIDDataModule` train loader, JPEG decode every epoch, with the per-sample
  augmentation (``data.batch_augment=false``) or the batch-wise one (the default: the workers
  resize and draw each sample's parameters, the main process applies them to the batch);
* **loader + image cache**: the same with ``data.image_cache=true`` (decoded, resized images kept
  in shared memory after the first epoch); with the batch-wise augmentation this is the default
  run's feed.

Each is forward + backward + Adam step of the recipe's network and losses, timed over a whole
epoch after a warm-up epoch (so the loader's time includes any wait for data). Goal: the
default run's feed <= 1.05x the in-memory step. A per-image table times the transforms alone.

Run: ``python -m src.bench.image_pipeline [--quick]`` (``make bench`` runs it through
``python -m src.bench``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torchvision.transforms import v2 as T

from src.data.batch_augment import TrainAugmentParams, apply_train_augment
from src.data.image_dataset import DecodedImageCache
from src.data.image_io import read_image
from src.data.synthetic import SyntheticReID
from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from src.systems.steps import supervised_objective
from src.utils.config import data_kwargs_for, register_resolvers

__all__ = ["run"]

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def _compose(data_dir: Path, cache: bool, quick: bool, batch_augment: bool = True) -> Any:
    overrides = [
        f"paths.data_dir={data_dir}",
        f"data.image_cache={str(cache).lower()}",
        f"data.batch_augment={str(batch_augment).lower()}",
    ]
    if quick:
        overrides += ["+data.source.preset=tiny", "data.batch_size=16"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def _build(cfg: Any) -> tuple[Any, Any, torch.optim.Optimizer]:
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    system = hydra.utils.instantiate(
        cfg.system, _convert_="all", **data_kwargs_for(cfg.system, datamodule)
    )
    system.train()
    optimizer = torch.optim.Adam(system.parameters(), lr=float(cfg.optimizer.lr))
    return datamodule, system, optimizer


def _step(system: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    loss, _ = supervised_objective(
        system.net(batch["img"]),
        batch["pid"],
        system.metric_loss,
        system.ce_loss,
        system.loss_weights,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _epoch_ms(
    system: Any, optimizer: torch.optim.Optimizer, batches: Any, datamodule: Any = None
) -> float:
    """Mean ms per step over one pass of ``batches`` (a loader or a list); with `datamodule`,
    each batch first goes through its ``on_after_batch_transfer`` (the batched augmentation),
    as Lightning does before the step."""
    steps = 0
    start = time.perf_counter()
    for batch in batches:
        if datamodule is not None:
            batch = datamodule.on_after_batch_transfer(batch, 0)
        _step(system, optimizer, batch)
        steps += 1
    return 1000 * (time.perf_counter() - start) / max(steps, 1)


def _per_image_us(paths: list[str], transforms: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median µs per image of each (decode?, transform) pipeline, round-robin."""
    cached = [read_image(p) for p in paths]
    times: dict[str, list[float]] = {name: [] for name in transforms}
    for _ in range(repeats):
        for name, (decode, transform) in transforms.items():
            start = time.perf_counter()
            for i, path in enumerate(paths):
                transform(read_image(path) if decode else cached[i])
            times[name].append(1e6 * (time.perf_counter() - start) / len(paths))
    return {name: statistics.median(t) for name, t in times.items()}


def _cache_read_us(
    cache: DecodedImageCache, paths: list[str], transform: Any, as_array: bool = False
) -> float:
    """Median µs per image of a cached read (a PIL image, or the array the batch-wise
    parameter draw takes) and ``transform``, each sample seeded as the loader seeds it."""
    read = cache.get_array if as_array else cache.get
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i, path in enumerate(paths):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(i)
                transform(read(i, path))
        times.append(1e6 * (time.perf_counter() - start) / len(paths))
    return statistics.median(times)


def _augment_batch_ms(drawn: list[Any], pad: int, repeats: int = 20) -> float:
    """Median ms of :func:`apply_train_augment` on one collated batch of drawn samples."""
    img = torch.stack([d.img for d in drawn])
    params, norm = torch.stack([d.params for d in drawn]), torch.stack([d.norm for d in drawn])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        apply_train_augment(img, params, norm, pad)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def run(quick: bool = False) -> str:
    """Measure and return the markdown section."""
    register_resolvers()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        SyntheticReID(
            data_dir / "synthetic" / "A", domain="A", seed=0, preset="tiny" if quick else "default"
        )
        cfg = _compose(data_dir, cache=False, quick=quick)
        height, width = int(cfg.data.height), int(cfg.data.width)

        # per-image transform costs (files of the train split, decoded or from memory)
        datamodule, system, optimizer = _build(cfg)
        records = datamodule.source_data.train[: 64 if quick else 512]
        paths = [r.img_path for r in records]
        former = T.Compose(  # the previous pipeline: uint8 tensor first, tensor resize/pad/crop
            [
                T.ToImage(),
                T.Resize((height, width), antialias=True),
                T.RandomHorizontalFlip(0.5),
                T.Pad(10, fill=0),
                T.RandomCrop((height, width)),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                T.RandomErasing(0.5, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0.0),
            ]
        )
        ours = build_transforms(height, width, True)
        draw = TrainAugmentParams(height, width, IMAGENET_MEAN, IMAGENET_STD)
        minimal = T.Compose(
            [
                T.Resize((height, width), antialias=True),
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
            ]
        )
        per_image = _per_image_us(
            paths,
            {
                "decode + former tensor-side train transform": (True, former),
                "decode + PIL-side train transform (per-sample pipeline)": (True, ours),
                "decode + resize and parameter draw (batch-wise augmentation)": (True, draw),
                "decode + minimal PIL pipeline (resize, to float)": (True, minimal),
                "former tensor-side transform alone": (False, former),
                "PIL-side transform alone": (False, ours),
            },
            repeats=3,
        )
        cache = DecodedImageCache(len(paths), height, width)
        for i, path in enumerate(paths):
            cache.get(i, path)  # fill
        per_image["image cache read + PIL-side transform"] = _cache_read_us(cache, paths, ours)
        per_image["image cache read + parameter draw (the default run's workers)"] = _cache_read_us(
            cache, paths, draw, as_array=True
        )
        augment_ms = _augment_batch_ms(
            [draw(cache.get_array(i, p)) for i, p in enumerate(paths[: cfg.data.batch_size])],
            datamodule.augment["pad"],
        )

        # training steps: in memory, then the loaders (each after a warm-up epoch)
        per_sample_dm, _, _ = _build(_compose(data_dir, cache=False, quick=quick,
                                              batch_augment=False))  # fmt: skip
        in_memory = list(per_sample_dm.train_dataloader())  # one epoch of transformed batches
        _epoch_ms(system, optimizer, in_memory[:4])  # warm-up of the model
        feeds: dict[str, tuple[Any, Any]] = {
            "loader, per-sample augmentation": (per_sample_dm, None),
            "loader + image cache, per-sample augmentation": (
                _build(_compose(data_dir, cache=True, quick=quick, batch_augment=False))[0], None),
            "loader, batch-wise augmentation": (datamodule, datamodule),
            "loader + image cache, batch-wise augmentation": (
                cached := _build(_compose(data_dir, cache=True, quick=quick))[0], cached),
        }  # fmt: skip
        loaders = {name: dm.train_dataloader() for name, (dm, _) in feeds.items()}
        for name, loader in loaders.items():  # warm-up epoch (fills the image caches)
            _epoch_ms(system, optimizer, loader, feeds[name][1])
        results: dict[str, list[float]] = {"in memory": [], **{name: [] for name in feeds}}
        rounds = 2 if quick else 3
        for _ in range(rounds):  # round-robin: load changes hit every variant alike
            results["in memory"].append(_epoch_ms(system, optimizer, in_memory))
            for name, loader in loaders.items():
                results[name].append(_epoch_ms(system, optimizer, loader, feeds[name][1]))
        filled = loaders["loader + image cache, batch-wise augmentation"].dataset.cache
        cache_mib = filled.nbytes / 2**20
    ms = {k: statistics.median(v) for k, v in results.items()}
    base = ms["in memory"]
    lines = [
        "## Image pipeline: the default recipe's step, loader vs in memory "
        "(`src/bench/image_pipeline.py`)",
        "",
        f"Default run (experiment=synthetic_triplet: ResNet-18, {height}x{width}, batch "
        f"{cfg.data.batch_size} = P x K, {cfg.data.num_workers} loader workers, persistent), "
        f"synthetic domain A ({len(datamodule.source_data.train)} train images), torch threads "
        f"{torch.get_num_threads()}. ms per training step (forward + backward + Adam), mean over "
        f"an epoch ({len(in_memory)} steps), median of {rounds} epochs timed round-robin after a "
        "warm-up epoch. Goal: the default run's feed (image cache + batch-wise augmentation) "
        "<= 1.05x in memory.",
        "",
        "| feed | ms / step | x in memory |",
        "|---|---:|---:|",
    ]
    for name, value in ms.items():
        lines.append(f"| {name} | {value:.1f} | {value / base:.2f}x |")
    default = "loader + image cache, batch-wise augmentation"
    ratio = ms[default] / base
    lines += [
        "",
        f"Goal {'met' if ratio <= 1.05 else '**not met**'} ({ratio:.2f}x for the default run: "
        f"{default}). Image cache of this split: {cache_mib:.1f} MiB (N x {height} x {width} x "
        "3 bytes).",
        "",
        f"Per image ({len(paths)} train images, median of 3 passes, main process; the "
        "batch-wise rows leave flip, crop, scaling and erasing to the batch, about "
        f"{augment_ms:.1f} ms per batch of {cfg.data.batch_size} in the main process):",
        "",
        "| pipeline | µs / image |",
        "|---|---:|",
    ]
    for name, value in per_image.items():
        lines.append(f"| {name} | {value:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(run(quick=parser.parse_args().quick))
