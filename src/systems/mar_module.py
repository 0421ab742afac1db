"""MAR stage 2: soft multilabel reference learning (Yu et al., CVPR 2019) as a LightningModule.

Stage 1 (source pretraining) is the supervised `TripletReIDModule` with a plain CE loss and a
bias-free classifier (`experiment=*_source_pretrain`); its checkpoint is loaded here with
`system.pretrained_ckpt=PATH`, and the classifier rows become the reference agents. The step
logic lives in `src/systems/mar_steps.py`, the initialisation maths in `src/systems/mar_init.py`;
this module only wires them to the Trainer. User guide: docs/mar.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.losses.mar import DiscriminativeLoss, JointLoss, MultilabelLoss
from src.systems import mar_init
from src.systems.base import ReIDSystem
from src.systems.mar_steps import MARWeights, describe_nonfinite, mar_train_step, replica_drift
from src.systems.pretrained import read_net_state

INIT_MODES = ("exact", "sampled")


class MARModule(ReIDSystem):
    """MAR domain adaptation: L = L_MDL + λ1·L_CML + λ2·(L_AL + β·L_RJ) (mar.md §3).

    Training batches are the DataModule's ``{"source": {...}, "target": {...}}`` dicts; source and
    target images go through the network in two separate forward passes (domain-specific BN batch
    statistics, as in the original). Features and agents are unit-normalised, scale 30.

    State (registered buffers, so checkpointed and restored on resume):

    * ``memory`` (N_t, K) soft multilabels of the target train images and ``memory_visited``
      (N_t,) (first visit copies, later visits 0.9·old + 0.1·new; not written in the warm-up);
    * ``mar_initialised``: the CML centres and T0 were computed (skip on resume);
    * the CML centres (``multilabel_loss.center_mean/std``) and T (``discriminative_loss.threshold``).

    Args:
        net: factory (Hydra partial of `src.models.ReIDNet`) called with ``num_classes``; must be
            the MAR network: ``neck="none"``, ``classifier_bias=False``, no local branch.
        optimizer, scheduler: Hydra partials (scheduler stepped per epoch).
        joint_loss: `JointLoss` (RJ); None -> ``JointLoss(margin=1.0)``.
        multilabel_loss: `MultilabelLoss` (CML) or a factory of it called with ``batch_size``,
            ``num_views`` (target cameras) and ``num_classes`` (K); None -> a default one.
        cml_batch_size: the batch that sets the CML centre momentum η = cml_batch_size / 10000,
            the original's total source + target batch (184 + 184 = 368). None (default): the
            run's global batch, (data.batch_size + data.target_batch_size) × world size, set
            when training starts. Ignored when ``multilabel_loss`` is a module or a factory
            with its own ``batch_size``.
        discriminative_loss: `DiscriminativeLoss` (MDL); None -> ``mining_ratio=0.005``.
        num_classes: K, source identities = agents (from the DataModule).
        num_target_train: N_t, target train images = memory rows (from the DataModule).
        num_target_cameras: target cameras (from the DataModule): static CML camera one-hot.
        pretrained_ckpt: stage-1 checkpoint (Lightning ``.ckpt`` of the source pretraining, or a
            plain ReIDNet state dict). Loaded when training starts, unless the run resumes (or
            `load_pretrained` was called by hand).
        lambda_cml, lambda_ral, beta: λ1, λ2, β.
        scale: cosine scale of AL and of the soft multilabels.
        memory_momentum: weight of a new soft multilabel in the memory EMA.
        warmup_epochs: epochs without MDL and without memory writes (1 in the paper).
        init_mode: "exact" (chunked streaming top-k over all pairs) or "sampled" (T0 estimated
            from ``init_sampled_pairs`` random pairs; error in docs/mar.md).
        init_cache_dir: folder caching (T0, centres) keyed by the checkpoint hash and every
            other input of the initialisation (`init_inputs`); None disables the cache.
        init_sampled_pairs, init_seed: settings of the sampled estimate.
        init_chunk_size: rows per block of the exact computation (memory O(chunk·N + k)).
        init_augment: soft multilabels of the augmented target images (as the original) or of
            the test transform.
        finite_check_every_n_steps: every n steps, read the fused non-finite flags and (under
            DDP) the replica-drift flags of the MAR state (one all-reduce of a few checksums and
            one host read); 0 checks at epoch ends only.
        flip_test, eval_metric, rerank, eval_ap: evaluation (MAR: cosine distance, no flip,
            no re-ranking).
        compile: `torch.compile` the backbone.
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        joint_loss: JointLoss | None = None,
        multilabel_loss: MultilabelLoss | Callable[..., MultilabelLoss] | None = None,
        discriminative_loss: DiscriminativeLoss | None = None,
        num_classes: int = 0,
        num_target_train: int = 0,
        num_target_cameras: int | None = None,
        cml_batch_size: int | None = None,
        pretrained_ckpt: str | None = None,
        lambda_cml: float = 2e-4,
        lambda_ral: float = 50.0,
        beta: float = 0.2,
        scale: float = 30.0,
        memory_momentum: float = 0.1,
        warmup_epochs: int = 1,
        init_mode: str = "exact",
        init_cache_dir: str | None = None,
        init_sampled_pairs: int = 2_000_000,
        init_seed: int = 0,
        init_chunk_size: int = 1024,
        init_augment: bool = True,
        finite_check_every_n_steps: int = 100,
        flip_test: bool = False,
        eval_metric: str = "cosine",
        rerank: bool = False,
        eval_ap: str = "standard",
        compile: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, flip_test, eval_metric, rerank, eval_ap)
        self.save_hyperparameters(
            ignore=[
                "net",
                "optimizer",
                "scheduler",
                "joint_loss",
                "multilabel_loss",
                "discriminative_loss",
            ],
            logger=False,
        )
        if num_classes < 1:
            raise ValueError(
                f"MARModule: num_classes (source identities = agents) must be >= 1, got "
                f"{num_classes}; is data.source set?"
            )
        if num_target_train < 2:
            raise ValueError(
                f"MARModule: num_target_train must be >= 2 (target train images), got "
                f"{num_target_train}; MAR needs data.target (e.g. data=synthetic_a2b)"
            )
        if init_mode not in INIT_MODES:
            raise ValueError(f"system.init_mode must be one of {INIT_MODES}, got {init_mode!r}")
        if warmup_epochs < 0:
            raise ValueError(f"system.warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0.0 < memory_momentum <= 1.0:
            raise ValueError(f"system.memory_momentum must be in (0, 1], got {memory_momentum}")

        self.net = net(num_classes=num_classes)
        self._check_network()
        self.joint_loss = joint_loss if joint_loss is not None else JointLoss(margin=1.0)
        if cml_batch_size is not None and cml_batch_size < 1:
            raise ValueError(f"loss.cml_batch_size must be >= 1 or null, got {cml_batch_size}")
        # η from the global batch when training starts (until then the paper's 368), unless the
        # loss is a module or a factory that already fixes batch_size
        self._cml_batch_auto = False
        if not isinstance(multilabel_loss, nn.Module):
            factory = MultilabelLoss if multilabel_loss is None else multilabel_loss
            kwargs: dict[str, Any] = {"num_views": num_target_cameras, "num_classes": num_classes}
            if "batch_size" not in getattr(factory, "keywords", {}):
                kwargs["batch_size"] = cml_batch_size or 368
                self._cml_batch_auto = cml_batch_size is None
            multilabel_loss = factory(**kwargs)
        self.multilabel_loss = multilabel_loss
        self.discriminative_loss = (
            discriminative_loss
            if discriminative_loss is not None
            else DiscriminativeLoss(mining_ratio=0.005)
        )
        self.weights = MARWeights(lambda_cml=lambda_cml, lambda_ral=lambda_ral, beta=beta)

        self.register_buffer("memory", torch.zeros(num_target_train, num_classes))
        self.register_buffer("memory_visited", torch.zeros(num_target_train, dtype=torch.bool))
        self.register_buffer("mar_initialised", torch.tensor(False))
        # Accumulated on the device every step, read every n steps: no per-step host sync.
        self.register_buffer("_nonfinite", torch.zeros(3, dtype=torch.bool), persistent=False)
        self._pretrained_path: str | None = None
        # DDP: the MAR state is updated identically on every rank (same gathered batch, same
        # kernels), so DDP must not re-send it from rank 0 before every forward
        # (broadcast_buffers=True: 212 MB per step for Market-1501's memory). The network's
        # BatchNorm buffers are still broadcast; `replica_drift` checks the claim periodically.
        self._ddp_params_and_buffers_to_ignore = self._mar_state_names()
        if compile:
            self.net.compile_backbone()

    def _check_network(self) -> None:
        net = self.net
        classifier = getattr(net, "classifier", None)
        if classifier is None:
            raise ValueError("MARModule: the network has no classifier (its rows are the agents)")
        if classifier.bias is not None:
            raise ValueError(
                "MARModule: the agents need a bias-free classifier: set model.classifier_bias=false"
            )
        if getattr(net, "neck", None) is not None:
            raise ValueError(
                "MARModule: the MAR network has no BNNeck (features are unit-normalised pooled "
                "features): set model.neck=none"
            )
        if getattr(net, "local_branch", None) is not None:
            raise ValueError("MARModule: MAR uses no local branch: set model.local_branch=false")

    # ------------------------------------------------------------------ properties
    @property
    def agents(self) -> Tensor:
        """(K, d) unit-norm reference agents (the normalised classifier rows), with gradient."""
        return nn.functional.normalize(self.net.classifier.weight.float(), dim=1)

    @property
    def initialised(self) -> bool:
        """Whether T0 and the CML centres have been computed (or restored)."""
        return bool(self.mar_initialised)

    def forward(self, images: Tensor) -> Tensor:
        """Retrieval embedding (N, 3, H, W) -> (N, D): the pooled global feature."""
        return self.net.embed(images)

    # ------------------------------------------------------------------ pretrained weights
    def load_pretrained(self, path: str | os.PathLike[str] | None) -> None:
        """Load the stage-1 weights (backbone + classifier = agents) into ``self.net``.

        Accepts a Lightning checkpoint of the source pretraining (``state_dict`` with ``net.*``
        keys) or a plain ReIDNet state dict. Raises a ValueError / FileNotFoundError naming the
        path when it is missing, unreadable or does not match this network.
        """
        if path is None or str(path) == "":
            raise ValueError(
                "system.pretrained_ckpt is not set: MAR stage 2 starts from the stage-1 source "
                "checkpoint, e.g. system.pretrained_ckpt=logs/mar/stage1/checkpoints/last.ckpt "
                "(train it with experiment=synthetic_source_pretrain; see docs/mar.md)"
            )
        path = str(path)
        state = read_net_state(path, "the stage-1 checkpoint")
        expected = self.net.classifier.weight.shape
        agents = state.get("classifier.weight")
        if agents is None:
            raise ValueError(
                f"system.pretrained_ckpt={path} has no classifier weight: stage 1 must train a "
                "classifier (loss=ce, model.neck=none, model.classifier_bias=false)"
            )
        if "classifier.bias" in state:
            raise ValueError(
                f"system.pretrained_ckpt={path} has a classifier bias; the agents need a "
                "bias-free classifier (stage 1 with model.classifier_bias=false)"
            )
        if tuple(agents.shape) != tuple(expected):
            raise ValueError(
                f"system.pretrained_ckpt={path} has {agents.shape[0]} agents of dimension "
                f"{agents.shape[1]}, but this run expects {expected[0]} (source identities of "
                f"data.source) of dimension {expected[1]} (model.backbone.name): pretrain on the "
                "same source data and backbone"
            )
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            summary = "\n".join(str(err).splitlines()[:6])
            raise ValueError(
                f"system.pretrained_ckpt={path} does not match the MAR network (model config: "
                f"last_stride/last_relu/neck must be those of stage 1).\n{summary}"
            ) from err
        self._pretrained_path = path
        rank_zero_info(f"MAR: loaded the stage-1 weights and {expected[0]} agents from {path}")

    @property
    def replicated_state(self) -> dict[str, Tensor]:
        """The MAR state that must be equal on every rank: memory, visited flags, T, the CML
        centres and the initialised flags (the buffers DDP does not broadcast)."""
        buffers = dict(self.named_buffers())
        return {n: buffers[n] for n in self._mar_state_names() if n != "_nonfinite"}

    def _mar_state_names(self) -> list[str]:
        """Every buffer outside the network: the MAR state (and the per-rank non-finite flags)."""
        return [name for name, _ in self.named_buffers() if not name.startswith("net.")]

    def global_batch_size(self) -> int:
        """Source + target images of one step over all ranks (the CML momentum's batch)."""
        datamodule = self.trainer.datamodule
        try:
            per_rank = datamodule.batch_size + datamodule.target_batch_size
        except (AttributeError, TypeError) as err:
            raise ValueError(
                "loss.cml_batch_size=null derives the CML momentum from the DataModule's "
                "batch_size + target_batch_size, which this run's DataModule "
                f"({type(datamodule).__name__}) lacks: set loss.cml_batch_size"
            ) from err
        return int(per_rank * self.trainer.world_size)

    def _set_cml_momentum(self) -> None:
        if not self._cml_batch_auto:
            return
        batch = self.global_batch_size()
        self.multilabel_loss.batch_size = batch
        self.multilabel_loss.moment = batch / 10000
        rank_zero_info(
            f"MAR: CML centre momentum eta = {batch} / 10000 = {batch / 10000:g} (global batch "
            f"over {self.trainer.world_size} rank(s); loss.cml_batch_size=null)"
        )

    # ------------------------------------------------------------------ initialisation
    def on_train_start(self) -> None:
        self._set_cml_momentum()  # not a buffer: set on every start, resumes included
        # on_train_start (not setup/on_fit_start): it runs after the checkpoint restore for every
        # strategy, so a resumed run sees mar_initialised=True and neither reads the stage-1
        # checkpoint nor recomputes the initialisation. Loading in place keeps the parameters
        # the optimizer and DDP already hold; every rank reads the same file.
        super().on_train_start()  # restores the RNG states of a resumed run
        if self.initialised:
            return
        if self._pretrained_path is None:  # not loaded by hand before fit
            self.load_pretrained(self.hparams.pretrained_ckpt)
        self.initialise_mar_state(self.trainer.datamodule)

    def init_inputs(self, datamodule: Any) -> dict[str, Any]:
        """Everything the initialisation's result (T0, centres) depends on, besides the stage-1
        weights: the network architecture (``repr``: last stride, last ReLU, pooling, ...), the
        target data (spec and every record's path, labels, size and mtime), the image pipeline
        (size, normalisation, augmentation settings), the randomness of the augmented pass (run
        seed, sampler seed, batch size, workers, world size), the precision and device, and the
        MAR settings (scale, K, mining ratio, mode, sampled pairs and seed)."""
        hp = self.hparams
        trainer = self._trainer
        target_data = getattr(datamodule, "target_data", None)
        records = getattr(target_data, "train", None)
        return {
            "network": repr(self.net),
            "embedding": getattr(self.net, "embedding", None),
            "target": getattr(datamodule, "target_spec", None) or {},
            "target_records": None if records is None else mar_init.records_digest(records),
            "num_items": hp.num_target_train,
            "size": (getattr(datamodule, "height", None), getattr(datamodule, "width", None)),
            "stats": getattr(datamodule, "stats", {}).get("target"),
            "augment": hp.init_augment,
            "augmentation": getattr(datamodule, "augment", None) if hp.init_augment else None,
            "run_seed": torch.initial_seed(),
            "data_seed": getattr(datamodule, "seed", None),
            "batch_size": getattr(datamodule, "target_batch_size", None),
            "num_workers": getattr(datamodule, "num_workers", None),
            "world_size": mar_init.dist_world()[0],
            "precision": None if trainer is None else str(trainer.precision),
            "device": self.device.type,
            "torch": torch.__version__,
            "scale": hp.scale,
            "num_agents": hp.num_classes,
            "mining_ratio": self.discriminative_loss.mining_ratio,
            "init_mode": hp.init_mode,
            "sampled": (hp.init_sampled_pairs, hp.init_seed) if hp.init_mode == "sampled" else None,
        }

    def _cache_key(self, datamodule: Any) -> str | None:
        if self.hparams.init_cache_dir is None or self._pretrained_path is None:
            return None
        inputs = self.init_inputs(datamodule)
        spec = inputs["target"]
        return mar_init.init_cache_key(
            mar_init.file_sha256(self._pretrained_path),
            str(spec.get("root", "")),
            inputs.pop("num_items"),
            inputs.pop("mining_ratio"),
            **inputs,
        )

    @torch.no_grad()
    def compute_init_state(self, datamodule: Any) -> dict[str, Tensor] | None:
        """Soft multilabels of every target train image from the current (pretrained) network in
        eval mode, gathered over ranks and de-duplicated; on rank 0 returns
        ``{"threshold": T0, "center_mean", "center_std"}`` (CPU), on other ranks None."""
        hp = self.hparams
        was_training = self.net.training
        self.net.eval()
        try:
            trainer = self._trainer
            autocast = trainer.precision_plugin.forward_context if trainer is not None else None
            loader = datamodule.target_init_dataloader(augment=hp.init_augment)
            sims, cams, index = mar_init.extract_target_similarities(
                self.net.embed, loader, self.agents.detach(), autocast
            )
        finally:
            self.net.train(was_training)
        sims, cams = mar_init.gather_by_index(index, sims, cams, num_items=hp.num_target_train)
        if mar_init.dist_world()[1] != 0:
            return None
        logits = hp.scale * sims
        # Centres on a scratch copy of the CML module (the real one is set from the result).
        scratch = MultilabelLoss(batch_size=1, num_classes=hp.num_classes).to(sims.device)
        scratch.init_centers(torch.log_softmax(logits, dim=1), cams)
        threshold = mar_init.init_threshold_value(
            torch.softmax(logits, dim=1),
            self.discriminative_loss.mining_ratio,
            mode=hp.init_mode,
            num_pairs=hp.init_sampled_pairs,
            seed=hp.init_seed,
            chunk_size=hp.init_chunk_size,
        )
        return {
            "threshold": threshold.detach().cpu(),
            "center_mean": scratch.center_mean.detach().cpu(),
            "center_std": scratch.center_std.detach().cpu(),
        }

    def initialise_mar_state(self, datamodule: Any) -> None:
        """Compute (or load from the cache) T0 and the CML centres, identically on every rank.

        Rank 0 decides cache hit/miss; on a miss every rank extracts its shard of the target
        train set, the shards are all-gathered and de-duplicated by index, rank 0 computes T0
        and the centres and writes the cache, and the result is broadcast to every rank.
        """
        hp = self.hparams
        _, rank = mar_init.dist_world()
        key = self._cache_key(datamodule) if rank == 0 else None
        state = mar_init.load_init_cache(hp.init_cache_dir, key) if key is not None else None
        hit = mar_init.broadcast_from_rank0(state is not None, self._trainer)
        if hit:
            rank_zero_info(
                f"MAR init: cache hit {mar_init.init_cache_path(hp.init_cache_dir, key)}"
            )
        else:
            rank_zero_info(
                f"MAR init: soft multilabels of {hp.num_target_train} target images, T0 "
                f"({hp.init_mode}) and CML centres"
            )
            state = self.compute_init_state(datamodule)
            if rank == 0 and key is not None:
                path = mar_init.save_init_cache(
                    hp.init_cache_dir, key, state, {"pretrained_ckpt": self._pretrained_path}
                )
                rank_zero_info(f"MAR init: cached in {path}")
        state = mar_init.broadcast_from_rank0(state, self._trainer)
        self.load_init_state(state)

    def load_init_state(self, state: dict[str, Tensor]) -> None:
        """Set T0 and the CML centres (and their initialised flags) from ``state``."""
        if not all(bool(torch.isfinite(state[k]).all()) for k in mar_init.INIT_STATE_KEYS):
            raise FloatingPointError(
                "MAR init produced non-finite T0 or CML centres: the pretrained network gives "
                f"NaN/inf features (system.pretrained_ckpt={self._pretrained_path})"
            )
        flag = torch.tensor(True)
        self.discriminative_loss.load_state_dict(
            {"threshold": state["threshold"].reshape(()).float(), "is_initialized": flag}
        )
        self.multilabel_loss.load_state_dict(
            {
                "center_mean": state["center_mean"].float(),
                "center_std": state["center_std"].float(),
                "is_initialized": flag,
            }
        )
        self.mar_initialised.fill_(True)
        rank_zero_info(f"MAR init: T0 = {float(state['threshold']):.6f}")

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        source, target = batch["source"], batch["target"]
        out = mar_train_step(
            source_feat=self.net.embed(source["img"]),
            source_pids=source["pid"],
            target_feat=self.net.embed(target["img"]),
            target_camids=target["camid"],
            target_index=target["index"],
            classifier_weight=self.net.classifier.weight,
            memory=self.memory,
            memory_visited=self.memory_visited,
            joint_loss=self.joint_loss,
            multilabel_loss=self.multilabel_loss,
            discriminative_loss=self.discriminative_loss,
            weights=self.weights,
            target_pids=target.get("pid"),
            scale=self.hparams.scale,
            memory_momentum=self.hparams.memory_momentum,
            mdl_active=self.current_epoch >= self.hparams.warmup_epochs,
        )
        self._nonfinite |= out.nonfinite
        batch_size = source["img"].shape[0]
        # No prog_bar: the progress bar reads its metrics on the host every batch (a sync).
        self.log_dict(
            {f"train/{k}": v for k, v in out.terms.items()},
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
        )
        self.log_dict(
            {f"mar/{k}": v for k, v in out.stats.items()},
            on_step=True,
            on_epoch=True,
            batch_size=batch_size,
        )
        return out.loss

    def _state_drift(self) -> Tensor:
        """(n,) bool per `replicated_state` entry: differs between ranks (one all-reduce, no
        host read; all False in a single process)."""
        return replica_drift(list(self.replicated_state.values()))

    def _check_state(self) -> None:
        """Fail loudly on non-finite MAR state or (DDP) on ranks whose MAR state differs."""
        state = self.replicated_state
        drift = self._state_drift()
        flags = torch.cat([self._nonfinite, drift]).tolist()  # the one host read of the check
        nonfinite, drifted = flags[: len(self._nonfinite)], flags[len(self._nonfinite) :]
        if any(drifted):
            names = [name for name, bad in zip(state, drifted) if bad]
            raise RuntimeError(
                f"MAR: the ranks' copies of {names} differ at epoch {self.current_epoch}, step "
                f"{self.global_step}. They are updated identically on every rank from the "
                "gathered batch and are not broadcast by DDP, so a difference means a rank "
                "computed something else (non-deterministic kernels, different code or data on "
                "one rank). Try torch.use_deterministic_algorithms(True); see docs/scaling.md."
            )
        if any(nonfinite):
            raise FloatingPointError(
                f"MAR: non-finite values in {describe_nonfinite(nonfinite)} at epoch "
                f"{self.current_epoch}, step {self.global_step}. Training stopped before the "
                "state poisons the run (a NaN memory row makes every agreement NaN and T stays "
                "NaN forever). Usual causes: too high a learning rate for the batch size (λ2=50 "
                "makes AL's effective lr 50x), or 16-bit activations; see docs/mar.md."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.hparams.finite_check_every_n_steps
        if every and (self.global_step % every == 0):
            self._check_state()

    def on_train_epoch_end(self) -> None:
        self._check_state()
