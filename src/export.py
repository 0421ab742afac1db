"""`python -m src.export ckpt_path=PATH format=onnx|torchscript`: the embedding network, checked.

Exports ``images (N, 3, H, W) float32, normalised -> features (N, D)`` (L2-normalised inside the
graph when the checkpoint's protocol ranks by cosine), writes a sidecar ``<out>.json`` with the
preprocessing (input size, mean, std, interpolation), the output dim and normalisation, then runs
the exported file (ONNX Runtime for ONNX, ``torch.jit.load`` for TorchScript) on real images of
the checkpoint's evaluation split and on random inputs and fails if the max abs difference to the
PyTorch model exceeds 1e-4 (ONNX) / 1e-5 (TorchScript) in float32. docs/inference.md.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from src.inference import FeatureExtractor
from src.systems.mar_init import file_sha256
from src.utils import RankedLogger

log = RankedLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
DEFAULT_ATOL = {"onnx": 1e-4, "torchscript": 1e-5}


class ParityError(AssertionError):
    """The exported model does not reproduce the PyTorch features."""


class EmbeddingModel(nn.Module):
    """What is exported: normalised images (N, 3, H, W) -> retrieval features (N, D), L2-normalised
    when `normalize` (the features of :class:`FeatureExtractor` without flip)."""

    def __init__(self, net: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.net = net
        self.normalize = normalize

    def forward(self, images: Tensor) -> Tensor:
        feats = self.net.embed(images)
        return F.normalize(feats, dim=1) if self.normalize else feats


def export_onnx(
    model: nn.Module,
    example: Tensor,
    out: Path,
    opset: int,
    dynamic_batch: bool,
    threads: int | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """torch.onnx (the torch.export-based exporter) -> `out`; returns an ONNX Runtime runner
    (`threads` intra-op threads; None: ONNX Runtime's default)."""
    import onnxruntime as ort

    dynamic = {"images": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["features"],
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": x})[0]

    return run


def export_torchscript(
    model: nn.Module, example: Tensor, out: Path
) -> Callable[[np.ndarray], np.ndarray]:
    """torch.jit.trace -> `out` (deprecated upstream, still the format C++/mobile loaders read);
    returns a runner of the file loaded back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(out))
        loaded = torch.jit.load(str(out), map_location="cpu")

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loaded(torch.from_numpy(x)).numpy()

    return run


def parity_inputs(
    extractor: FeatureExtractor, meta: dict[str, Any], cfg: DictConfig
) -> tuple[Tensor, int]:
    """(inputs (M, 3, H, W), number of real images): the first `parity_images` images of the
    checkpoint's evaluation split through its test transform, then `parity_random` N(0, 1) ones."""
    images: list[Tensor] = []
    if cfg.parity_data and cfg.parity_images > 0:
        datamodule = hydra.utils.instantiate(meta["data"], _convert_="all")
        try:
            datamodule.setup("test")
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"parity check: the checkpoint's evaluation data is missing ({err}); pass "
                "parity_data=false to check on random inputs only"
            ) from err
        records = [*datamodule.eval_data.query, *datamodule.eval_data.gallery]
        from src.data.image_io import read_image

        step = max(1, len(records) // cfg.parity_images)
        for record in records[::step][: cfg.parity_images]:
            images.append(extractor.transform(read_image(record.img_path)))
    num_real = len(images)
    g = torch.Generator().manual_seed(0)
    images += list(torch.randn(cfg.parity_random, *extractor.input_shape, generator=g))
    if not images:
        raise ValueError("parity check needs parity_images > 0 or parity_random > 0")
    return torch.stack(images), num_real


def check_parity(
    model: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    inputs: Tensor,
    batch: int | None,
    atol: float,
    dtype: torch.dtype,
) -> float:
    """Max abs difference between `model` (float32, eager) and `run` on `inputs`, in batches
    of `batch` (all at once when None); raises ParityError above `atol`."""
    step = batch or len(inputs)
    worst = 0.0
    for start in range(0, len(inputs), step):
        x = inputs[start : start + step]
        if len(x) < step and batch is not None:  # a fixed batch size: pad the last batch
            x = torch.cat([x, x[: step - len(x)].new_zeros(step - len(x), *x.shape[1:])])
        with torch.no_grad():
            ref = model.float()(x.float()).numpy()
        got = run(x.to(dtype).numpy()).astype(np.float32)
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > atol:
        raise ParityError(
            f"exported model differs from PyTorch by {worst:.3g} (max abs) > atol={atol:g}"
        )
    return worst


def export(cfg: DictConfig) -> dict[str, Any]:
    """The CLI task: returns the sidecar written next to the exported file."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: expected one of {sorted(FORMATS)}")
    ckpt = Path(cfg.ckpt_path)
    extractor = FeatureExtractor.from_checkpoint(ckpt, device="cpu", flip=False)
    meta = extractor.metadata
    out = Path(cfg.out) if cfg.out else ckpt.with_suffix(FORMATS[cfg.format])
    out.parent.mkdir(parents=True, exist_ok=True)
    model = EmbeddingModel(extractor.net, extractor.normalize).eval()
    dtype = torch.float16 if cfg.half else torch.float32
    inputs, num_real = parity_inputs(extractor, meta, cfg)
    example = inputs[: cfg.parity_batch].clone()
    export_model = EmbeddingModel(extractor.net, extractor.normalize).eval()
    if cfg.half:
        import copy

        export_model = copy.deepcopy(export_model).half()
    if cfg.format == "onnx":
        run = export_onnx(export_model, example.to(dtype), out, cfg.opset, cfg.dynamic_batch)
    else:
        run = export_torchscript(export_model, example.to(dtype), out)
    atol = cfg.atol if cfg.atol is not None else DEFAULT_ATOL[cfg.format]
    if cfg.half:
        with torch.no_grad():
            atol = 1e-2 * float(model(inputs.float()).abs().max())
    batch = None if cfg.dynamic_batch else cfg.parity_batch
    try:
        max_diff = check_parity(model, run, inputs, batch, atol, dtype)
        if cfg.dynamic_batch:  # also one image at a time
            max_diff = max(max_diff, check_parity(model, run, inputs[:2], 1, atol, dtype))
    except ParityError:
        out.unlink(missing_ok=True)
        raise
    spec = extractor.preprocessing
    with torch.no_grad():
        dim = int(model(inputs[:1].float()).shape[1])
    sidecar = {
        "file": out.name,
        "format": cfg.format,
        "input": {
            "name": "images",
            "shape": [
                "batch" if cfg.dynamic_batch else cfg.parity_batch,
                3,
                spec.height,
                spec.width,
            ],
            "dtype": "float16" if cfg.half else "float32",
            "layout": "NCHW, RGB",
            "height": spec.height,
            "width": spec.width,
            "resize_interpolation": spec.interpolation,
            "scale": "pixel / 255",
            "mean": list(spec.mean),
            "std": list(spec.std),
            "preprocessing": "resize to (height, width), x = (pixel / 255 - mean) / std",
        },
        "output": {
            "name": "features",
            "dim": dim,
            "normalisation": "l2" if extractor.normalize else "none",
            "distance": meta["protocol"]["metric"],
        },
        "protocol": meta["protocol"],
        "checkpoint": str(ckpt),
        "ckpt_sha256": file_sha256(ckpt),
        "marlin_version": meta.get("marlin_version"),
        "git_commit": meta.get("git_commit"),
        "opset": cfg.opset if cfg.format == "onnx" else None,
        "parity": {
            "real_images": num_real,
            "random_inputs": len(inputs) - num_real,
            "max_abs_diff": max_diff,
            "atol": atol,
            "reference": "PyTorch eager, float32",
        },
    }
    sidecar_path = Path(f"{out}.json")
    sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
    log.info(
        f"exported {out} ({cfg.format}, parity max abs diff {max_diff:.2e} <= {atol:g} on "
        f"{num_real} images + {len(inputs) - num_real} random inputs); sidecar {sidecar_path}"
    )
    return sidecar


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
