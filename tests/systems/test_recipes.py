"""Every experiment's composed config equals its table in docs/recipes.md, row by row.

docs/recipes.md is the single place of the expected values: each table row names a marlin key
and the value the composed experiment must have there. Key forms:

* ``a.b.c``: the config value ``OmegaConf.select(cfg, "a.b.c")`` (interpolations resolved);
* ``lr@epoch:0,9,39``: the lr in force in those (0-indexed) epochs, from the experiment's
  scheduler stepped as Lightning steps it (``lr@step:`` for a per-step schedule);
* ``default:module.callable:param``: a default of a function marlin builds the step with.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR

DOC = Path(CONF_DIR).parent / "docs" / "recipes.md"
EXPERIMENTS = (
    "market_bot",
    "duke_bot",
    "msmt17_bot",
    "market_triplet",
    "market_aligned",
    "msmt17_source_pretrain",
    "msmt17_to_market_mar",
    "msmt17_to_duke_mar",
)
# every table must say at least this much about its recipe
REQUIRED_KEYS = (
    "model.backbone.name",
    "model.backbone.pretrained",
    "model.backbone.last_stride",
    "model.neck",
    "model.pooling",
    "model.embed",
    "data.height",
    "data.width",
    "data.batch_size",
    "data.flip_p",
    "data.pad",
    "data.random_erasing_p",
    "optimizer._target_",
    "optimizer.lr",
    "optimizer.weight_decay",
    "system.eval_metric",
    "system.eval_ap",
    "system.flip_test",
    "system.rerank",
    "test_ckpt",
)
_CELL = re.compile(r"^`([^`]+)`$")


def parse_recipes(text: str) -> dict[str, list[tuple[str, str]]]:
    """{experiment: [(key, value literal), ...]} from the `## experiment=NAME` sections; a
    section saying "Inherits every row of `X`" gets X's rows first (its own rows override)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    parents: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^## `experiment=(\w+)`", line)
        if head:
            current = head.group(1)
            sections[current] = []
            continue
        if current is None:
            continue
        inherit = re.search(r"Inherits every row of `experiment=(\w+)`", line)
        if inherit:
            parents[current] = inherit.group(1)
        if not line.startswith("|") or set(line.replace("|", "").strip()) <= {"-", " "}:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "setting":
            if cells[-2:] != ["marlin key", "marlin"]:
                raise ValueError("recipes.md: table header must end with 'marlin key | marlin'")
            continue
        key, value = (_CELL.match(c) for c in cells[-2:])
        if key is None or value is None:
            raise ValueError(f"recipes.md [{current}]: row without a `key` and a `value`: {line}")
        sections[current].append((key.group(1), value.group(1)))
    for child, parent in parents.items():
        own = dict(sections[child])
        sections[child] = [(k, v) for k, v in sections[parent] if k not in own] + sections[child]
    return sections


def lrs_in_force(cfg, unit: str, points: list[int]) -> list[float]:
    """The lr of the first param group in force at each epoch/step in `points`."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=float(cfg.optimizer.lr))
    sched = hydra.utils.instantiate(cfg.scheduler)(opt)
    interval = getattr(sched, "interval", "epoch")
    if interval != unit:
        raise AssertionError(f"the schedule is stepped per {interval}, the row asks per {unit}")
    got = {}
    for t in range(max(points) + 1):
        got[t] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return [got[t] for t in points]


def marlin_value(cfg, key: str):
    if key.startswith("lr@"):
        unit, points = key[3:].split(":")
        return lrs_in_force(cfg, unit, [int(p) for p in points.split(",")])
    if key.startswith("default:"):
        target, param = key[len("default:") :].rsplit(":", 1)
        module, name = target.rsplit(".", 1)
        fn = getattr(importlib.import_module(module), name)
        return inspect.signature(fn).parameters[param].default
    if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
        raise AssertionError(f"{key} is not in the composed config")
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def same(got, want) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and got == pytest.approx(want, rel=1e-6, abs=0)
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(same(a, b) for a, b in zip(got, want, strict=True))
    return got == want


def test_recipes_doc_covers_every_experiment():
    sections = parse_recipes(DOC.read_text())
    assert set(EXPERIMENTS) <= set(sections), sorted(set(EXPERIMENTS) - set(sections))
    for experiment in EXPERIMENTS:
        keys = {k for k, _ in sections[experiment]}
        missing = [k for k in REQUIRED_KEYS if k not in keys]
        assert not missing, (experiment, missing)
        assert any(k.startswith("lr@") for k in keys), (experiment, "no lr-in-force row")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_equals_its_recipe_table(experiment, make_cfg):
    rows = parse_recipes(DOC.read_text())[experiment]
    cfg = make_cfg([f"experiment={experiment}"])
    wrong = []
    for key, literal in rows:
        want = yaml.safe_load(literal)
        got = marlin_value(cfg, key)
        print(f"{experiment:24s} {key:45s} {got!r}")
        if not same(got, want):
            wrong.append(f"{key}: docs/recipes.md says {want!r}, the config has {got!r}")
    assert not wrong, "\n".join(wrong)
