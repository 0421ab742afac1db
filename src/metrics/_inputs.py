"""Input checks and chunking shared by the evaluation modules (not public API)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor | Sequence
Metric = Literal["euclidean", "cosine"]
APVariant = Literal["standard", "market_trapezoid"]

#: Default size of one query chunk, in distance-matrix elements (rows = this // num_gallery).
#: 2**23 float32 distances are 32 MiB; the ranking temporaries of a float32 chunk stay below
#: ~16 bytes per element (~130 MiB), those of a float64 chunk (full sort) below ~60.
DEFAULT_CHUNK_ELEMENTS = 2**23
_METRICS = ("euclidean", "cosine")
_AP_VARIANTS = ("standard", "market_trapezoid")


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x)}") from err


def _as_labels(x: ArrayLike, name: str, length: int, device: torch.device) -> Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{name}: expected a 1-D array of length {length}, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer labels, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _as_features(x: ArrayLike, name: str) -> Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D (num, dim) feature matrix, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features, got dtype {t.dtype}")
    # fp16/bf16 features are compared in fp32 (exact upcast); fp64 stays fp64.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_choice(value: str, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return int(value)


def chunk_elements(device: torch.device | None = None) -> int:
    """Distance elements per chunk: DEFAULT_CHUNK_ELEMENTS on the CPU; on a CUDA device, 1/64
    of its free memory (each distance carries ~16 bytes of ranking temporaries: 4x headroom),
    between DEFAULT_CHUNK_ELEMENTS and 2**28."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(max(DEFAULT_CHUNK_ELEMENTS, free // 64), 2**28))
    return DEFAULT_CHUNK_ELEMENTS


def _chunk_rows(
    chunk_size: int | None, num_rows: int, num_cols: int, device: torch.device | None = None
) -> int:
    if chunk_size is None:
        return max(1, min(num_rows, chunk_elements(device) // max(num_cols, 1)))
    return min(_check_positive_int(chunk_size, "chunk_size"), max(num_rows, 1))
