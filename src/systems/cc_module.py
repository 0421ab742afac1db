"""Cluster contrast (Dai et al. 2021, alibaba/cluster-contrast-reid) as a LightningModule.

Clustering-based unsupervised domain adaptation (UDA, from a source-pretrained checkpoint such as
MAR's stage 1) or unsupervised learning (USL, from ImageNet weights) on the unlabelled target.
The step and clustering logic live in `src.systems.cc_steps`; this module wires them to the
Trainer and the DataModule (``data.target_sampler=pseudo_labels``). User guide:
docs/cluster_contrast.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.systems import mar_init
from src.systems.base import ReIDSystem
from src.systems.cc_steps import (
    MEMORY_UPDATES,
    cc_train_step,
    cluster_centroids,
    cluster_diagnostics,
    cluster_features,
)
from src.systems.pretrained import read_net_state

#: Buffers kept identical on every rank by the module itself: DDP must not re-send them from
#: rank 0 before each forward (broadcast_buffers), which would hide a divergence.
RANK_SYNCED_BUFFERS = ("memory", "pseudo_labels", "clustered_epoch", "weights_loaded")


class ClusterContrastModule(ReIDSystem):
    """Cluster contrast: per-epoch DBSCAN pseudo-labels + InfoNCE over a cluster memory.

    At the start of every epoch (`recluster`): features of all target train images (test
    transform, eval mode, unit-normalised), the sparse k-reciprocal Jaccard distance (k1, k2),
    DBSCAN (eps, min_samples), outliers dropped; the pseudo-labels go to the DataModule, whose
    P×K sampler then draws pseudo-identities, and the memory is reset to the cluster centroids.
    Under DDP every rank extracts its shard, the shards are gathered, rank 0 clusters, and the
    labels and centroids are broadcast. Each step: `cc_train_step` (loss on the local batch,
    memory update from the gathered global batch).

    State (buffers, checkpointed; excluded from DDP's per-forward buffer broadcast):

    * ``memory`` (C, D): unit cluster entries (C changes every epoch; a checkpoint restores its
      shape), ``pseudo_labels`` (N_t,): -1 = outlier;
    * ``clustered_epoch``: the epoch the labels belong to (a mid-epoch resume keeps them);
    * ``weights_loaded``: the initial weights were loaded (skipped on resume).

    Args:
        net: factory (Hydra partial of `src.models.ReIDNet`) called with ``num_classes=0``.
        optimizer, scheduler: Hydra partials (scheduler stepped per epoch).
        num_target_train: N_t, target train images (from the DataModule).
        pretrained_ckpt: initial weights: a Lightning checkpoint (``net.*`` keys, e.g. MAR's
            stage 1) or a plain ReIDNet state dict; its backbone (and a matching pooling/BNNeck)
            is loaded, its classifier ignored. None: the model config's initialisation (USL from
            ImageNet weights).
        temperature: InfoNCE τ (0.05).
        memory_momentum: m, weight of the old entry in ``M[k] <- m·M[k] + (1 − m)·q`` (0.1).
        memory_update: "hard" (the paper's hardest sample) or "mean".
        eps, min_samples: DBSCAN (0.6 Market, 0.7 MSMT17; 4).
        k1, k2: k-reciprocal Jaccard (30, 6).
        jaccard_metric, knn, jaccard_chunk_size: options of `k_reciprocal_jaccard`.
        cluster_batch_size: batch of the feature extraction (default: data.test_batch_size).
        flip_test, eval_metric, rerank, eval_ap: evaluation.
        compile: `torch.compile` the backbone.
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        num_target_train: int = 0,
        pretrained_ckpt: str | None = None,
        temperature: float = 0.05,
        memory_momentum: float = 0.1,
        memory_update: str = "hard",
        eps: float = 0.6,
        min_samples: int = 4,
        k1: int = 30,
        k2: int = 6,
        jaccard_metric: str = "cosine",
        knn: str = "auto",
        jaccard_chunk_size: int | None = None,
        cluster_batch_size: int | None = None,
        flip_test: bool = False,
        eval_metric: str = "cosine",
        rerank: bool = False,
        eval_ap: str = "standard",
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, flip_test, eval_metric, rerank, eval_ap)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        if num_target_train < 2:
            raise ValueError(
                f"ClusterContrastModule: num_target_train must be >= 2 (target train images), got "
                f"{num_target_train}; cluster contrast needs data.target (e.g. data=synthetic_a2b "
                "with data.target_sampler=pseudo_labels)"
            )
        if memory_update not in MEMORY_UPDATES:
            raise ValueError(
                f"system.memory_update must be one of {MEMORY_UPDATES}, got {memory_update!r}"
            )
        if not 0.0 <= memory_momentum < 1.0:
            raise ValueError(f"system.memory_momentum must be in [0, 1), got {memory_momentum}")
        if temperature <= 0:
            raise ValueError(f"system.temperature must be > 0, got {temperature}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"system.eps must be in (0, 1) (Jaccard distance), got {eps}")
        if min_samples < 1:
            raise ValueError(f"system.min_samples must be >= 1, got {min_samples}")
        self.net = net(num_classes=0)
        dim = int(self.net.feat_dim)
        self.register_buffer("memory", torch.zeros(0, dim))
        self.register_buffer("pseudo_labels", torch.full((num_target_train,), -1, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("weights_loaded", torch.tensor(False))
        # Read by torch's DistributedDataParallel (Lightning wraps this module directly).
        self._ddp_params_and_buffers_to_ignore = list(RANK_SYNCED_BUFFERS)
        self.last_cluster_stats: dict[str, float] = {}
        if compile:
            self.net.compile_backbone()

    # ------------------------------------------------------------------ state
    @property
    def num_clusters(self) -> int:
        """C, the clusters of the current epoch (0 before the first clustering)."""
        return int(self.memory.shape[0])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The memory's row count is the checkpointed epoch's cluster count: take its shape.
        saved = state_dict.get(prefix + "memory")
        if saved is not None and saved.shape != self.memory.shape:
            self.memory = torch.zeros(
                saved.shape, dtype=self.memory.dtype, device=self.memory.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, images: Tensor) -> Tensor:
        """Retrieval embedding (N, 3, H, W) -> (N, D)."""
        return self.net.embed(images)

    # ------------------------------------------------------------------ initial weights
    def load_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Load the backbone (and a matching pooling / BNNeck) of a source-pretrained model.

        Raises a FileNotFoundError / ValueError naming the path when it is missing, unreadable,
        or its backbone does not match this network.
        """
        path = str(path)
        state = read_net_state(path, "a source-pretrained checkpoint")
        own = self.net.state_dict()
        missing = [k for k in own if k.startswith("backbone.") and k not in state]
        wrong = [
            k
            for k in own
            if k.startswith("backbone.") and k in state and state[k].shape != own[k].shape
        ]
        if missing or wrong:
            raise ValueError(
                f"system.pretrained_ckpt={path} does not match the backbone of model.backbone="
                f"{getattr(self.net.backbone, 'name', '?')}: {len(missing)} backbone tensors "
                f"missing (e.g. {missing[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]})"
            )
        load = {
            k: v
            for k, v in state.items()
            if k in own
            and own[k].shape == v.shape
            and k.split(".")[0] in ("backbone", "pool", "neck")
        }
        self.net.load_state_dict(load, strict=False)
        self.weights_loaded.fill_(True)
        extra = sorted({k.split(".")[0] for k in load} - {"backbone"})
        rank_zero_info(
            f"cluster contrast: loaded the backbone{' + ' + ', '.join(extra) if extra else ''} "
            f"from {path}"
        )

    def on_fit_start(self) -> None:
        # After the module restore, before Lightning builds the training loader and creates its
        # iterator (which, with loader workers, already draws indices from the sampler): the
        # first epoch's pseudo-labels must exist by then. A resumed run (weights_loaded) keeps
        # its restored weights and labels.
        super().on_fit_start()  # the bf16 self-check
        datamodule = self.trainer.datamodule
        if not bool(self.weights_loaded):
            if self.hparams.pretrained_ckpt:
                self.load_pretrained(self.hparams.pretrained_ckpt)
            else:
                rank_zero_info(
                    "cluster contrast: no system.pretrained_ckpt, the model config's weights"
                )
                self.weights_loaded.fill_(True)
            self.recluster(datamodule)
        if int(self.clustered_epoch) >= 0:
            datamodule.set_target_pseudo_labels(self.pseudo_labels.cpu())

    def on_train_start(self) -> None:
        super().on_train_start()  # restores the RNG states of a resumed run
        if int(self.clustered_epoch) == self.current_epoch:
            # Resumed mid-epoch (Lightning skips on_train_epoch_start then): finish the epoch on
            # the restored labels.
            self.trainer.datamodule.set_target_pseudo_labels(self.pseudo_labels.cpu())

    # ------------------------------------------------------------------ clustering
    def on_train_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        if int(self.clustered_epoch) != self.current_epoch:
            self.recluster(datamodule)
        # Restored or fresh: the sampler draws this epoch from these labels (before the loader
        # is iterated: Lightning calls this hook first).
        datamodule.set_target_pseudo_labels(self.pseudo_labels.cpu())
        if self.last_cluster_stats:
            self.log_dict(
                {f"cluster/{k}": v for k, v in self.last_cluster_stats.items()},
                on_step=False,
                on_epoch=True,
            )

    @torch.no_grad()
    def extract_target_features(self, datamodule: Any) -> tuple[Tensor, Tensor]:
        """Unit features (N_t, D) and true ids (N_t,) (diagnostics only) of every target train
        image, test transform, eval mode; gathered over ranks and ordered by dataset index."""
        hp = self.hparams
        loader = datamodule.target_init_dataloader(
            augment=False, batch_size=hp.cluster_batch_size or datamodule.test_batch_size
        )
        trainer = self._trainer
        autocast = trainer.precision_plugin.forward_context if trainer is not None else None
        was_training = self.net.training
        self.net.eval()
        feats, pids, index = [], [], []
        try:
            for batch in loader:
                images = batch["img"].to(self.device, non_blocking=True)
                if autocast is not None:
                    with autocast():
                        f = self.net.embed(images)
                else:
                    f = self.net.embed(images)
                feats.append(F.normalize(f.float(), dim=1))
                pids.append(batch["pid"].to(self.device).long())
                index.append(batch["index"].to(self.device).long())
        finally:
            self.net.train(was_training)
        return mar_init.gather_by_index(
            torch.cat(index), torch.cat(feats), torch.cat(pids), num_items=hp.num_target_train
        )

    @torch.no_grad()
    def recluster(self, datamodule: Any) -> None:
        """Pseudo-labels and centroid memory for the current epoch (collective under DDP)."""
        hp = self.hparams
        features, true_ids = self.extract_target_features(datamodule)
        state = None
        if mar_init.dist_world()[1] == 0:
            labels = cluster_features(
                features,
                hp.eps,
                hp.min_samples,
                k1=hp.k1,
                k2=hp.k2,
                metric=hp.jaccard_metric,
                knn=hp.knn,
                chunk_size=hp.jaccard_chunk_size,
            )
            num = int(labels.max()) + 1 if labels.numel() else 0
            if num == 0:
                raise ValueError(
                    f"cluster contrast, epoch {self.current_epoch}: DBSCAN (eps={hp.eps}, "
                    f"min_samples={hp.min_samples}) put all {len(labels)} target images in no "
                    "cluster; raise system.eps"
                )
            centroids = cluster_centroids(features, labels.to(features.device), num)
            stats = cluster_diagnostics(labels, true_ids)
            state = {"labels": labels.cpu(), "centroids": centroids.float().cpu(), "stats": stats}
        state = mar_init.broadcast_from_rank0(state, self._trainer)
        self.pseudo_labels.copy_(state["labels"].to(self.pseudo_labels.device))
        self.memory = state["centroids"].to(self.memory.device, self.memory.dtype)
        self.clustered_epoch.fill_(self.current_epoch)
        self.last_cluster_stats = dict(state["stats"])
        s = self.last_cluster_stats
        msg = ", ".join(f"{k} {v:.4g}" for k, v in s.items())
        rank_zero_info(f"cluster contrast, epoch {self.current_epoch}: {msg}")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = self.pseudo_labels.index_select(0, batch["index"].long())
        outputs = self.net(batch["img"])
        out = cc_train_step(
            outputs["bn_feat"],
            labels,
            self.memory,
            temperature=self.hparams.temperature,
            momentum=self.hparams.memory_momentum,
            mode=self.hparams.memory_update,
        )
        batch_size = batch["img"].shape[0]
        self.log("train/loss", out.terms["loss"], prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch_size)  # fmt: skip
        self.log("train/acc", out.terms["acc"], on_step=True, on_epoch=True, batch_size=batch_size)
        return out.loss
