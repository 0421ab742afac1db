"""`system.compile=true` compiles the backbone only (`nn.Module.compile`): parameter names, and so
checkpoints, are those of the plain model; a checkpoint of a compiled run loads into a plain one."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from src.data import ImageDataset
from src.eval import load_system_from_checkpoint
from src.models import ReIDNet
from src.train import train
from tests.conftest import tiny_overrides


def _eager_compile(monkeypatch: pytest.MonkeyPatch) -> list[ReIDNet]:
    """Make `ReIDNet.compile_backbone` use TorchDynamo with the eager backend: the graph capture
    runs, without inductor's C++ build (minutes on 2 cores). Returns the nets it compiled."""
    compiled: list[ReIDNet] = []

    def compile_backbone(self: ReIDNet, **kwargs) -> None:
        compiled.append(self)
        self.backbone.compile(backend="eager", **kwargs)

    monkeypatch.setattr(ReIDNet, "compile_backbone", compile_backbone)
    return compiled


def test_compiled_run_checkpoint_loads_into_a_plain_model(make_cfg, tiny_data_root, monkeypatch):
    compiled = _eager_compile(monkeypatch)
    common = [*tiny_overrides(tiny_data_root), "trainer.limit_train_batches=2", "test=false"]
    cfg = make_cfg([*common, "system.compile=true", "trainer.max_epochs=1"])
    metrics, objects = train(cfg)
    system = objects["system"]
    assert compiled == [system.net] and system.net.backbone._compiled_call_impl is not None
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))

    # the compiled system's names are the plain system's: no `_orig_mod.` prefix
    plain_cfg = make_cfg(tiny_overrides(tiny_data_root, train=False), config_name="eval")
    datamodule = hydra.utils.instantiate(plain_cfg.data, _convert_="all")
    datamodule.setup("fit")
    plain = hydra.utils.instantiate(
        plain_cfg.system, _convert_="all", num_classes=datamodule.num_classes
    )
    assert list(system.state_dict()) == list(plain.state_dict())

    # the saved checkpoint loads (strictly) into a non-compiled system, with the same outputs
    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    eval_cfg = make_cfg(
        [*tiny_overrides(tiny_data_root, train=False), f"ckpt_path={ckpt}"], config_name="eval"
    )
    assert eval_cfg.system.compile is False
    loaded = load_system_from_checkpoint(eval_cfg, datamodule).eval()
    assert loaded.net.backbone._compiled_call_impl is None
    records = datamodule.source_data.query[:4]
    dataset = ImageDataset(records, datamodule._transform("source", train=False))
    images = torch.stack([dataset[i]["img"] for i in range(len(records))])
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), system.eval()(images), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_backbone_matches_the_plain_one():
    """The real `torch.compile` (inductor) of a ResNet-18 backbone on CPU: same outputs, same
    state-dict keys. Skipped when the inductor toolchain (a C++ compiler) is unavailable."""
    torch.manual_seed(0)
    plain = ReIDNet("resnet18", num_classes=5).eval()
    compiled = ReIDNet("resnet18", num_classes=5).eval()
    compiled.load_state_dict(plain.state_dict())
    compiled.compile_backbone()
    assert list(compiled.state_dict()) == list(plain.state_dict())
    images = torch.randn(2, 3, 32, 16)
    try:
        with torch.no_grad():
            out = compiled.embed(images)
    except Exception as err:  # inductor raises BackendCompilerFailed & co. without a compiler
        pytest.skip(f"torch.compile (inductor) does not work on this machine: {err!r:.200}")
    with torch.no_grad():
        torch.testing.assert_close(out, plain.embed(images), rtol=1e-4, atol=1e-4)
