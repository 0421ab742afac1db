"""`ReIDDataModule`: one DataModule for supervised training and domain adaptation.

The DataModule shards every loader itself (the trainer must use ``use_distributed_sampler=False``):
Lightning would otherwise wrap the P×K sampler in a DistributedSamplerWrapper and break the
batches. World size and rank are read when a loader is built (from the attached trainer, else from
an initialised torch.distributed, else 1 and 0), so ``setup()`` may run before the trainer exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Sampler

from src.data.batch_augment import TrainAugmentParams, augment_batch
from src.data.datasets import ReIDDataset, build_dataset
from src.data.image_dataset import DecodedImageCache, ImageDataset
from src.data.records import ReIDRecord
from src.data.samplers import DistributedPKSampler, PseudoLabelPKSampler, ShardedSampler
from src.data.seeding import SeededDataset, SeededSampler, loader_generator
from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, cached_mean_std
from src.data.val_split import hold_out_identities, official_validation
from src.data.validation import (
    DataValidationError,
    evaluation_problems,
    find_unreadable,
    ids_with_fewer_images,
)

log = logging.getLogger(__name__)

Stats = Sequence[float] | Literal["auto", "imagenet"] | None
# One private generator stream per loader (see :func:`loader_generator`).
_LOADER_STREAMS = {"source": 1, "target": 2, "eval": 3, "target_init": 4}


class ReIDDataModule(LightningDataModule):
    """Source (and optional target) re-ID data for training and evaluation.

    Supervised (``target=None``): ``train_dataloader()`` is a P×K loader over the source train
    split (:class:`DistributedPKSampler`, ``drop_last``). Domain adaptation: a
    ``CombinedLoader({"source": ..., "target": ...}, mode="max_size_cycle")``; the source loader is
    P×K (``source_sampler="pk"``) or shuffled (``"random"``), the target loader is shuffled over the
    target train split and cycles; one epoch is one pass over the source (a longer target stream is
    cut to the source length: each pass draws a fresh random subset). Every sample carries
    ``img`` (3, H, W), ``pid``, ``camid``, ``index`` (position in its split: the MAR memory row).

    ``val_dataloader()``/``test_dataloader()``: query then gallery of the evaluation domain (target
    if present, else source), test transform, with ``is_query``; ``index`` is unique over query +
    gallery (query i -> i, gallery j -> num_query + j). Under DDP these loaders pad each rank's
    shard with duplicates (DistributedSampler-style): de-duplicate by ``index``.

    Args:
        source: dataset spec ``{"name": ..., "root": ..., **kwargs}`` for :func:`build_dataset`.
        target: optional target dataset spec (domain adaptation).
        height, width: input size.
        batch_size: source batch per process (P*K for the P×K sampler).
        num_instances: K.
        source_sampler: "pk" or "random" (source loader in domain adaptation; supervised is
            always P×K).
        target_batch_size: target batch per process (default: batch_size).
        test_batch_size: evaluation batch per process.
        num_workers: loader workers per loader.
        pin_memory: pin host memory (default: when CUDA is available).
        persistent_workers: keep workers between epochs/cycles (default: num_workers > 0).
        mean, std: normalisation: 3 floats, "imagenet" (default) or "auto" (computed per domain
            from its train split at (height, width), cached in the dataset root).
        flip_p, pad, random_erasing_p, erasing_value, interpolation, color_jitter, color_jitter_p,
            grayscale_p: see :func:`build_transforms`.
        seed: base seed of all samplers (identical on every rank; None -> 0).
        val_ids: validation split of held-out *training* identities (supervised runs): a count
            (>= 1) or a fraction of the training ids, chosen by `seed`, built like a Market-1501
            test split (:mod:`src.data.val_split`); ``"official"`` uses the dataset's own list
            (MSMT17 ``list_val.txt`` with ``include_val: false``); 0 = off: validation then runs
            on the test split (``val_is_test``), for monitoring only.
        verify_images: decode every image at setup (threads, progress bar) and raise listing
            every unreadable file.

    ``setup`` fails before any training, naming the dataset and split, when a split cannot be
    evaluated (empty query or gallery, no query with a cross-camera match, no camera ids;
    :func:`~src.data.validation.evaluation_problems`).
        batch_augment: apply the train augmentation (flip, pad + crop, normalise, random
            erasing) to the whole batch on its device after the transfer, the workers only
            resizing and drawing each sample's parameters (`src.data.batch_augment`; identical
            output). Ignored, per-sample pipeline kept, with colour jitter, greyscale or
            ``erasing_value="random"``.
        image_cache: keep every decoded image, resized to (height, width), in a uint8 memory
            map shared by the loader workers (`DecodedImageCache`; N x height x width x 3 bytes
            per split and process, docs/scaling.md): files are decoded once, not every epoch.
        target_sampler: "random" (above) or "pseudo_labels": clustering-based UDA/USL
            (`ClusterContrastModule`): ``train_dataloader()`` is then a P×K loader (batch_size,
            num_instances) over the *target* train split alone, drawing pseudo-identities that
            the system hands over each epoch with :meth:`set_target_pseudo_labels` (outliers
            -1 are never drawn); `iters_per_epoch` batches per rank and epoch. The source is
            not used for training (its spec may name the target dataset again).
        iters_per_epoch: batches per epoch of the pseudo-label loader.
    """

    def __init__(
        self,
        source: Mapping[str, Any],
        target: Mapping[str, Any] | None = None,
        height: int = 256,
        width: int = 128,
        batch_size: int = 64,
        num_instances: int = 4,
        source_sampler: Literal["pk", "random"] = "pk",
        target_batch_size: int | None = None,
        test_batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        mean: Stats = "imagenet",
        std: Stats = "imagenet",
        flip_p: float = 0.5,
        pad: int = 10,
        random_erasing_p: float = 0.5,
        erasing_value: str = "mean",
        interpolation: str = "bilinear",
        color_jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        color_jitter_p: float = 0.0,
        grayscale_p: float = 0.0,
        seed: int | None = 0,
        val_ids: int | float | str = 0,
        verify_images: bool = False,
        image_cache: bool = False,
        target_sampler: Literal["random", "pseudo_labels"] = "random",
        iters_per_epoch: int | None = None,
        batch_augment: bool = True,
    ) -> None:
        super().__init__()
        for name, spec in (("source", source), ("target", target)):
            if spec is not None and ("name" not in spec or "root" not in spec):
                raise ValueError(f"data.{name} needs 'name' and 'root' keys, got {dict(spec)}")
        if source_sampler not in ("pk", "random"):
            raise ValueError(f"source_sampler must be 'pk' or 'random', got {source_sampler!r}")
        if target_sampler not in ("random", "pseudo_labels"):
            raise ValueError(
                f"target_sampler must be 'random' or 'pseudo_labels', got {target_sampler!r}"
            )
        if target_sampler == "pseudo_labels" and (target is None or not iters_per_epoch):
            raise ValueError(
                "data.target_sampler=pseudo_labels needs data.target (the unlabelled domain) and "
                f"data.iters_per_epoch >= 1, got target={target}, iters_per_epoch="
                f"{iters_per_epoch}"
            )
        uses_pk = target is None or source_sampler == "pk" or target_sampler == "pseudo_labels"
        if uses_pk and (num_instances < 1 or batch_size % num_instances):
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of num_instances ({num_instances}) "
                "for P×K batches"
            )
        if (mean == "auto") != (std == "auto"):
            raise ValueError("mean and std must both be 'auto' or both be given")
        self.source_spec = dict(source)
        self.target_spec = dict(target) if target is not None else None
        self.height, self.width = height, width
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.source_sampler = source_sampler
        self.target_batch_size = target_batch_size or batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = (
            num_workers > 0
            if persistent_workers is None
            else persistent_workers and num_workers > 0
        )
        self.mean, self.std = mean, std
        self.augment = {
            "flip_p": flip_p,
            "pad": pad,
            "random_erasing_p": random_erasing_p,
            "erasing_value": erasing_value,
            "interpolation": interpolation,
            "color_jitter": tuple(float(v) for v in color_jitter),
            "color_jitter_p": color_jitter_p,
            "grayscale_p": grayscale_p,
        }
        self.seed = 0 if seed is None else int(seed)  # a run with seed=null still needs one
        if val_ids and target is not None:
            raise ValueError(
                "data.val_ids holds out source identities for supervised runs; domain adaptation "
                "validates on the target (set data.val_ids=0)"
            )
        if isinstance(val_ids, str) and val_ids != "official":
            raise ValueError(f"data.val_ids must be a number or 'official', got {val_ids!r}")
        self.val_ids = val_ids
        self.verify_images = verify_images
        #: the source training records (without the held-out validation identities)
        self.source_train: list[ReIDRecord] | None = None
        #: (query, gallery) of the validation split, None when validation runs on the test split
        self.val_split: tuple[list[ReIDRecord], list[ReIDRecord]] | None = None
        self.image_cache = bool(image_cache)
        # flip / crop / normalise / erasing applied batch-wise on the device (src.data.batch_augment),
        # bit-identical to the per-sample pipeline; not for jitter, greyscale, noise erasing
        self.batch_augment = bool(batch_augment) and self._augment_is_batchable()
        self._caches: dict[tuple[str, str, str], DecodedImageCache] = {}
        self.target_sampler = target_sampler
        self.iters_per_epoch = iters_per_epoch
        self._target_pseudo_labels: torch.Tensor | None = None
        self.source_data: ReIDDataset | None = None
        self.target_data: ReIDDataset | None = None
        # Normalisation per domain ("source"/"target"): resolved in setup, checkpointed.
        self.stats: dict[str, tuple[list[float], list[float]]] = {}
        self._samplers: dict[str, SeededSampler] = {}
        self._batch_sizes: dict[str, int] = {}
        self._sampler_states: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Parse (and, for synthetic data, generate) the datasets once per node, and fill the
        mean/std cache when normalisation is "auto"."""
        for spec in (self.source_spec, self.target_spec):
            if spec is not None:
                data = build_dataset(**spec)
                if self.mean == "auto":
                    cached_mean_std(data.train, self.height, self.width, cache_dir=data.root)

    def setup(self, stage: str | None = None) -> None:
        """Parse the datasets, hold out the validation split, check that every split can be
        used (errors name the dataset and split) and resolve the normalisation (idempotent)."""
        parsed = False
        if self.source_data is None:
            data = build_dataset(**self.source_spec)
            self.source_train, self.val_split = self._split_validation(data)
            self.source_data, parsed = data, True
        if self.target_spec is not None and self.target_data is None:
            self.target_data, parsed = build_dataset(**self.target_spec), True
        if parsed:
            self._check_data()
        for domain, data in (("source", self.source_data), ("target", self.target_data)):
            if data is not None and domain not in self.stats:
                self.stats[domain] = self._resolve_stats(data)

    def _split_validation(
        self, data: ReIDDataset
    ) -> tuple[list[ReIDRecord], tuple[list[ReIDRecord], list[ReIDRecord]] | None]:
        if not self.val_ids:
            return data.train, None
        if self.val_ids == "official":
            if data.val is None:
                raise ValueError(
                    f"data.val_ids=official: {data.display_name} at {data.root} has no official "
                    "validation list (MSMT17 has one: set data.source.include_val=false)"
                )
            return data.train, official_validation(data.val, self.seed)
        train, query, gallery = hold_out_identities(data.train, self.val_ids, self.seed)
        return train, (query, gallery)

    def _check_data(self) -> None:
        """Raise :class:`DataValidationError` for splits that cannot be used; warn about P x K."""
        eval_data = self.eval_data
        where = f"{eval_data.display_name} at {eval_data.root}"
        problems = evaluation_problems(eval_data.query, eval_data.gallery, f"{where} (test split)")
        if self.val_split is not None and self.target_data is None:
            problems += evaluation_problems(
                *self.val_split, f"{where} (validation split, data.val_ids={self.val_ids})"
            )
        source = self.source_data
        train = self.source_train or []
        if not train:
            problems.append(f"{source.display_name} at {source.root}: the train split is empty")  # type: ignore[union-attr]
        if self.target_data is not None and not self.target_data.train:
            target = self.target_data
            problems.append(f"{target.display_name} at {target.root}: the train split is empty")
        short = ids_with_fewer_images(train, self.num_instances)
        if short:
            log.warning(
                f"{short} of {len({r.pid for r in train})} training identities have fewer "
                f"than K=data.num_instances={self.num_instances} images: their P x K chunks "
                "repeat images (drawn with replacement)"
            )
        if problems:
            raise DataValidationError("cannot use this data:\n  " + "\n  ".join(problems))
        if self.verify_images:
            self._verify_images()

    def _verify_images(self) -> None:
        records = [
            *(self.source_train or []),
            *(r for split in (self.val_split or ()) for r in split),
            *(r for d in (self.source_data, self.target_data) if d is not None for r in d.query),
            *(r for d in (self.source_data, self.target_data) if d is not None for r in d.gallery),
        ]
        if self.target_data is not None:
            records += self.target_data.train
        records = list({r.img_path: r for r in records}.values())
        from tqdm.auto import tqdm

        with tqdm(total=len(records), desc="data.verify_images", unit="img") as bar:
            unreadable = find_unreadable(records, workers=os.cpu_count() or 2, progress=bar.update)
        if unreadable:
            raise DataValidationError(
                f"data.verify_images: {len(unreadable)} of {len(records)} images cannot be "
                "decoded:\n  " + "\n  ".join(unreadable)
            )

    @property
    def val_is_test(self) -> bool:
        """Whether validation runs on the test split (no held-out validation split)."""
        return self.val_split is None

    def eval_records(self, stage: str) -> tuple[list[ReIDRecord], list[ReIDRecord]]:
        """(query, gallery) records that the `stage` ("val"/"test") loader serves, in order."""
        self._require_setup()
        if stage == "val" and self.val_split is not None:
            return self.val_split
        return self.eval_data.query, self.eval_data.gallery

    def _resolve_stats(self, data: ReIDDataset) -> tuple[list[float], list[float]]:
        if self.mean == "auto":
            return cached_mean_std(data.train, self.height, self.width, cache_dir=data.root)
        mean = IMAGENET_MEAN if self.mean in (None, "imagenet") else self.mean
        std = IMAGENET_STD if self.std in (None, "imagenet") else self.std
        return [float(m) for m in mean], [float(s) for s in std]  # type: ignore[union-attr]

    def _require_setup(self) -> None:
        if self.source_data is None:
            raise RuntimeError("ReIDDataModule: call setup() before using the data")

    # ------------------------------------------------------------------------ attributes
    @property
    def eval_data(self) -> ReIDDataset:
        """The evaluation domain: the target when there is one, else the source."""
        self._require_setup()
        return self.target_data if self.target_data is not None else self.source_data  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of source training identities (classifier size; held-out validation ids
        excluded)."""
        self._require_setup()
        return len({r.pid for r in self.source_train or []})

    @property
    def num_target_train(self) -> int | None:
        """Number of target training images (MAR memory rows), None without a target."""
        self._require_setup()
        return None if self.target_data is None else len(self.target_data.train)

    @property
    def num_target_cameras(self) -> int | None:
        """Number of target cameras (camids are 0..num_target_cameras-1), None without a target."""
        self._require_setup()
        return None if self.target_data is None else self.target_data.num_cams

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _augment_is_batchable(self) -> bool:
        a = self.augment
        return (
            a["erasing_value"] == "mean"
            and not (a["color_jitter_p"] > 0 and max(a["color_jitter"]) > 0)
            and not a["grayscale_p"] > 0
        )

    def _transform(self, domain: str, train: bool, batched: bool = True) -> Any:
        """The loader's transform; ``batched=False`` for loaders iterated outside the Trainer
        (no ``on_after_batch_transfer`` there): the per-sample pipeline, the same result."""
        mean, std = self.stats[domain]
        if not train:
            return build_transforms(self.height, self.width, False, mean, std)
        if self.batch_augment and batched:
            a = self.augment
            return TrainAugmentParams(
                self.height, self.width, mean, std, flip_p=a["flip_p"], pad=a["pad"],
                random_erasing_p=a["random_erasing_p"], interpolation=a["interpolation"],
            )  # fmt: skip
        return build_transforms(self.height, self.width, True, mean, std, **self.augment)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches of the batched augmentation (uint8 images with their drawn
        parameters, :mod:`src.data.batch_augment`) are augmented here, on the device."""
        return augment_batch(batch, self.augment["pad"]) if self.batch_augment else batch

    def _cache(self, domain: str, split: str, n: int, train: bool) -> DecodedImageCache | None:
        """The decoded-image cache of one split (None when off), made once per run."""
        if not self.image_cache:
            return None
        interpolation = self.augment["interpolation"] if train else "bilinear"
        key = (domain, split, interpolation)
        if key not in self._caches:
            self._caches[key] = DecodedImageCache(n, self.height, self.width, interpolation)
        return self._caches[key]

    def _loader(
        self, dataset: ImageDataset, batch_size: int, sampler: Sampler, name: str, drop_last: bool
    ) -> DataLoader:
        """A training loader: every sample's augmentation is seeded by the sampler
        (:mod:`src.data.seeding`), so a resumed run replays it with any number of workers."""
        seeded = SeededSampler(sampler)
        self._batch_sizes[name] = batch_size
        if name in self._sampler_states:
            seeded.load_state_dict(self._sampler_states.pop(name))
        self._samplers[name] = seeded
        return DataLoader(
            SeededDataset(dataset),
            batch_size=batch_size,
            sampler=seeded,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=loader_generator(self.seed, _LOADER_STREAMS[name], self._world()[1]),
        )

    # ----------------------------------------------------------------------- dataloaders
    def _source_loader(self) -> DataLoader:
        self._require_setup()
        world, rank = self._world()
        records = self.source_train or []
        cache = self._cache("source", "train", len(records), train=True)
        dataset = ImageDataset(records, self._transform("source", train=True), cache=cache)
        sampler: Sampler
        if self.target_data is None or self.source_sampler == "pk":
            sampler = DistributedPKSampler(
                dataset.pids, self.num_instances, self.batch_size, world, rank, self.seed
            )
        else:
            sampler = ShardedSampler(len(dataset), world, rank, shuffle=True, seed=self.seed)
        loader = self._loader(dataset, self.batch_size, sampler, "source", drop_last=True)
        if len(loader) == 0:
            raise ValueError(
                f"source train split ({len(records)} images) gives no full batch of "
                f"{self.batch_size} per rank on {world} rank(s)"
            )
        return loader

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Supervised: the source P×K loader. Domain adaptation: a max_size_cycle
        CombinedLoader of ``{"source": ..., "target": ...}`` whose length is the source's."""
        if self.target_sampler == "pseudo_labels":
            return self._pseudo_label_loader()
        source = self._source_loader()
        if self.target_data is None:
            return source
        world, rank = self._world()
        records = self.target_data.train
        cache = self._cache("target", "train", len(records), train=True)
        dataset = ImageDataset(records, self._transform("target", train=True), cache=cache)
        # Cap the target at the source length so that an epoch is one pass over the source.
        sampler = ShardedSampler(
            len(dataset),
            world,
            rank,
            shuffle=True,
            seed=self.seed + 1,
            max_samples=len(source) * self.target_batch_size,
        )
        target = self._loader(dataset, self.target_batch_size, sampler, "target", drop_last=True)
        if len(target) == 0:
            raise ValueError(
                f"target train split ({len(dataset)} images) gives no full batch of "
                f"{self.target_batch_size} per rank on {world} rank(s)"
            )
        return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")

    def _pseudo_label_loader(self) -> DataLoader:
        self._require_setup()
        world, rank = self._world()
        records = self.target_data.train  # type: ignore[union-attr]
        cache = self._cache("target", "train", len(records), train=True)
        dataset = ImageDataset(records, self._transform("target", train=True), cache=cache)
        sampler = PseudoLabelPKSampler(
            len(dataset),
            self.num_instances,
            self.batch_size,
            int(self.iters_per_epoch),  # type: ignore[arg-type]
            world,
            rank,
            self.seed + 1,
        )
        if self._target_pseudo_labels is not None:
            sampler.set_labels(self._target_pseudo_labels)
        return self._loader(dataset, self.batch_size, sampler, "target", drop_last=True)

    def set_target_pseudo_labels(self, labels: Sequence[int] | torch.Tensor) -> None:
        """Hand over the pseudo-identity of every target train image ((N_t,) ints, -1 =
        outlier) for the next epochs' P×K batches (``target_sampler="pseudo_labels"``). Call it
        on every rank with the same labels before the epoch's loader is iterated (the
        `ClusterContrastModule` does, in ``on_train_epoch_start``)."""
        if self.target_sampler != "pseudo_labels":
            raise RuntimeError(
                "set_target_pseudo_labels needs data.target_sampler=pseudo_labels (the target "
                f"loader is {self.target_sampler!r})"
            )
        self._target_pseudo_labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        seeded = self._samplers.get("target")
        if seeded is not None and isinstance(seeded.sampler, PseudoLabelPKSampler):
            seeded.sampler.set_labels(self._target_pseudo_labels)

    def _eval_loader(self, stage: str) -> DataLoader:
        world, rank = self._world()
        query, gallery = self.eval_records(stage)
        domain = "target" if self.target_data is not None else "source"
        dataset = ImageDataset.query_gallery(
            query,
            gallery,
            self._transform(domain, train=False),
            cache=self._cache(
                domain, f"{stage} query+gallery", len(query) + len(gallery), train=False
            ),
        )
        sampler = ShardedSampler(len(dataset), world, rank, shuffle=False, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.test_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=loader_generator(self.seed, _LOADER_STREAMS["eval"], rank),
        )

    def val_dataloader(self) -> DataLoader:
        """Query + gallery of the validation split (``is_query`` per sample), sharded; the test
        split of the evaluation domain when there is no validation split (``val_is_test``)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Query + gallery of the evaluation domain's test split, sharded."""
        return self._eval_loader("test")

    def target_init_dataloader(
        self, augment: bool = True, batch_size: int | None = None
    ) -> DataLoader:
        """Target train split, shuffled, every sample once (no drop_last), sharded over ranks.

        Used by MAR's initialisation (soft multilabels of all target images). Under DDP the
        shards are padded with duplicates to equal length: de-duplicate by ``index``.

        Args:
            augment: use the training transform (as the original MAR code) or the test one.
            batch_size: per-process batch (default: target_batch_size).
        """
        self._require_setup()
        if self.target_data is None:
            raise RuntimeError("target_init_dataloader needs a target dataset")
        world, rank = self._world()
        records = self.target_data.train
        cache = self._cache("target", "train", len(records), train=augment)
        # iterated by the systems' initialisation, outside the Trainer: per-sample augmentation
        transform = self._transform("target", train=augment, batched=False)
        dataset = ImageDataset(records, transform, cache=cache)
        sampler = ShardedSampler(len(dataset), world, rank, shuffle=True, seed=self.seed + 2)
        return DataLoader(
            SeededDataset(dataset),
            batch_size=batch_size or self.target_batch_size,
            sampler=SeededSampler(sampler),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=loader_generator(self.seed, _LOADER_STREAMS["target_init"], rank),
        )

    # ------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Normalisation statistics and, per training loader, where its next pass starts.

        A checkpoint written inside a training epoch (``every_n_train_steps``) records the epoch,
        the pass and the number of samples of that pass already trained on; one written at the
        end of an epoch points at the next epoch's first pass. Restoring it replays the loaders'
        order and augmentation from exactly there (:class:`SeededSampler`)."""
        return {
            "stats": {k: [list(m), list(s)] for k, (m, s) in self.stats.items()},
            "samplers": {name: self._resume_point(name, s) for name, s in self._samplers.items()},
        }

    def _resume_point(self, name: str, sampler: SeededSampler) -> dict[str, Any]:
        state: dict[str, Any] = dict(sampler.state_dict())
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit" or name not in ("source", "target"):
            return state
        # Batches of this epoch trained on so far (prefetched ones are not counted).
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # end of the epoch: the next one starts afresh
            return {**state, "epoch": trainer.current_epoch + 1, "iteration": 0, "skip": 0}
        batch = self._batch_sizes[name]
        per_pass = len(sampler) // batch  # a cycled (target) loader makes several passes
        return {
            **state,
            "epoch": trainer.current_epoch,
            "iteration": done // per_pass,
            "skip": (done % per_pass) * batch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called by Lightning after ``setup``, before the loaders)."""
        for domain, (mean, std) in state_dict.get("stats", {}).items():
            self.stats[domain] = (list(mean), list(std))
        self._sampler_states = dict(state_dict.get("samplers", {}))
        for name, state in list(self._sampler_states.items()):
            if name in self._samplers:
                self._samplers[name].load_state_dict(state)
                del self._sampler_states[name]

    def __repr__(self) -> str:
        target = None if self.target_spec is None else self.target_spec.get("name")
        return (
            f"ReIDDataModule(source={self.source_spec.get('name')}, target={target}, "
            f"size={self.height}x{self.width}, batch={self.batch_size}/K={self.num_instances})"
        )
