"""`RankListLogger`: the rank lists of a few fixed queries after each evaluation, as a picture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule, Trainer

from src.callbacks._images import Enabled, EvalPictureCallback, image_dir, log_png
from src.metrics.ranklist import plot_ranklist
from src.systems.base import EVAL_STAGES, EvalOutputs, ReIDSystem


class RankListLogger(EvalPictureCallback):
    """After every validation (and the test), draw `num_queries` queries with their top-`topk`
    gallery images framed green (same identity) or red, ranked exactly as the evaluation ranks
    them (:meth:`ReIDMetric.topk_gallery`: same-camera matches skipped, re-ranked distances when
    the test re-ranks).

    The queries are the same in every picture (evenly spaced over the query set, sorted by
    index), so successive epochs show how their lists improve. Each picture is written to
    ``<dirpath>/val_epoch<NNN>.png`` / ``test.png`` (default ``dirpath``: ``<run dir>/ranklists``)
    and logged as ``<stage>/ranklist`` to W&B (``log_image``) and TensorBoard. Drawing happens on
    rank 0; the rank lists are computed on every rank (the evaluation is already gathered there).

    Args:
        num_queries: queries (rows) per picture.
        topk: gallery images per query.
        stages: evaluations to draw: "val" and/or "test".
        dirpath: folder of the PNGs (None: ``<trainer.default_root_dir>/ranklists``).
        enabled: "auto" (draw when a W&B or TensorBoard logger is attached), True, False.
    """

    def __init__(
        self,
        num_queries: int = 8,
        topk: int = 10,
        stages: Sequence[str] = ("val", "test"),
        dirpath: str | None = None,
        enabled: Enabled = "auto",
    ) -> None:
        super().__init__(enabled)
        if num_queries < 1 or topk < 1:
            raise ValueError(f"num_queries and topk must be >= 1, got {num_queries}, {topk}")
        unknown = set(stages) - set(EVAL_STAGES)
        if unknown:
            raise ValueError(f"stages must be among {EVAL_STAGES}, got {sorted(unknown)}")
        self.num_queries = num_queries
        self.topk = topk
        self.stages = tuple(stages)
        self.dirpath = dirpath
        # the EvalOutputs drawn last per stage (held, so that a stale one is never redrawn)
        self._last_drawn: dict[str, EvalOutputs] = {}

    def request(self, system: ReIDSystem) -> None:
        for eval_stage in self.stages:
            system.request_eval_outputs(eval_stage, ranklist_k=self.topk)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active and not trainer.sanity_checking and "val" in self.stages:
            self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active and "test" in self.stages:
            self._draw(trainer, pl_module, "test")

    def _draw(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        outputs = getattr(pl_module, "eval_outputs", {}).get(stage)
        # none (skipped, truncated evaluation) or already drawn (a stale one from before)
        if outputs is None or outputs.ranklist is None or outputs is self._last_drawn.get(stage):
            return
        self._last_drawn[stage] = outputs
        if not trainer.is_global_zero:
            return
        query, gallery = trainer.datamodule.eval_records(stage)
        # evaluation indices: query i -> i, gallery j -> num_query + j (ImageDataset.query_gallery)
        records = [*query, *gallery]
        ranks = outputs.ranklist
        num_q = len(ranks.query_index)
        rows = torch.linspace(0, num_q - 1, min(self.num_queries, num_q)).round().long()
        # a test evaluates a checkpoint: the epoch counter then is not the checkpoint's epoch
        name = "test.png" if stage == "test" else f"{stage}_epoch{outputs.epoch:03d}.png"
        out = image_dir(trainer, self.dirpath, "ranklists") / name
        plot_ranklist(
            query_paths=[records[i].img_path for i in ranks.query_index.tolist()],
            gallery_paths=[record.img_path for record in records],
            topk_indices=ranks.gallery_index,
            matches=ranks.matches,
            out_path=out,
            topk=self.topk,
            rows=rows.unique().tolist(),
        )
        results = outputs.results
        when = "test" if stage == "test" else f"{stage} epoch {outputs.epoch}"
        caption = (
            f"{when}: rank-1 {100 * results['rank1']:.1f}%, mAP {100 * results['mAP']:.1f}% "
            "(green: same identity)"
        )
        log_png(trainer, f"{stage}/ranklist", out, caption)
