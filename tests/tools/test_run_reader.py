"""src.tools.run_reader against files laid out as Lightning 2.6 and Hydra 1.3 write them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from src.tools.run_reader import (
    find_latest_multirun,
    find_latest_run,
    load_multirun,
    load_run,
    merge_epochs,
    parse_override,
    read_metrics_csv,
)

from .fake_runs import write_hydra_run, write_lightning_csv

# Written by lightning 2.6 CSVLogger(name="csv", prefix="") for a BoringModel that logs
# `train/loss` and `train/metric` with on_step=True, on_epoch=True (log_every_n_steps=2, 4 batches
# per epoch), val/mAP, val/rank1 and val/mAP_best at validation end, plus
# LearningRateMonitor("epoch") on SGD with StepLR(gamma=0.1): copied verbatim.
LIGHTNING_CSV = """\
epoch,lr-SGD,step,train/loss_epoch,train/loss_step,train/metric_epoch,train/metric_step,val/mAP,val/mAP_best,val/rank1
,0.1,0,,,,,,,
0,,1,,0.20418734848499298,,0.40837469696998596,,,
0,,3,,0.8399917483329773,,1.6799834966659546,,,
0,,3,,,,,0.5,0.699999988079071,0.6000000238418579
0,,3,0.6759020686149597,,1.3518041372299194,,,,
,0.010000000000000002,4,,,,,,,
1,,5,,2.7012038230895996,,5.402407646179199,,,
1,,7,,7.799429893493652,,15.598859786987305,,,
1,,7,,,,,0.5,0.699999988079071,0.6000000238418579
1,,7,4.758231163024902,,9.516462326049805,,,,
,0.0010000000000000002,8,,,,,,,
2,,9,,0.6956605315208435,,1.391321063041687,,,
2,,11,,2.4337968826293945,,4.867593765258789,,,
2,,11,,,,,0.5,0.699999988079071,0.6000000238418579
2,,11,1.677086591720581,,3.354173183441162,,,,
"""


@pytest.fixture
def lightning_csv(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.csv"
    path.write_text(LIGHTNING_CSV)
    return path


def test_read_metrics_csv_keeps_only_filled_cells(lightning_csv: Path) -> None:
    rows = read_metrics_csv(lightning_csv)
    assert len(rows) == 15
    assert rows[0] == {"lr-SGD": 0.1, "step": 0}
    assert rows[1] == {
        "epoch": 0,
        "step": 1,
        "train/loss_step": 0.20418734848499298,
        "train/metric_step": 0.40837469696998596,
    }
    assert isinstance(rows[1]["epoch"], int) and isinstance(rows[1]["step"], int)
    assert rows[3]["val/mAP_best"] == 0.699999988079071


def test_merge_epochs_on_a_real_lightning_file(lightning_csv: Path) -> None:
    table = merge_epochs(read_metrics_csv(lightning_csv))
    assert sorted(table) == [
        "epoch",
        "lr-SGD",
        "step",
        "train/loss",
        "train/metric",
        "val/mAP",
        "val/mAP_best",
        "val/rank1",
    ]
    np.testing.assert_array_equal(table["epoch"], [0, 1, 2])
    np.testing.assert_array_equal(table["step"], [3, 7, 11])
    # The LR monitor's epoch-less row at step 4 belongs to epoch 1 (logged at its start).
    np.testing.assert_array_equal(
        table["lr-SGD"], [0.1, 0.010000000000000002, 0.0010000000000000002]
    )
    np.testing.assert_array_equal(
        table["train/loss"], [0.6759020686149597, 4.758231163024902, 1.677086591720581]
    )
    np.testing.assert_array_equal(table["val/mAP"], [0.5, 0.5, 0.5])


def test_merge_epochs_missing_values_and_name_clash() -> None:
    rows = [
        {"epoch": 0, "step": 9, "loss_epoch": 3.0, "loss": 7.0},  # both `loss` and `loss_epoch`
        {"epoch": 1, "step": 19, "loss_epoch": 2.0},
        {"epoch": 1, "step": 19, "val/mAP": 0.3},
        {"epoch": 2, "step": 29, "loss_epoch": 1.0},
        {"lr": 0.5, "step": 30},  # trailing epoch-less row: last epoch seen
    ]
    table = merge_epochs(rows)
    np.testing.assert_array_equal(table["loss_epoch"], [3.0, 2.0, 1.0])  # no rename: clash
    np.testing.assert_array_equal(table["loss"], [7.0, np.nan, np.nan])
    np.testing.assert_array_equal(table["val/mAP"], [np.nan, 0.3, np.nan])
    np.testing.assert_array_equal(table["lr"], [np.nan, np.nan, 0.5])
    np.testing.assert_array_equal(table["step"], [9, 19, 30])


def test_load_run_reads_every_part(tmp_path: Path) -> None:
    run_dir = write_hydra_run(
        tmp_path / "run",
        ["+data.source.preset=tiny", "loss.margin=0.5", "model.weights_path=null", "tags=[a,b]"],
        {"val/mAP_best": 0.61, "test/rank1": 0.8},
        config={"loss": {"margin": 0.5, "half": "${loss.margin}"}, "seed": 3},
        epochs=[
            {"train/loss": 2.5, "lr-Adam": 1e-3},
            {"train/loss": 1.5, "lr-Adam": 1e-4, "val/mAP": 0.42, "val/mAP_best": 0.61},
        ],
    )
    (run_dir / "ranklist.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    run = load_run(run_dir)

    assert run.name == "run"
    assert run.final_metrics == {"val/mAP_best": 0.61, "test/rank1": 0.8}
    assert run.ranklist == run_dir / "ranklist.png"
    assert run.params == {
        "data.source.preset": "tiny",
        "loss.margin": 0.5,
        "model.weights_path": None,
        "tags": ["a", "b"],
    }
    assert run.param("loss.margin") == 0.5
    assert run.param("seed") == 3  # not overridden: from .hydra/config.yaml
    assert run.param("loss.half") == 0.5  # interpolation resolved
    assert run.param("no.such.key", default="d") == "d"
    assert run.config["loss"] == {"margin": 0.5, "half": 0.5}
    # `${hydra:runtime.output_dir}` is read from the run's own .hydra/hydra.yaml.
    assert run.config["paths"] == {"output_dir": str(run_dir), "log_dir": "logs"}
    assert run.param("paths.output_dir") == str(run_dir)
    raw = OmegaConf.to_container(run.raw_config, resolve=False)  # type: ignore[arg-type]
    assert raw["paths"]["output_dir"] == "${hydra:runtime.output_dir}"  # as written

    epochs, loss = run.curve("train/loss")
    np.testing.assert_array_equal(epochs, [0, 1])
    np.testing.assert_array_equal(loss, [2.5, 1.5])
    epochs, val = run.curve("val/mAP")  # validated in epoch 1 only
    np.testing.assert_array_equal(epochs, [1])
    np.testing.assert_array_equal(val, [0.42])
    np.testing.assert_array_equal(run.curve("train/loss_epoch")[1], loss)
    steps, step_loss = run.step_curve("train/loss")
    np.testing.assert_array_equal(steps, [1, 3, 5, 7])
    np.testing.assert_array_equal(step_loss, [11.0, 13.0, 15.0, 17.0])

    assert run.metric("val/mAP_best") == 0.61  # metrics.json wins
    assert run.metric("val/mAP") == 0.42  # not in metrics.json: last logged epoch value
    with pytest.raises(KeyError, match=r"'val/rank5' not found .*available: lr-Adam, test/rank1"):
        run.metric("val/rank5")
    with pytest.raises(KeyError, match="no per-epoch column 'val/rank5'.*train/loss"):
        run.curve("val/rank5")


def test_config_resolution_outside_hydra(tmp_path: Path) -> None:
    run_dir = write_hydra_run(
        tmp_path / "run",
        [],
        None,
        config={
            "trainer": {"default_root_dir": "${paths.output_dir}"},
            "group": "${hydra:runtime.choices.model}",
            # a resolver the reading process does not have (e.g. registered by training code only)
            "size": "${not_registered_here:2,${data.batch_size}}",
            "data": {"batch_size": 8, "half": "${data.batch_size}"},
        },
    )
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    output_dir: /runs/7\n    choices:\n      model: resnet18\n"
    )
    config = load_run(run_dir).config
    assert config["trainer"] == {"default_root_dir": "/runs/7"}  # chained through hydra.yaml
    assert config["group"] == "resnet18"
    assert config["size"] == "${not_registered_here:2,${data.batch_size}}"  # kept as text
    assert config["data"] == {"batch_size": 8, "half": 8}

    (run_dir / ".hydra" / "hydra.yaml").unlink()  # no hydra.yaml: `${hydra:...}` kept as text
    config = load_run(run_dir).config
    assert config["paths"]["output_dir"] == "${hydra:runtime.output_dir}"
    assert config["trainer"] == {"default_root_dir": "${paths.output_dir}"}


def test_resumed_fit_versions_are_read_in_numeric_order(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    write_lightning_csv(
        run_dir / "csv" / "version_2" / "metrics.csv",
        [{"train/loss": 9.0}, {"train/loss": 9.0}, {"train/loss": 2.0}],
    )
    # version_10 sorts before version_2 as text; it is the later fit and must win.
    write_lightning_csv(
        run_dir / "csv" / "version_10" / "metrics.csv",
        [{"train/loss": 9.0}, {"train/loss": 9.0}, {"train/loss": 1.0}, {"train/loss": 0.5}],
    )
    run = load_run(run_dir)
    np.testing.assert_array_equal(run.curve("train/loss")[1], [9.0, 9.0, 1.0, 0.5])
    assert run.final_metrics == {} and run.overrides == [] and run.config is None
    assert run.param("loss.margin", default=0.3) == 0.3


def test_parse_override() -> None:
    assert parse_override("++optimizer.lr=1e-3") == ("optimizer.lr", 0.001)
    assert parse_override("model@system.net=resnet18") == ("model@system.net", "resnet18")
    assert parse_override("~callbacks.early_stopping") is None
    assert parse_override("loss.margin=0.1,0.3") == ("loss.margin", "0.1,0.3")
    with pytest.raises(ValueError, match="overrides.yaml: cannot parse override 'a=\\[1'"):
        parse_override("a=[1", source="overrides.yaml")


def test_load_run_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"run directory not found: {tmp_path / 'nope'}"):
        load_run(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        load_run(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} is not a run directory: expected .hydra/"):
        load_run(empty)
    sweep = tmp_path / "sweep"
    write_hydra_run(sweep / "0", [], {"val/mAP": 0.1})
    with pytest.raises(ValueError, match="looks like a multirun"):
        load_run(sweep)


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("metrics.json", "{not json", "metrics.json: not valid JSON"),
        ("metrics.json", json.dumps([0.5]), "metrics.json: expected a flat JSON object"),
        ("metrics.json", json.dumps({"val/mAP": "high"}), "metric 'val/mAP' must be a number"),
        (".hydra/overrides.yaml", "loss.margin: 0.1", "overrides.yaml: expected a YAML list"),
        (".hydra/config.yaml", "- a\n- b\n", "config.yaml: expected a YAML mapping"),
        (".hydra/hydra.yaml", "hydra: [1\n", "hydra.yaml: not valid YAML"),
        (
            "csv/version_0/metrics.csv",
            "epoch,step,val/mAP\n0,3,0.5\n1,7,oops\n",
            "metrics.csv, line 3, column 'val/mAP': expected a number, got 'oops'",
        ),
    ],
)
def test_malformed_files_are_named(
    tmp_path: Path, filename: str, content: str, message: str
) -> None:
    run_dir = write_hydra_run(tmp_path / "run", ["a=1"], {"val/mAP": 0.1})
    (run_dir / filename).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_run(run_dir)


def test_load_multirun_orders_jobs_and_skips_non_jobs(tmp_path: Path) -> None:
    for job in (0, 2, 10, 1):
        write_hydra_run(tmp_path / str(job), [f"seed={job}"], {"val/mAP": job / 10})
    (tmp_path / "notes").mkdir()  # no .hydra: warned about and skipped
    (tmp_path / ".submitit").mkdir()  # hidden: silently ignored
    with pytest.warns(UserWarning, match=r"skipping .*notes: no .hydra/ inside") as record:
        runs = load_multirun(tmp_path)
    assert len(record) == 1
    assert [r.name for r in runs] == ["0", "1", "2", "10"]
    assert [r.params["seed"] for r in runs] == [0, 1, 2, 10]


def test_load_multirun_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="multirun directory not found"):
        load_multirun(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"no Hydra job directories in {tmp_path} "):
        load_multirun(tmp_path)
    write_hydra_run(tmp_path / "single", ["a=1"], {"val/mAP": 0.1})
    with pytest.raises(ValueError, match="it is a single run: use load_run"):
        load_multirun(tmp_path / "single")


def test_find_latest(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert find_latest_run(runs) is None
    old = write_hydra_run(runs / "2024-01-02_00-00-00", [], {"val/mAP": 0.1})
    new = write_hydra_run(runs / "2024-01-01_00-00-00", [], {"val/mAP": 0.2})
    (runs / "empty").mkdir()
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))
    assert find_latest_run(runs) == new
    assert find_latest_multirun(runs) is None  # runs, not sweeps
    assert find_latest_multirun(tmp_path) == runs  # a folder of job dirs
