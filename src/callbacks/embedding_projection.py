"""`EmbeddingProjection`: a 2-D PCA picture of query/gallery features coloured by identity."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from src.callbacks._images import Enabled, EvalPictureCallback, image_dir, log_png
from src.systems.base import EVAL_STAGES, EvalOutputs, ReIDSystem


def pca_2d(features: Tensor) -> tuple[Tensor, float]:
    """Exact 2-D PCA: (N, D) -> ((N, 2) coordinates, fraction of the variance they explain).

    Signs are fixed (largest |loading| positive per component) so the picture is deterministic.
    """
    centred = features.double() - features.double().mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * signs
    total = (singular**2).sum()
    explained = float((singular[:2] ** 2).sum() / total) if total > 0 else 0.0
    return (centred @ components.T).float(), explained


def pick_identities(query_pids: Tensor, num: int) -> Tensor:
    """`num` query identities evenly spaced over the sorted distinct ones (deterministic)."""
    ids = torch.unique(query_pids[query_pids > 0])
    if len(ids) <= num:
        return ids
    return ids[torch.linspace(0, len(ids) - 1, num).round().long()]


class EmbeddingProjection(EvalPictureCallback):
    """At the end, project the retrieval features of `num_identities` identities (their queries
    and gallery images) onto their first two principal components and draw them coloured by
    identity: queries as stars, gallery images as dots. Well-separated clusters mean a good
    embedding; the title gives the variance the two components explain.

    ``stage="test"`` (default) draws the test of the final/best checkpoint (``src.train`` runs it
    after fitting); ``stage="val"`` draws the last validation when training ends (the features of
    every validation are then gathered, in case it is the last). Written to
    ``<dirpath>/embedding_<stage>.png`` (default ``dirpath``: the run directory) and logged as
    ``<stage>/embedding_pca`` to W&B and TensorBoard, on rank 0.

    Args:
        stage: "test" or "val".
        num_identities: identities drawn (a plot of hundreds of colours is unreadable).
        dirpath: folder of the PNG (None: ``trainer.default_root_dir``).
        enabled: "auto" (draw when a W&B or TensorBoard logger is attached), True, False.
    """

    def __init__(
        self,
        stage: str = "test",
        num_identities: int = 20,
        dirpath: str | None = None,
        enabled: Enabled = "auto",
    ) -> None:
        super().__init__(enabled)
        if stage not in EVAL_STAGES:
            raise ValueError(f"stage must be one of {EVAL_STAGES}, got {stage!r}")
        if num_identities < 1:
            raise ValueError(f"num_identities must be >= 1, got {num_identities}")
        self.stage = stage
        self.num_identities = num_identities
        self.dirpath = dirpath

    def request(self, system: ReIDSystem) -> None:
        system.request_eval_outputs(self.stage, features=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active and self.stage == "val":
            self._draw(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.active and self.stage == "test":
            self._draw(trainer, pl_module)

    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        outputs: EvalOutputs | None = getattr(pl_module, "eval_outputs", {}).get(self.stage)
        if outputs is None or outputs.features is None or not trainer.is_global_zero:
            return
        chosen = pick_identities(outputs.pids[outputs.is_query], self.num_identities)
        mask = torch.isin(outputs.pids, chosen)
        if int(mask.sum()) < 3:
            return
        coords, explained = pca_2d(outputs.features[mask])
        colour = torch.searchsorted(chosen, outputs.pids[mask])
        is_query = outputs.is_query[mask]

        from matplotlib import colormaps
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 5.6), layout="constrained")
        ax = fig.add_subplot()
        cmap = colormaps["tab20"]
        colours = cmap(colour.numpy() % cmap.N)
        xy = coords.numpy()
        gallery = (~is_query).numpy()
        query = is_query.numpy()
        ax.scatter(xy[gallery, 0], xy[gallery, 1], c=colours[gallery], s=14, alpha=0.7)
        ax.scatter(
            xy[query, 0],
            xy[query, 1],
            c=colours[query],
            s=90,
            marker="*",
            edgecolors="black",
            linewidths=0.5,
        )
        results = outputs.results
        when = "test" if self.stage == "test" else f"last validation (epoch {outputs.epoch})"
        ax.set_title(
            f"{when}: {len(chosen)} identities, PCA "
            f"{100 * explained:.0f}% of variance\nrank-1 {100 * results['rank1']:.1f}%, "
            f"mAP {100 * results['mAP']:.1f}%   (stars: queries, dots: gallery)",
            fontsize=9,
        )
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        out = image_dir(trainer, self.dirpath, "") / f"embedding_{self.stage}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        caption = f"{self.stage}: 2-D PCA of {len(chosen)} identities (colour = identity)"
        log_png(trainer, f"{self.stage}/embedding_pca", out, caption)
