"""Reading the network weights of a source-pretrained (stage-1) checkpoint."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def read_net_state(path: str | os.PathLike[str], expected: str) -> dict[str, Tensor]:
    """The ``ReIDNet`` state dict in `path`: a Lightning checkpoint (its ``net.*`` keys, prefix
    stripped) or a plain state dict.

    Raises a FileNotFoundError / ValueError naming ``system.pretrained_ckpt=<path>`` when the file
    is missing, unreadable or holds no state dict; `expected` says what the file should be (it
    completes the missing-file message).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"system.pretrained_ckpt={path} does not exist (expected {expected}, "
            "e.g. <stage-1 run>/checkpoints/last.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"system.pretrained_ckpt={path} could not be read: {err}") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"system.pretrained_ckpt={path} holds no state dict")
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    return state
