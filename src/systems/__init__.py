"""LightningModules (systems) holding plain nn.Modules; step logic lives in `steps.py`."""

from src.systems.base import ReIDSystem
from src.systems.cc_module import ClusterContrastModule
from src.systems.mar_module import MARModule
from src.systems.triplet_module import TripletReIDModule

__all__ = ["ClusterContrastModule", "MARModule", "ReIDSystem", "TripletReIDModule"]
