"""The bf16 self-check (src/utils/precision.py): a disagreeing bf16 forward stops the run or gets
the documented workaround, on any CPU; on Intel AMX CPUs the real oneDNN bug is caught.
Guards docs/guarantees.md "bf16 never silently wrong"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from src.systems import base as base_module
from src.train import train
from src.utils.precision import Bf16CheckError, bf16_forward_error, check_bf16_forward
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
HAS_AMX = (
    "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
)


class Net(nn.Module):
    """A conv net whose bf16 output can be made wrong: always, or only while oneDNN is on."""

    def __init__(self, broken: str = "no") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.broken = broken

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x).flatten(1)
        wrong = self.broken == "always" or (
            self.broken == "onednn" and torch.backends.mkldnn.enabled
        )
        if wrong and torch.is_autocast_enabled("cpu"):
            out = out * 1.5
        return out


@pytest.fixture(autouse=True)
def _restore_mkldnn():
    yield
    torch.backends.mkldnn.enabled = True


def test_a_healthy_network_passes():
    net = Net().train()
    assert bf16_forward_error(net.embed, (4, 3, 32, 16)) < 0.05
    assert check_bf16_forward(net, (4, 3, 32, 16)) is None
    assert net.training  # mode restored


def test_a_wrong_bf16_forward_stops_the_run():
    with pytest.raises(
        Bf16CheckError, match=r"differs from fp32 by (49\.9|50\.0)%.*pytorch/pytorch#169688"
    ):
        check_bf16_forward(Net("always"), (4, 3, 32, 16))
    assert torch.backends.mkldnn.enabled  # no half-applied workaround


def test_the_onednn_workaround_is_applied_and_said():
    message = check_bf16_forward(Net("onednn"), (4, 3, 32, 16))
    assert message is not None and "Applied the workaround" in message
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in message
    assert not torch.backends.mkldnn.enabled


def test_importing_src_caps_onednn():
    assert (
        os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16" or "ONEDNN_MAX_CPU_ISA" in os.environ
    )


@pytest.mark.skipif(not HAS_AMX, reason="needs an Intel CPU with AMX-BF16 (the oneDNN bug)")
def test_the_real_amx_bug_is_caught():
    """With oneDNN allowed to use AMX, the MAR ResNet-18 at 64x32 hits pytorch#169688: the check
    must not pass silently."""
    code = (
        "import hydra, torch\n"
        "from hydra import compose, initialize_config_dir\n"
        "from src.utils.precision import check_bf16_forward\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=synthetic_mar'])\n"
        "net = hydra.utils.instantiate(cfg.system.net)(num_classes=10)\n"
        "print('RESULT', check_bf16_forward(net, (4, 3, 64, 32)))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "ALL"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Applied the workaround" in proc.stdout


def test_bf16_runs_call_the_self_check(make_cfg, tiny_data_root, monkeypatch):
    calls = []

    def record(net, shape, *args, **kwargs):
        calls.append(shape)
        return None

    monkeypatch.setattr(base_module, "check_bf16_forward", record)
    cfg = make_cfg(
        tiny_overrides(tiny_data_root) + ["trainer.precision=bf16-mixed", "debug=fdr", "test=false"]
    )
    train(cfg)
    assert calls == [(4, 3, 32, 16)]
    calls.clear()
    train(make_cfg(tiny_overrides(tiny_data_root) + ["debug=fdr", "test=false"]))  # fp32: none
    assert calls == []
