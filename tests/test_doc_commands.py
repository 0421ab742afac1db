"""Every shell command in README.md and docs/*.md works: a doc command that fails fails the suite.

Commands are read from the fenced code blocks (lines starting with python, make, torchrun,
optuna, ...; continuation lines joined; comments dropped). Each one is handled by the rule for
its program, at tiny sizes:

- ``python -m src.train|src.eval`` (and ``torchrun ... -m src.train``): the command line is
  composed exactly as written (every override, group, sweep and launcher option must exist),
  then run on the tiny synthetic data with one batch (``trainer.fast_dev_run``); real datasets
  become the synthetic ones, GPU/multi-node trainers the CPU one, checkpoint placeholders
  (``X``, ``<stage-1 run>``, ``$D``) checkpoints made here. Commands that need a service or a
  cluster (W&B, SLURM, Optuna storage, torchrun) are composed but not run.
- ``python -m src.data.check``, ``src.data.synthetic``, ``src.tools.*``: run on tiny inputs.
- ``make TARGET``: the target exists (``make -n``); what it runs is tested by its own tests.
- anything else must be listed in UNRUN below with its reason, or the test fails.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import open_dict

from src.data import build_dataset
from tests.conftest import tiny_mar_overrides, tiny_overrides
from tests.systems._cc_helpers import tiny_cc_overrides

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("python", "python3", ".venv/bin/python", "make", "torchrun", "optuna")
# Documented commands that are not run here, with the reason (matched by prefix).
UNRUN = {
    ".venv/bin/python -c": "rewrites the notebooks in place (docs/notebooks.md's clean-up one-liner)",
}
# Composed, not run: they need a service, a cluster or a sweeper process.
COMPOSE_ONLY = ("hydra/launcher=", "hparams_search=", "logger=wandb", "logger=many_loggers",
                "logger=[csv,wandb]", "trainer=ddp_multinode")  # fmt: skip


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands() -> list[DocCommand]:
    commands = []
    for path in DOCS:
        in_block, pending, start = False, "", 0
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            if line.startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            if pending:
                pending += " " + line
            elif line.split(" ", 1)[0] in PROGRAMS:
                pending, start = line, number
            else:
                continue
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            commands.append(DocCommand(path.relative_to(REPO).as_posix(), start, pending))
            pending = ""
    return commands


COMMANDS = documented_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 30
    assert any("python -m src.train debug=fdr" in c.text for c in COMMANDS)


# ---------------------------------------------------------------------- artefacts
@pytest.fixture(scope="module")
def artefacts(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints for the placeholders: a supervised run, a MAR stage 1 and a MAR stage 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from src.train import train

    out = tmp_path_factory.mktemp("doc_artefacts")

    def run(name: str, overrides: list[str]) -> Path:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out / name)
            cfg.paths.log_dir = str(out / "logs")
            cfg.hydra.runtime.output_dir = str(out / name)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.pop("hydra")
        try:
            train(cfg)
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
        return out / name / "checkpoints" / "last.ckpt"

    one_batch = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "test=false"]
    supervised = run("supervised", [*tiny_overrides(tiny_data_root), *one_batch])
    stage1 = run(
        "stage1",
        ["experiment=synthetic_source_pretrain", *tiny_overrides(tiny_data_root), *one_batch],
    )
    stage2 = run("stage2", [*tiny_mar_overrides(tiny_data_root, stage1), *one_batch])
    cc = run("cc", [*tiny_cc_overrides(tiny_data_root, stage1), *one_batch])
    return {"supervised": supervised, "stage1": stage1, "stage2": stage2, "cc": cc, "root": out}


# ---------------------------------------------------------------------- rules
def split_sweeps(args: list[str]) -> list[str]:
    """First value of every sweep (`a=1,2,3` -> `a=1`; brackets and quotes kept)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and "," in value and not value.startswith(("[", "'", '"', "{")):
            value = value.split(",")[0]
        out.append(f"{key}{sep}{value}")
    return out


