"""The re-ID network: ResNet backbone -> global pooling -> optional BNNeck -> optional classifier,
plus an optional AlignedReID local branch on the last feature map."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from src.models.backbones import build_backbone
from src.models.heads import BNNeck, EmbeddingHead, build_classifier
from src.models.local_branch import LocalBranch
from src.models.pooling import build_pooling

__all__ = ["ReIDNet"]

_NECKS = ("bnneck", "none")
_EMBEDS = ("bn", "global")


class ReIDNet(nn.Module):
    """Person re-ID network (a plain ``nn.Module``; Lightning systems hold it).

    Common settings:

    * Hermans et al. batch-hard triplet (TriNet): ``last_stride=2, head_dims=(1024, 128),
      neck="none", num_classes=0``.
    * Bag of Tricks strong baseline: ``last_stride=1, neck="bnneck", num_classes=#ids,
      classifier_bias=False, embed="bn"`` (triplet on ``global_feat``, CE on ``logits``).
    * AlignedReID: ``local_branch=True`` (local features for the aligned local distance).
    * MAR: ``backbone="resnet50", last_stride=2, last_relu=False, neck="none",
      num_classes=#agents, classifier_bias=False``; ``classifier.weight`` rows are the agents
      (the MAR system normalises features and agents itself).

    Args:
        backbone: ``"resnet18" | "resnet34" | "resnet50" | "resnet101"``.
        pretrained: ImageNet weights via torchvision (see :func:`build_backbone`).
        weights_path: local torchvision-format backbone state dict (overrides ``pretrained``).
        last_stride: layer4 stride, 1 or 2.
        last_relu: ``False`` drops the ReLU after the last residual block (MAR).
        pooling: ``"avg"`` or ``"gem"`` global pooling.
        neck: ``"bnneck"`` (BatchNorm1d with frozen zero shift) or ``"none"``.
        num_classes: identities of the classifier; 0 = no classifier.
        classifier_bias: bias of the classifier Linear.
        local_branch: add the AlignedReID local branch.
        local_dim: channels d of each local feature.
        embed: retrieval feature of :meth:`embed`: ``"bn"`` (after BNNeck; equals the pooled
            feature when ``neck="none"``) or ``"global"`` (pooled feature before BNNeck).
        gem_p: initial GeM exponent (``pooling="gem"`` only).
        local_pool: ``"max"`` (AlignedReID paper) or ``"avg"`` pooling of each stripe.
        head_dims: TriNet embedding head on the pooled feature (:class:`EmbeddingHead`):
            hidden widths then the embedding size, e.g. ``(1024, 128)``; empty: none. With a
            head, ``global_feat`` (and ``feat_dim``) is the head's output.

    Attributes:
        feat_dim: D, dimension of ``global_feat``: the pooled feature (512 for resnet18/34, 2048
            for 50/101), or the embedding head's output.
        num_classes: classifier outputs C (0 when there is no classifier).
        classifier: ``nn.Linear(D, C)`` or ``None``.
        neck: :class:`BNNeck` or ``None``.
        local_branch: :class:`LocalBranch` or ``None``.
        embedding: the ``embed`` option.
    """

    def __init__(
        self,
        backbone: str | Mapping[str, Any] = "resnet50",
        pretrained: bool = False,
        weights_path: str | os.PathLike[str] | None = None,
        last_stride: int = 1,
        last_relu: bool = True,
        pooling: str = "avg",
        neck: str = "bnneck",
        num_classes: int = 0,
        classifier_bias: bool = False,
        local_branch: bool = False,
        local_dim: int = 128,
        embed: str = "bn",
        gem_p: float = 3.0,
        local_pool: str = "max",
        head_dims: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if isinstance(backbone, Mapping):
            # Hydra layout: model.backbone = {name, pretrained, weights_path, last_stride, last_relu}
            unknown = set(backbone) - {
                "name",
                "pretrained",
                "weights_path",
                "last_stride",
                "last_relu",
            }
            if unknown or "name" not in backbone:
                raise ValueError(
                    f"model.backbone must have a `name` and only the keys name, pretrained, "
                    f"weights_path, last_stride, last_relu; got {sorted(backbone)}"
                )
            pretrained = backbone.get("pretrained", pretrained)
            weights_path = backbone.get("weights_path", weights_path)
            last_stride = backbone.get("last_stride", last_stride)
            last_relu = backbone.get("last_relu", last_relu)
            backbone = backbone["name"]
        if neck not in _NECKS:
            raise ValueError(f"Unknown neck {neck!r} (model.neck); expected one of {_NECKS}.")
        if embed not in _EMBEDS:
            raise ValueError(f"Unknown embed {embed!r} (model.embed); expected one of {_EMBEDS}.")
        if num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {num_classes}.")
        self.backbone, self.feat_dim = build_backbone(
            backbone,
            pretrained=pretrained,
            weights_path=weights_path,
            last_stride=last_stride,
            last_relu=last_relu,
        )
        self.pool = build_pooling(pooling, p=gem_p) if pooling == "gem" else build_pooling(pooling)
        pooled_dim = self.feat_dim
        self.head = EmbeddingHead(pooled_dim, head_dims) if len(head_dims) else None
        if self.head is not None:
            self.feat_dim = self.head.out_dim
        self.neck = BNNeck(self.feat_dim) if neck == "bnneck" else None
        self.num_classes = num_classes
        self.classifier = (
            build_classifier(self.feat_dim, num_classes, bias=classifier_bias)
            if num_classes > 0
            else None
        )
        self.local_branch = (
            LocalBranch(pooled_dim, local_dim, pool=local_pool) if local_branch else None
        )
        self.embedding = embed

    def compile_backbone(self, **kwargs: Any) -> None:
        """`torch.compile` the backbone in place (`nn.Module.compile`): parameter names, and so
        checkpoints, stay those of the plain module."""
        self.backbone.compile(**kwargs)

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        """Run the network on a batch of images.

        Args:
            x: images ``(N, 3, H, W)``.

        Returns:
            dict with
            ``"global_feat"``: ``(N, D)`` pooled feature (through the embedding head, if any)
            before the neck (triplet loss input);
            ``"bn_feat"``: ``(N, D)`` after BNNeck (the same tensor as ``global_feat`` when
            ``neck="none"``);
            ``"logits"``: ``(N, C)`` classifier output on ``bn_feat`` (on ``global_feat`` when no
            neck), or ``None`` when ``num_classes == 0``;
            ``"local_feat"``: ``(N, m, d)`` AlignedReID stripes (``m = h`` rows of the final
            map), or ``None`` without the local branch.
        """
        feature_map = self.backbone(x)  # (N, D, h, w)
        global_feat = self.pool(feature_map)  # (N, D)
        if self.head is not None:
            global_feat = self.head(global_feat)
        bn_feat = self.neck(global_feat) if self.neck is not None else global_feat
        logits = self.classifier(bn_feat) if self.classifier is not None else None
        local_feat = self.local_branch(feature_map) if self.local_branch is not None else None
        return {
            "global_feat": global_feat,
            "bn_feat": bn_feat,
            "logits": logits,
            "local_feat": local_feat,
        }

    def embed(self, x: Tensor) -> Tensor:
        """Retrieval feature ``(N, D)`` of images ``(N, 3, H, W)``.

        ``bn_feat`` when the model has a BNNeck and ``embed="bn"``, else ``global_feat``. Skips
        the classifier and the local branch. Call in eval mode (BN running statistics).
        """
        feat = self.pool(self.backbone(x))
        if self.head is not None:
            feat = self.head(feat)
        if self.embedding == "bn" and self.neck is not None:
            feat = self.neck(feat)
        return feat
