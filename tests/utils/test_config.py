"""src/utils/config.py: the `${sweep_id:}` resolver that tags the jobs of one multirun, and the
check that refuses plain `ddp` inside a local multirun."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from src.utils.config import _launches_processes, register_resolvers, sweep_id, validate_config


def test_sweep_id_is_the_multirun_dir_name_and_none_in_single_runs(make_cfg):
    register_resolvers()
    sweep_dir = "logs/train/multiruns/2024-05-01_12-00-00"
    cfg = make_cfg(["logger=wandb", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}"])
    assert sweep_id() == "2024-05-01_12-00-00"
    assert cfg.logger.wandb.sweep == "2024-05-01_12-00-00"  # conf/logger/wandb.yaml
    cfg = make_cfg(["logger=wandb", "hydra.mode=RUN", f"hydra.sweep.dir={sweep_dir}"])
    assert sweep_id() is None and cfg.logger.wandb.sweep is None


@pytest.mark.parametrize(
    ("trainer", "launches"),
    [
        ({"strategy": "ddp", "devices": 4}, True),
        ({"strategy": "ddp", "devices": "auto"}, True),
        ({"strategy": "ddp", "devices": "0,1"}, True),
        ({"strategy": "ddp", "devices": [0, 1]}, True),
        ({"strategy": "ddp", "devices": 1, "num_nodes": 2}, True),
        ({"strategy": "ddp", "devices": 1}, False),
        ({"strategy": "ddp_spawn", "devices": 4}, False),
        ({"devices": 1}, False),
    ],
)
def test_which_trainers_relaunch_the_command(trainer, launches):
    assert _launches_processes(OmegaConf.create(trainer)) is launches


def test_plain_ddp_in_a_local_multirun_fails_before_training(make_cfg):
    cfg = make_cfg(["trainer=ddp", "hydra.mode=MULTIRUN"])
    with pytest.raises(ValueError, match="trainer.strategy=ddp_spawn"):
        validate_config(cfg)
    validate_config(make_cfg(["trainer=ddp", "trainer.strategy=ddp_spawn", "hydra.mode=MULTIRUN"]))
    validate_config(make_cfg(["trainer=ddp", "hydra.mode=RUN"]))  # a single run relaunches fine
    # SLURM starts the processes itself
    validate_config(
        make_cfg(["trainer=ddp_multinode", "hydra/launcher=submitit_slurm", "hydra.mode=MULTIRUN"])
    )
