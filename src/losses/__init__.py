"""Losses of the re-ID papers: batch-hard triplet, FaceNet triplet, AlignedReID, label-smoothed
cross-entropy, center loss, and the MAR terms. Every loss computes in fp32 under autocast. See docs/losses.md.
"""

from .aligned_triplet import AlignedTripletLoss, AlignedTripletStats
from .center import CenterLoss
from .distributed import gather_with_grad
from .label_smooth import CrossEntropyLabelSmooth
from .mar import DiscriminativeLoss, JointLoss, MultilabelLoss, soft_multilabel
from .triplet import TripletLoss, TripletStats
from .triplet_margin import TripletMarginLoss

__all__ = [
    "AlignedTripletLoss",
    "AlignedTripletStats",
    "CenterLoss",
    "CrossEntropyLabelSmooth",
    "DiscriminativeLoss",
    "JointLoss",
    "MultilabelLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "TripletStats",
    "gather_with_grad",
    "soft_multilabel",
]
