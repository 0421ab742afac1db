"""LightningModules (systems) holding plain nn.Modules; step logic lives in `steps.py`."""

from src.systems.base import ReIDSystem
from src.systems.mar_module import MARModule
from src.systems.triplet_module import TripletReIDModule

__all__ = ["MARModule", "ReIDSystem", "TripletReIDModule"]
