"""`RankListLogger`: rank lists of the worst and of random queries after each evaluation."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningModule, Trainer

from src.callbacks._images import Enabled, EvalPictureCallback, image_dir, log_png
from src.metrics.ranklist import RankListRows, write_ranklist
from src.systems.base import EVAL_STAGES, EvalOutputs, ReIDSystem


class RankListLogger(EvalPictureCallback):
    """After every validation (and the test), the rank lists of the worst queries by AP and of
    a random sample of queries, each with its top-`topk` gallery images framed green (same
    identity) or red and titled with identity, camera and distance, ranked exactly as the
    evaluation ranks them (:meth:`ReIDMetric.topk_gallery`: same-camera matches skipped,
    re-ranked distances when the test re-ranks).

    The random sample is drawn with a fixed seed, so successive epochs show the same queries;
    the worst ones are those of that evaluation. Each evaluation writes
    ``<dirpath>/val_epoch<NNN>.png`` / ``test.png`` (default ``dirpath``: ``<run dir>/ranklists``)
    and, beside it, a ``.tsv`` with one line per (query, rank): paths, ids, cameras, the query's
    AP, distance, match. The picture is also logged as ``<stage>/ranklist`` to W&B
    (``log_image``) and TensorBoard. Drawing happens on rank 0; the rank lists are computed on
    every rank (the evaluation is already gathered there). Cost: a top-k pass over the
    query-gallery distances and one matplotlib figure per evaluation.

    Args:
        num_worst: queries of lowest AP per picture.
        num_random: randomly drawn queries per picture (seeded by `seed`).
        topk: gallery images per query.
        stages: evaluations to draw: "val" and/or "test".
        dirpath: folder of the PNGs (None: ``<trainer.default_root_dir>/ranklists``).
        enabled: True (default: every run writes them), False, or "auto" (only when a W&B or
            TensorBoard logger is attached).
        seed: the random sample's seed.
    """

    def __init__(
        self,
        num_worst: int = 5,
        num_random: int = 5,
        topk: int = 10,
        stages: Sequence[str] = ("val", "test"),
        dirpath: str | None = None,
        enabled: Enabled = True,
        seed: int = 0,
    ) -> None:
        super().__init__(enabled)
        if num_worst < 0 or num_random < 0 or num_worst + num_random < 1 or topk < 1:
            raise ValueError(
                "num_worst, num_random must be >= 0 with at least one query, and topk >= 1; "
                f"got {num_worst}, {num_random}, {topk}"
            )
        unknown = set(stages) - set(EVAL_STAGES)
        if unknown:
            raise ValueError(f"stages must be among {EVAL_STAGES}, got {sorted(unknown)}")
        self.num_worst = num_worst
        self.num_random = num_random
        self.topk = topk
        self.stages = tuple(stages)
        self.dirpath = dirpath
        self.seed = seed
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
        queries = [records[i] for i in ranks.query_index.tolist()]
        # a test evaluates a checkpoint: the epoch counter then is not the checkpoint's epoch
        name = "test.png" if stage == "test" else f"{stage}_epoch{outputs.epoch:03d}.png"
        out, _ = write_ranklist(
            image_dir(trainer, self.dirpath, "ranklists") / name,
            queries=RankListRows.from_records(queries),
            gallery=RankListRows.from_records(records),
            positions=ranks.gallery_index,
            matches=ranks.matches,
            distances=ranks.distances,
            query_ap=ranks.ap,
            num_worst=self.num_worst,
            num_random=self.num_random,
            seed=self.seed,
            topk=self.topk,
        )
        results = outputs.results
        when = "test" if stage == "test" else f"{stage} epoch {outputs.epoch}"
        caption = (
            f"{when}: rank-1 {100 * results['rank1']:.1f}%, mAP {100 * results['mAP']:.1f}% "
            f"({self.num_worst} worst queries by AP, then {self.num_random} random ones; green: "
            "same identity)"
        )
        log_png(trainer, f"{stage}/ranklist", out, caption)