def substitute(arg: str, art: dict[str, Path], experiment: str) -> str:
    """Placeholders and paths of the docs -> things that exist here."""
    key, sep, value = arg.partition("=")
    if not sep:
        return arg
    if key == "run_dir":
        return f"run_dir={art['supervised'].parent.parent}"
    if key == "ckpt_path" and experiment.endswith("_cc"):
        return f"ckpt_path={art['cc']}"
    if key == "ckpt_path":
        mar = "mar" in experiment and "pretrain" not in experiment
        return f"ckpt_path={art['stage2' if mar else 'stage1' if 'pretrain' in experiment else 'supervised']}"
    if key == "system.pretrained_ckpt":
        return f"system.pretrained_ckpt={art['stage1']}"
    if key == "seed" and not value.isdigit():
        return "seed=0"
    if key in ("hydra.run.dir", "hydra.sweep.dir"):
        safe = re.sub(r"[^\w]", "_", value)
        return f"{key}={art['root'] / 'hydra' / safe}"
    return arg


# Which trainer/precision settings cannot run on this machine, and what replaces them.
TRAINER_SWAP = {"trainer=gpu": "trainer=cpu", "trainer=ddp": "trainer=cpu"}
DROPPED_FOR_RUN = ("trainer.devices=", "trainer.num_nodes=", "trainer.precision=16-mixed",
                   "paths.data_dir=", "hydra.")  # fmt: skip


def hydra_command(cmd: DocCommand, entry: str, args: list[str], art, make_cfg, tiny_root) -> None:
    from src.eval import evaluate
    from src.train import train

    args = [a for a in args if a not in ("-m", "--multirun")]
    experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), "")
    args = [substitute(a, art, experiment) for a in split_sweeps(args)]
    config_name = "eval" if entry == "src.eval" else "train"
    composed = make_cfg(args, config_name=config_name)  # every documented override must exist
    if any(a.startswith(COMPOSE_ONLY) or a in COMPOSE_ONLY for a in args):
        return
    run_args = [TRAINER_SWAP.get(a, a) for a in args if not a.startswith(DROPPED_FOR_RUN)]
    data = composed.data
    needs_synthetic = data.source.name != "synthetic" or (
        data.get("target") is not None and data.target.name != "synthetic"
    )
    if needs_synthetic:  # the synthetic data instead, without the real datasets' own options
        for domain, letter in (("source", "A"), ("target", "B")):
            if data.get(domain) is None:
                continue
            node = data[domain]
            run_args += [f"~data.{domain}.{k}" for k in node if k not in ("name", "root", "seed")]
            run_args += [f"data.{domain}.name=synthetic", f"+data.{domain}.domain={letter}"]
            run_args.append(f"data.{domain}.root={tiny_root / 'synthetic' / letter}")
    if "model" in composed and composed.model.get("backbone", {}).get("pretrained"):
        run_args.append("model.backbone.pretrained=false")
    if data.get("target") is not None or "pretrain" in experiment:
        # the MAR checkpoints made here are ResNet-18s (the real-data recipes use ResNet-50)
        run_args.append("model.backbone.name=resnet18")
    if config_name == "eval":
        extra = tiny_overrides(tiny_root, train=False)
        if composed.data.get("target") is not None:
            extra.append("+data.target.preset=tiny")
        evaluate(make_cfg(run_args + extra, config_name="eval"))
        return
    if experiment.endswith("_cc"):
        extra = tiny_cc_overrides(tiny_root, art["stage1"])
    elif composed.data.get("target") is not None:
        extra = tiny_mar_overrides(tiny_root, art["stage1"])
    else:
        extra = tiny_overrides(tiny_root)
    # the command's own settings win over the tiny ones (e.g. data.val_ids)
    own = {a.split("=", 1)[0] for a in run_args}
    extra = [o for o in extra if not o.startswith("experiment=") and o.split("=", 1)[0] not in own]
    cfg = make_cfg(run_args + extra + ["trainer.fast_dev_run=true"])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    train(cfg)


def inference_command(module: str, args: list[str], art, make_cfg, tiny_root, tmp_path) -> None:
    """src.extract / src.export / src.search on the supervised checkpoint and tiny folders."""
    import importlib

    root = tiny_root / "synthetic" / "A"
    paths = {
        "ckpt_path": art["supervised"],
        "images": root / "query",
        "gallery": root / "bounding_box_test",
        "query": sorted((root / "query").glob("*.jpg"))[0],
    }
    fixed = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in paths:
            value = str(paths[key])
        elif key == "out":
            value = str(tmp_path / Path(value).name)
        fixed.append(f"{key}={value}")
    if module == "src.export" and not any(a.startswith("out=") for a in fixed):
        fixed.append(f"out={tmp_path / 'model'}")
    name = module.split(".")[1]
    cfg = make_cfg(fixed, config_name=name)
    getattr(importlib.import_module(module), name)(cfg)


