"""Callbacks the scale-out tests attach to a run: each rank writes what it saw to a file that the
pytest process reads after `ddp_spawn` has joined its workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def mar_state(pl_module: LightningModule) -> dict[str, torch.Tensor]:
    """Copies of the MAR state that must stay equal on every rank."""
    return {
        "memory": pl_module.memory.detach().clone(),
        "memory_visited": pl_module.memory_visited.detach().clone(),
        "threshold": pl_module.discriminative_loss.threshold.detach().clone(),
        "center_mean": pl_module.multilabel_loss.center_mean.detach().clone(),
        "center_std": pl_module.multilabel_loss.center_std.detach().clone(),
    }


class BatchRecorder(Callback):
    """Per rank: the identities of every training batch (source batch in domain adaptation),
    the dtype of the backbone's output (autocast check) and, for MAR, a copy of the MAR state
    after every training step (`on_train_batch_end`: after the step's memory/T/centre updates,
    before anything could re-send them, so the test compares what each rank computed itself)
    and the CML momentum. Written to ``out_dir/rank{r}.pt``; after a test, the test's gathered
    evaluation outputs (when a callback asked for them) to ``out_dir/rank{r}_test.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.pids: list[torch.Tensor] = []
        self.feature_dtypes: set[str] = set()
        self.states: list[dict[str, torch.Tensor]] = []
        self._handle: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        def record(module: Any, inputs: Any, output: torch.Tensor) -> None:
            if module.training:
                self.feature_dtypes.add(str(output.dtype))

        self._handle = pl_module.net.backbone.register_forward_hook(record)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        source = batch.get("source", batch)
        self.pids.append(source["pid"].detach().cpu().clone())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if hasattr(pl_module, "memory"):
            self.states.append(mar_state(pl_module))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
        result: dict[str, Any] = {
            "world_size": trainer.world_size,
            "pids": self.pids,
            "feature_dtypes": sorted(self.feature_dtypes),
            "precision": trainer.precision,
            "batchnorm_types": sorted(
                {
                    type(m).__name__
                    for m in pl_module.modules()
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                }
            ),
        }
        if hasattr(pl_module, "memory"):  # MAR
            result["states"] = self.states
            result["visited_rows"] = int(pl_module.memory_visited.sum())
            result["cml_moment"] = pl_module.multilabel_loss.moment
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outputs = getattr(pl_module, "eval_outputs", {}).get("test")
        if outputs is None or outputs.features is None:
            return
        fields = ("features", "pids", "camids", "is_query", "index")
        result = {name: getattr(outputs, name) for name in fields}
        result["gallery_index"] = outputs.ranklist.gallery_index if outputs.ranklist else None
        torch.save(result, Path(self.out_dir) / f"rank{trainer.global_rank}_test.pt")
