"""Re-ID models: ResNet backbones, pooling, BNNeck/classifier heads, AlignedReID local branch."""

from src.models.backbones import build_backbone
from src.models.heads import BNNeck, build_classifier
from src.models.local_branch import LocalBranch
from src.models.pooling import GeneralizedMeanPooling, GlobalAvgPool, build_pooling
from src.models.reid_net import ReIDNet
from src.models.utils import param_groups

__all__ = [
    "BNNeck",
    "GeneralizedMeanPooling",
    "GlobalAvgPool",
    "LocalBranch",
    "ReIDNet",
    "build_backbone",
    "build_classifier",
    "build_pooling",
    "param_groups",
]