def module_command(cmd: DocCommand, module: str, args: list[str], art, tiny_root, tmp_path) -> None:
    if module == "src.data.check":
        from src.data.check import main

        fmt = args[args.index("--format") + 1]
        root = tiny_root / "synthetic" / "A"
        if fmt == "msmt17":  # no tiny MSMT17 here: its parser is tested in tests/data
            assert main([str(root), "--format", fmt, *args[3:]]) == 2
            return
        assert main([str(root), *args[1:]]) == 0, cmd
    elif module == "src.data.synthetic":
        from src.data.synthetic import main

        tiny = {"--num-train-ids": "12", "--height": "32", "--width": "16"}
        args = [tiny.get(prev, a) for prev, a in zip(["", *args], args)]
        out = tmp_path / "synth"
        args[args.index("--out") + 1] = str(out)
        assert main([*args, "--preset", "tiny"]) == 0
        assert build_dataset(
            "synthetic",
            out,
            preset="tiny",
            domain=args[args.index("--domain") + 1] if "--domain" in args else "A",
        ).train
    elif module == "src.tools.summarize_sweep":
        from src.tools.summarize_sweep import main
        from tests.tools.fake_runs import write_grid_multirun

        sweep = write_grid_multirun(tmp_path / "multirun")
        for metrics in sweep.glob("*/metrics.json"):  # every metric the docs plot
            values = json.loads(metrics.read_text())
            metrics.write_text(json.dumps({**values, "test/mAP": values["test/rank1"] - 0.1}))
        assert main([str(sweep), *args[1:], "--out", str(tmp_path / "report")]) == 0
    elif module == "src.tools.seed_table":
        from src.tools.seed_table import main
        from tests.tools.fake_runs import write_hydra_run

        for job in range(2):
            write_hydra_run(tmp_path / "seeds" / str(job), [f"seed={job}"],
                            {"test/rank1": 0.5, "test/mAP": 0.4, "test/mINP": 0.2})  # fmt: skip
        assert main([str(tmp_path / "seeds"), *args[1:]]) == 0
    elif module in ("src.tools.mar_demo", "src.tools.sweep_demo", "src.bench"):
        # long-running tools: their arguments must parse (their own tests run them --quick)
        proc = subprocess.run([sys.executable, "-m", module, *args, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    else:
        raise AssertionError(f"{cmd}: no rule for python -m {module}; add one to this test")


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_documented_command(cmd, artefacts, make_cfg, tiny_data_root, tmp_path):
    if any(cmd.text.startswith(prefix) for prefix in UNRUN):
        pytest.skip(next(r for p, r in UNRUN.items() if cmd.text.startswith(p)))
    text = re.sub(r"<([^<>]+)>", lambda m: re.sub(r"\W", "_", m.group(1)).upper(), cmd.text)
    text = re.sub(r"\[(--[\w-]+)\]", r"\1", text)  # optional flags written [--flag]
    tokens = shlex.split(text, comments=True)
    program = tokens[0]
    if program == "make":
        target = tokens[1]
        proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        if target == "train" and any(t.startswith("ARGS=") for t in tokens):
            args = shlex.split(next(t for t in tokens if t.startswith("ARGS="))[5:])
            hydra_command(cmd, "src.train", args, artefacts, make_cfg, tiny_data_root)
        return
    if program == "optuna":
        proc = subprocess.run([str(Path(sys.executable).parent / "optuna"), tokens[1], "--help"],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        return
    if program == "torchrun":
        module_at = tokens.index("-m")
        make_cfg(split_sweeps(tokens[module_at + 2 :]))  # composed; multi-node runs are not run
        return
    assert tokens[1] == "-m", f"{cmd}: expected `python -m MODULE ...`"
    module, args = tokens[2], tokens[3:]
    if module in ("src.train", "src.eval"):
        hydra_command(cmd, module, args, artefacts, make_cfg, tiny_data_root)
    elif module in ("src.extract", "src.export", "src.search"):
        inference_command(module, args, artefacts, make_cfg, tiny_data_root, tmp_path)
    else:
        module_command(cmd, module, args, artefacts, tiny_data_root, tmp_path)
