"""Shared builders of the MAR system tests: a small random MAR problem and naive references."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from src.losses.mar import DiscriminativeLoss, JointLoss, MultilabelLoss, log_soft_multilabel
from src.models import ReIDNet

NUM_AGENTS = 7
DIM = 5
NUM_TARGET = 20
NUM_CAMS = 3


@dataclass
class Problem:
    """One global batch plus MAR state (memory, losses) for the step functions."""

    source_feat: torch.Tensor
    source_pids: torch.Tensor
    target_feat: torch.Tensor
    target_camids: torch.Tensor
    target_index: torch.Tensor
    target_pids: torch.Tensor
    classifier_weight: torch.Tensor
    memory: torch.Tensor
    visited: torch.Tensor
    joint: JointLoss
    multilabel: MultilabelLoss
    discriminative: DiscriminativeLoss

    def clone(self) -> Problem:
        return copy.deepcopy(self)


def make_problem(
    seed: int = 0,
    batch_source: int = 6,
    batch_target: int = 10,
    mining_ratio: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> Problem:
    """Random features/agents, every target camera twice or more, initialised CML and MDL state.

    Features are scaled so that cosines spread over [-1, 1] (some hard agents above 0.5).
    """
    g = torch.Generator().manual_seed(seed)
    classifier = torch.randn(NUM_AGENTS, DIM, generator=g, dtype=dtype)
    source_pids = torch.randint(0, NUM_AGENTS, (batch_source,), generator=g)
    # source features near their agent so that RJ has active and inactive rows
    source_feat = 3 * classifier[source_pids] + torch.randn(
        batch_source, DIM, generator=g, dtype=dtype
    )
    target_feat = torch.randn(batch_target, DIM, generator=g, dtype=dtype)
    cams = torch.arange(batch_target) % NUM_CAMS
    index = torch.randperm(NUM_TARGET, generator=g)[:batch_target]
    target_pids = torch.randint(0, 4, (batch_target,), generator=g)

    joint = JointLoss(margin=1.0)
    multilabel = MultilabelLoss(
        batch_size=batch_source + batch_target, num_views=NUM_CAMS, num_classes=NUM_AGENTS
    )
    init_feat = torch.randn(40, DIM, generator=g, dtype=dtype)
    init_log = log_soft_multilabel(
        torch.nn.functional.normalize(init_feat, dim=1),
        torch.nn.functional.normalize(classifier, dim=1),
        30.0,
    )
    multilabel.init_centers(init_log, torch.arange(40) % NUM_CAMS)
    discriminative = DiscriminativeLoss(mining_ratio=mining_ratio)
    discriminative.init_threshold(torch.rand(100, generator=g, dtype=torch.float64) * 0.5)
    return Problem(
        source_feat=source_feat,
        source_pids=source_pids,
        target_feat=target_feat,
        target_camids=cams,
        target_index=index,
        target_pids=target_pids,
        classifier_weight=classifier,
        memory=torch.zeros(NUM_TARGET, NUM_AGENTS, dtype=dtype),
        visited=torch.zeros(NUM_TARGET, dtype=torch.bool),
        joint=joint,
        multilabel=multilabel,
        discriminative=discriminative,
    )


def naive_memory_update(memory, visited, index, values, momentum=0.1):
    """The original's memory update, one sample at a time; a repeated index keeps its first
    occurrence's value (the documented de-duplication of DistributedSampler padding)."""
    memory, visited = memory.clone(), visited.clone()
    done: set[int] = set()
    for i, idx in enumerate(index.tolist()):
        if idx in done:
            continue
        done.add(idx)
        if visited[idx]:
            memory[idx] = (1 - momentum) * memory[idx] + momentum * values[i]
        else:
            memory[idx] = values[i]
            visited[idx] = True
    return memory, visited


def mar_net(**overrides):
    """Hydra-like partial of the MAR network (ResNet-18 for speed): last stride 2, no final ReLU,
    no BNNeck, bias-free classifier, pooled-feature embedding."""
    kwargs = {
        "backbone": {"name": "resnet18", "pretrained": False, "last_stride": 2, "last_relu": False},
        "neck": "none",
        "classifier_bias": False,
        "embed": "global",
    }
    kwargs.update(overrides)
    return partial(ReIDNet, **kwargs)


def save_stage1(
    path: Path, seed: int = 0, lightning: bool = True, num_classes: int = 5, **net_overrides
) -> Path:
    """A stage-1-shaped checkpoint (Lightning ``state_dict`` with ``net.*`` keys, or a plain
    ReIDNet state dict) of a randomly initialised MAR network."""
    torch.manual_seed(seed)
    state = mar_net(**net_overrides)(num_classes=num_classes).state_dict()
    payload = {"state_dict": {f"net.{k}": v for k, v in state.items()}} if lightning else state
    torch.save(payload, path)
    return path
