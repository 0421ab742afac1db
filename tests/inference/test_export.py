"""src.export: ONNX / TorchScript files that reproduce the evaluator's features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from src.export import ParityError, export
from src.inference import FeatureExtractor
from tests.inference._helpers import eval_reference
from tests.inference.conftest import compose_cfg


def _export(ckpt, tmp_path, *overrides):
    cfg = compose_cfg(
        [f"ckpt_path={ckpt}", f"out={tmp_path}/model", *overrides], tmp_path / "run", "export"
    )
    cfg.out = str(tmp_path / ("model.onnx" if cfg.format == "onnx" else "model.pt"))
    return export(cfg), cfg.out


def _run(fmt: str, path: str, x: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x})[0]
    with torch.no_grad():
        return torch.jit.load(path)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("which", ["supervised", "mar"])
def test_exported_model_gives_the_evaluators_features(
    which, fmt, supervised_ckpt, mar_ckpt, tmp_path
):
    ckpt = supervised_ckpt if which == "supervised" else mar_ckpt
    sidecar, out = _export(ckpt, tmp_path, f"format={fmt}")
    atol = 1e-4 if fmt == "onnx" else 1e-5
    assert sidecar["parity"]["max_abs_diff"] <= atol and sidecar["parity"]["real_images"] == 16
    assert json.loads(Path(f"{out}.json").read_text()) == sidecar
    extractor = FeatureExtractor.from_checkpoint(ckpt, device="cpu")
    spec = extractor.preprocessing
    assert sidecar["input"]["mean"] == list(spec.mean) and sidecar["input"]["std"] == list(spec.std)
    assert (sidecar["input"]["height"], sidecar["input"]["width"]) == (32, 16)
    assert sidecar["output"]["dim"] == 512
    assert sidecar["output"]["normalisation"] == ("l2" if which == "mar" else "none")
    # the sidecar's preprocessing + the file == the evaluator's features of the split
    ref = eval_reference(ckpt)
    images = torch.stack([extractor.transform(extractor._to_pil(p)) for p in ref.paths[:9]])
    got = _run(fmt, out, images.numpy())  # dynamic batch: 9 images at once
    assert np.abs(got - ref.feats[:9].numpy()).max() <= atol


def test_parity_failure_fails_the_export(supervised_ckpt, tmp_path, monkeypatch):
    """An exported file 2e-5 off the PyTorch features fails the 1e-5 TorchScript check."""
    import src.export as export_module

    real = export_module.export_torchscript

    def off_by_a_bit(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda x: run(x) + 2e-5

    monkeypatch.setattr(export_module, "export_torchscript", off_by_a_bit)
    with pytest.raises(ParityError, match="differs from PyTorch"):
        _export(supervised_ckpt, tmp_path, "format=torchscript")
    assert not (tmp_path / "model.pt").exists()  # no unchecked file left behind


def test_fixed_batch_export(supervised_ckpt, tmp_path):
    sidecar, out = _export(supervised_ckpt, tmp_path, "dynamic_batch=false", "parity_batch=3")
    assert sidecar["input"]["shape"] == [3, 3, 32, 16]
    import onnxruntime as ort

    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, 32, 16]
