"""Shared parts of every re-ID system: evaluation on query+gallery and optimizer wiring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MaxMetric
from torchmetrics.utilities import dim_zero_cat

from src.metrics import RankList, ReIDMetric
from src.systems import checkpoint_meta
from src.systems.optim import build_optimizer
from src.systems.steps import extract_embeddings
from src.utils.precision import check_bf16_forward
from src.utils.rng import gather_rng_states, set_rng_states

EVAL_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")
EVAL_STAGES = ("val", "test")


@dataclass
class EvalOutputs:
    """What the last evaluation of a stage computed, kept for callbacks that asked for it
    (:meth:`ReIDSystem.request_eval_outputs`); the same on every rank.

    Attributes:
        stage: "val" or "test".
        epoch: ``current_epoch`` when it was computed.
        results: the metric values logged for it (``{"rank1": ..., "mAP": ...}``).
        ranklist: top-k gallery lists of every query (:meth:`ReIDMetric.topk_gallery`), or None.
        features: (N, D) float32 on CPU: the query and gallery features of all ranks,
            de-duplicated, queries first, each sorted by dataset ``index``; None unless asked.
        pids, camids, index: (N,) int64, is_query: (N,) bool, aligned with ``features``.
            ``index`` is the evaluation loader's: query i -> i, gallery j -> num_query + j.
    """

    stage: str
    epoch: int
    results: dict[str, float]
    ranklist: RankList | None = None
    features: Tensor | None = None
    pids: Tensor | None = None
    camids: Tensor | None = None
    is_query: Tensor | None = None
    index: Tensor | None = None


class ReIDSystem(L.LightningModule):
    """Base LightningModule: subclasses set `self.net` and implement `training_step`.

    Validation/test extract (optionally flip-averaged) embeddings of query+gallery, feed a
    DDP-aware `ReIDMetric`, and log `val/rank1`, `val/mAP`, `val/mINP`, ... plus the best-so-far
    `val/mAP_best` and `val/rank1_best` (what sweepers optimise).

    Callbacks that draw from an evaluation (rank lists, embedding projections) ask for its outputs
    with :meth:`request_eval_outputs` and read them from ``eval_outputs[stage]``
    (:class:`EvalOutputs`) after the stage's epoch end.
    """

    net: nn.Module
    #: resolved run config (primitives) for the checkpoint metadata; src.train sets it
    run_config: dict[str, Any] | None = None

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        flip_test: bool = False,
        eval_metric: str = "euclidean",
        rerank: bool = False,
        eval_ap: str = "standard",
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.flip_test = flip_test
        self.val_metric = ReIDMetric(metric=eval_metric, rerank=False, ap=eval_ap)
        self.test_metric = ReIDMetric(metric=eval_metric, rerank=rerank, ap=eval_ap)
        self.val_map_best = MaxMetric()
        self.val_rank1_best = MaxMetric()
        # stage -> (rank-list length, keep features): what callbacks asked evaluation to keep
        self._eval_requests: dict[str, tuple[int, bool]] = {}
        self.eval_outputs: dict[str, EvalOutputs] = {}
        self._rng_to_restore: dict[str, Any] | None = None

    # ----------------------------------------------------------------- exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every rank's global RNG states (python, numpy, torch CPU/CUDA) go into the
        checkpoint: what the model draws (dropout, ...) continues exactly after a resume.
        The checkpoint also describes itself (network, data, protocol: checkpoint_meta.py)."""
        checkpoint_meta.write_metadata(self, checkpoint)
        checkpoint["rng_states"] = gather_rng_states()
        # best-so-far values (torchmetrics keeps metric states out of the state_dict)
        checkpoint["val_best"] = {
            "mAP": self.val_map_best.max_value.detach().cpu(),
            "rank1": self.val_rank1_best.max_value.detach().cpu(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint_meta.restore_run_config(self, checkpoint)
        best = checkpoint.get("val_best")
        if best is not None:
            self.val_map_best.max_value.copy_(best["mAP"])
            self.val_rank1_best.max_value.copy_(best["rank1"])
        states = checkpoint.get("rng_states")
        trainer = self._trainer  # None when loaded outside a fit (load_from_checkpoint, src.eval)
        if not states or trainer is None or trainer.state.fn != "fit":
            return
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the RNG states of {len(states)} process(es), this run has "
                f"{trainer.world_size}: the resumed run is not bit-identical to an "
                "uninterrupted one"
            )
        self._rng_to_restore = states[rank] if rank < len(states) else None

    def on_fit_start(self) -> None:
        """bf16 self-check on CPU (src/utils/precision.py): stop, or apply the documented
        workaround, before training on silently wrong bf16 features."""
        trainer = self.trainer
        if str(trainer.precision).startswith("bf16") and self.device.type == "cpu":
            dm = trainer.datamodule
            shape = (4, 3, getattr(dm, "height", 256), getattr(dm, "width", 128))
            warning = check_bf16_forward(self.net, shape)
            if warning:
                rank_zero_warn(warning)

    def on_train_start(self) -> None:
        # Restored here, the last hook before the first resumed batch: nothing between the save
        # in the interrupted run and its next batch drew from these generators either (the
        # loaders have generators of their own, src.data.seeding).
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def request_eval_outputs(self, stage: str, ranklist_k: int = 0, features: bool = False) -> None:
        """Ask each evaluation of `stage` ("val"/"test") to keep an :class:`EvalOutputs` in
        ``self.eval_outputs[stage]``: the top-`ranklist_k` rank lists (0: none) and/or the
        gathered features. Off by default (it costs a top-k pass and a feature all-gather).
        Call it on every rank (e.g. from a callback's ``setup``): the gather is collective."""
        if stage not in EVAL_STAGES:
            raise ValueError(f"stage must be one of {EVAL_STAGES}, got {stage!r}")
        if ranklist_k < 0:
            raise ValueError(f"ranklist_k must be >= 0, got {ranklist_k}")
        old_k, old_features = self._eval_requests.get(stage, (0, False))
        self._eval_requests[stage] = (max(old_k, ranklist_k), old_features or features)

    # ----------------------------------------------------------------- evaluation
    def _eval_step(self, metric: ReIDMetric, batch: dict[str, Tensor]) -> None:
        feats = extract_embeddings(self.net, batch["img"], flip=self.flip_test)
        metric.update(feats, batch["pid"], batch["camid"], batch["is_query"], batch["index"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(self.val_metric, batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(self.test_metric, batch)

    def _compute(self, metric: ReIDMetric, stage: str) -> dict[str, float] | None:
        """Metric values; None during Lightning's sanity check, and None with a warning when a
        truncated evaluation (`limit_val_batches`, `fast_dev_run`) saw no query with a true
        match in the gallery."""
        try:
            if self.trainer.sanity_checking:
                # Lightning's sanity check (num_sanity_val_steps > 0) sees a few batches: its
                # numbers would mean nothing, and the full split was checked at setup already.
                return None
            try:
                results = metric.compute()
            except ValueError as err:
                if self._eval_is_truncated(stage):
                    # the full split was checked at setup; only a cut-down loader gets here
                    cut = (
                        "fast_dev_run"
                        if self.trainer.fast_dev_run
                        else f"limit_{stage}_batches={self._eval_limit(stage)}"
                    )
                    rank_zero_warn(
                        f"{stage} evaluation skipped: the {stage} batches evaluated ({cut}) hold "
                        f"no query with a true match ({err}); {stage}/* not logged"
                    )
                    return None
                raise
            values = {k: float(results[k]) for k in EVAL_KEYS}
            self._keep_eval_outputs(metric, stage, values)
        finally:
            metric.reset()
        return values

    def _keep_eval_outputs(self, metric: ReIDMetric, stage: str, values: dict[str, float]) -> None:
        """Store what `request_eval_outputs` asked for (before the metric is reset)."""
        ranklist_k, features = self._eval_requests.get(stage, (0, False))
        if (not ranklist_k and not features) or self.trainer.sanity_checking:
            return
        outputs = EvalOutputs(stage=stage, epoch=self.current_epoch, results=values)
        if ranklist_k:
            outputs.ranklist = metric.topk_gallery(k=ranklist_k)
        if features:
            self._gather_features(metric, outputs)
        self.eval_outputs[stage] = outputs

    @staticmethod
    def _gather_features(metric: ReIDMetric, outputs: EvalOutputs) -> None:
        """All ranks' stored samples (the metric's own all-gather), de-duplicated as the metric
        does: the first occurrence of each (is_query, index) is kept."""
        with metric.sync_context():  # a no-op in a single process
            feats = dim_zero_cat(metric.features).float()
            pids, camids, is_query, index = (
                dim_zero_cat(state).long()
                for state in (metric.pids, metric.camids, metric.is_query, metric.index)
            )
        # queries first, each by index; the stable sort keeps a repeated sample's first copy first
        key = (is_query == 0).long() * (index.max() + 1) + index
        order = torch.sort(key, stable=True).indices
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = key[order][1:] != key[order][:-1]
        keep = order[first]
        outputs.features = feats[keep].cpu()
        outputs.pids, outputs.camids = pids[keep].cpu(), camids[keep].cpu()
        outputs.is_query, outputs.index = (is_query[keep] != 0).cpu(), index[keep].cpu()

    def _eval_limit(self, stage: str) -> float | int:
        trainer = self.trainer
        return trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches

    def _eval_is_truncated(self, stage: str) -> bool:
        return bool(self.trainer.fast_dev_run) or self._eval_limit(stage) != 1.0

    def on_validation_epoch_end(self) -> None:
        results = self._compute(self.val_metric, "val")
        if results is None or self.trainer.sanity_checking:
            return
        self.log_dict({f"val/{k}": v for k, v in results.items()})
        self.val_map_best(torch.tensor(results["mAP"]))
        self.val_rank1_best(torch.tensor(results["rank1"]))
        self.log("val/mAP_best", self.val_map_best.compute(), prog_bar=True)
        self.log("val/rank1_best", self.val_rank1_best.compute())

    def on_test_epoch_end(self) -> None:
        results = self._compute(self.test_metric, "test")
        if results is not None:
            self.log_dict({f"test/{k}": v for k, v in results.items()})

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's loader; the network, losses, optimizer and scheduler (which are not
        hyper-parameters) are rebuilt from the checkpoint's metadata unless passed."""
        checkpoint = checkpoint_meta.load_checkpoint(checkpoint_path)
        try:
            factories = checkpoint_meta.init_factories(checkpoint, checkpoint_path, cls)
        except checkpoint_meta.MissingMetadataError:
            if "net" not in kwargs:
                raise
            factories = {}
        return super().load_from_checkpoint(checkpoint_path, *args, **{**factories, **kwargs})

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self, self.optimizer_factory)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer=optimizer)
        # a schedule counted in optimizer steps says so (ExponentialDecayLR(interval="step"))
        interval = getattr(scheduler, "interval", "epoch")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "frequency": 1},
        }
