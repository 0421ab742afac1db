"""Break each promise of docs/guarantees.md on purpose and check that its test goes red.

    python -m tests.guarantees            # every break (slow: minutes each on 2 cores)
    python -m tests.guarantees --only resume

For every entry of BREAKS: apply the one-line change to the source, run the guarding tests,
expect at least one failure, restore the file (always). Prints a Markdown table (promise, break,
tests, caught?) and exits 1 if a break went unnoticed. Not part of `make test` (it edits the
tree it runs in): run it in a clean checkout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Break:
    promise: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


BREAKS = [
    Break(
        "exact resume: RNG states",
        "src/systems/base.py",
        "            set_rng_states(self._rng_to_restore)\n",
        "            pass\n",
        ("tests/systems/test_resume.py::test_supervised_resume_is_bit_identical",),
        "the global RNG states are saved but not restored",
    ),
    Break(
        "exact resume: loader position (epoch end)",
        "src/data/datamodule.py",
        '"epoch": trainer.current_epoch + 1, "iteration": 0',
        '"epoch": trainer.current_epoch, "iteration": 1',
        ("tests/systems/test_resume.py::test_supervised_resume_is_bit_identical",),
        "an epoch-end checkpoint resumes the loaders where the finished epoch stood",
    ),
    Break(
        "exact resume: loader position (mid-epoch)",
        "src/data/seeding.py",
        "return iter(list(zip(indices, seeds))[skip:])",
        "return iter(list(zip(indices, seeds)))",
        ("tests/systems/test_resume.py::test_supervised_resume_is_bit_identical",),
        "a mid-epoch resume replays the batches already trained on",
    ),
    Break(
        "exact resume: augmentation seeds",
        "src/data/seeding.py",
        "            torch.manual_seed(seed)\n",
        "            pass\n",
        (
            "tests/data/test_seeding.py",
            "tests/systems/test_resume.py::test_supervised_resume_is_bit_identical",
        ),
        "augmentation draws from the process's generator instead of the sample's seed",
    ),
    Break(
        "exact resume: MAR memory",
        "src/systems/mar_module.py",
        '        self.register_buffer("memory", torch.zeros(num_target_train, num_classes))',
        '        self.register_buffer("memory", torch.zeros(num_target_train, num_classes), persistent=False)',
        ("tests/systems/test_resume.py::test_mar_resume_is_bit_identical",),
        "the MAR memory is left out of the checkpoint",
    ),
    Break(
        "last.ckpt is the newest state",
        "conf/callbacks/model_checkpoint.yaml",
        "  _target_: src.callbacks.checkpoint.LastCheckpoint\n  dirpath: ${paths.output_dir}/checkpoints\n  filename: last\n",
        "  _target_: src.callbacks.checkpoint.VerifiedModelCheckpoint\n  dirpath: ${paths.output_dir}/checkpoints\n  filename: last_unused\n  monitor: val/mAP\n  mode: max\n  save_last: true\n",
        ("tests/systems/test_resume.py::test_last_ckpt_holds_the_final_step_not_the_best",),
        "back to ModelCheckpoint(monitor=val/mAP, save_last=True)",
    ),
    Break(
        "no test-set selection",
        "src/data/datamodule.py",
        "        return self.val_split is None\n",
        "        return False\n",
        (
            "tests/systems/test_run_guards.py::test_test_ckpt_best_needs_a_validation_split",
            "tests/systems/test_run_guards.py::test_validation_split_holds_out_training_identities",
        ),
        "the DataModule claims a validation split when validation runs on the test split",
    ),
    Break(
        "data errors before training",
        "src/data/datamodule.py",
        "        if parsed:\n            self._check_data()\n",
        "        if parsed:\n            pass\n",
        (
            "tests/systems/test_run_guards.py::test_empty_query_folder_fails_within_seconds_naming_query",
        ),
        "setup no longer checks the splits",
    ),
    Break(
        "verified checkpoint writes",
        "src/callbacks/checkpoint.py",
        "            if after is None or after[2] == 0 or after == before:",
        "            if False:",
        ("tests/systems/test_run_guards.py::test_a_silently_failed_save_stops_the_run",),
        "a save that wrote nothing passes unnoticed",
    ),
    Break(
        "bf16 never silently wrong",
        "src/utils/precision.py",
        "        if error <= tolerance:\n            return None\n",
        "        if True:\n            return None\n",
        ("tests/utils/test_precision.py::test_a_wrong_bf16_forward_stops_the_run",),
        "the self-check accepts any bf16 result",
    ),
    Break(
        "short runs exit 0",
        "src/utils/utils.py",
        "    if not metric_name or metric_name in metric_dict or _sweeper_optimises():",
        "    if True:",
        ("tests/systems/test_run_guards.py::test_short_runs_exit_0",),
        "a run without validation fails on the missing sweep metric again",
    ),
    Break(
        "losses in fp32 under autocast",
        "src/losses/base.py",
        "        with torch.autocast(device_type=device_type, enabled=False):\n            return fn(*args, **kwargs)",
        "        return fn(*args, **kwargs)",
        ("tests/losses/test_functional.py::test_functional_computes_in_fp32_under_autocast",),
        "losses run in bf16 under autocast",
    ),
    Break(
        "de-duplicated DDP metrics",
        "src/metrics/reid_metric.py",
        "        first[1:] = sorted_key[1:] != sorted_key[:-1]",
        "        first[1:] = True",
        ("tests/metrics/test_reid_metric.py::test_equals_functional_evaluation_with_duplicates",),
        "DistributedSampler padding duplicates are counted twice",
    ),
    Break(
        "P x K with disjoint ranks",
        "src/data/samplers.py",
        "        P = self.ids_per_batch\n        mine = plan[:, self.rank * P : (self.rank + 1) * P, :]\n        return iter(mine.reshape(-1).tolist())",
        "        P = self.ids_per_batch\n        mine = plan[:, 0:P, :]\n        return iter(mine.reshape(-1).tolist())",
        ("tests/data/test_samplers.py::test_pk_two_ranks_disjoint_identities_equal_length",),
        "every rank takes rank 0's identities",
    ),
    Break(
        "documented commands run",
        "README.md",
        "python -m src.train debug=fdr ",
        "python -m src.train debug=fdrr ",
        ("tests/test_doc_commands.py -k debug",),
        "a README command names a config that does not exist",
    ),
    Break(
        "progress reads the loss only at the logging cadence",
        "src/callbacks/progress.py",
        "        if (idx + 1) % self.cadence(trainer) == 0 or idx + 1 == trainer.num_training_batches:\n",
        "        if True:\n",
        ("tests/test_console.py::test_lines_mode_logs_the_run_at_the_logging_cadence",),
        "the progress bar reads the loss back (a host sync) at every step",
    ),
    Break(
        "no sanity-check warning",
        "src/systems/base.py",
        "            if self.trainer.sanity_checking:\n",
        "            if False:\n",
        ("tests/test_console.py::test_no_warning_from_the_sanity_check",),
        "Lightning's sanity check is evaluated (and warns about its truncated split) again",
    ),
    Break(
        "rank lists show the worst queries by AP",
        "src/metrics/ranklist.py",
        '    worst = scored[np.argsort(ap[scored], kind="stable")][:num_worst]\n',
        '    worst = scored[np.argsort(-ap[scored], kind="stable")][:num_worst]\n',
        (
            "tests/metrics/test_ranklist.py::test_select_queries_worst_first_then_a_seeded_sample "
            "tests/callbacks/test_eval_pictures.py::test_pictures_of_a_tiny_run",
        ),
        "the best queries are shown as the worst",
    ),
    Break(
        "rank lists rank by each query's own AP",
        "src/metrics/rank.py",
        "            out[valid] = np.concatenate(self.ap_values)\n",
        "            out[valid] = np.concatenate(self.ap_values)[::-1]\n",
        ("tests/metrics/test_ranklist.py::test_reid_metric_keeps_each_query_ap",),
        "per-query APs are attached to the wrong queries",
    ),
    Break(
        "batch-wise augmentation equals the per-sample pipeline",
        "src/data/batch_augment.py",
        "        rows = params[:, TOP, None] + torch.arange(h, device=img.device)  # (B, H)\n",
        "        rows = params[:, LEFT, None] + torch.arange(h, device=img.device)  # (B, H)\n",
        ("tests/data/test_batch_augment.py",),
        "the batched crop takes its vertical offset from the horizontal one",
    ),
    Break(
        "batch-wise augmentation from the image cache equals the per-sample pipeline",
        "src/data/batch_augment.py",
        "            out = torch.from_numpy(img.copy()).permute(2, 0, 1)  # as ToImage lays out a PIL image\n",
        "            out = torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1)\n",
        ("tests/data/test_batch_augment.py::test_datamodule_trains_on_the_per_sample_result",),
        "a cached image's array reaches the batch with its channels reversed (BGR)",
    ),
]


def run_break(b: Break) -> tuple[bool, str]:
    path = REPO / b.file
    original = path.read_text()
    if original.count(b.old) != 1:
        return False, f"the break's text is not found once in {b.file}"
    try:
        path.write_text(original.replace(b.old, b.new))
        args = [a for t in b.tests for a in t.split()]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "-m", "", *args], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    finally:
        path.write_text(original)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-200:]
    return proc.returncode == 1, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.guarantees", description=__doc__)
    parser.add_argument("--only", default="", help="run the breaks whose promise contains this")
    args = parser.parse_args(argv)
    missed = 0
    print("| promise | deliberate break | guarding test(s) | caught |")
    print("|---|---|---|---|")
    for b in BREAKS:
        if args.only not in b.promise:
            continue
        caught, tail = run_break(b)
        missed += not caught
        tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in b.tests)
        verdict = f"red ({tail})" if caught else f"**NOT CAUGHT** ({tail})"
        print(f"| {b.promise} | `{b.file}`: {b.what} | {tests} | {verdict} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
