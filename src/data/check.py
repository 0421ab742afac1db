"""Verify a re-ID dataset before a long run.

``python -m src.data.check ROOT --format market1501 [--option key=value ...] [--no-decode]``

Parses the layout (errors name the missing path or the bad file name), prints per-split counts of
identities, images, cameras, distractors and junk, decodes every image and lists the unreadable
files, and warns about queries that have no gallery image of the same identity in another camera
(the Market-1501 protocol skips them).

Exit status: 0 = fine, 1 = problems found (unreadable images, an empty split, a test split that
cannot be evaluated: no query with a cross-camera match, no camera ids; the same checks as
training's, src/data/validation.py), 2 = the dataset cannot be parsed (missing folder/list file,
bad file name) or bad arguments.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from typing import Any

from src.data.datasets import DATASETS, build_dataset
from src.data.records import DatasetLayoutError, FileNameError
from src.data.validation import (
    evaluation_problems,
    find_unreadable,
    queries_without_match,
)


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m src.data.check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("root", help="dataset folder")
    parser.add_argument("--format", required=True, choices=sorted(DATASETS), help="layout")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        type=_parse_option,
        metavar="KEY=VALUE",
        help="extra dataset argument, e.g. include_val=False (repeatable)",
    )
    parser.add_argument("--no-decode", action="store_true", help="skip decoding the images")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument("--max-list", type=int, default=20, help="unreadable files to print")
    args = parser.parse_args(argv)

    try:
        data = build_dataset(args.format, args.root, **dict(args.option))
    except (DatasetLayoutError, FileNameError, FileExistsError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    except TypeError as e:  # an unknown --option
        print(f"ERROR: bad --option for {args.format}: {e}", file=sys.stderr)
        return 2

    print(data.summary())
    stats = data.stats()
    print(f"  gallery distractor images (pid 0): {stats['gallery']['distractors']}")
    skipped = {split: s["junk"] for split, s in data.skipped.items() if s["junk"]}
    print(f"  junk images skipped (pid -1): {skipped or 0}")
    problems: list[str] = []
    for split, counts in stats.items():
        if counts["images"] == 0 and split == "train":
            problems.append(f"split {split!r} is empty")
    if stats["train"]["ids"] == 1:
        problems.append("the train split has a single identity")
    problems += evaluation_problems(data.query, data.gallery, "test split")
    unmatched = queries_without_match(data.query, data.gallery)
    if unmatched and unmatched < len(data.query):
        print(
            f"WARNING: {unmatched} of {len(data.query)} queries have no gallery image of their "
            "identity from another camera; the Market-1501 protocol ignores them"
        )
    if not args.no_decode:
        records = [*data.train, *data.query, *data.gallery]
        unreadable = find_unreadable(records, args.workers)
        print(f"  decoded {len(records) - len(unreadable)}/{len(records)} images")
        if unreadable:
            problems.append(f"{len(unreadable)} unreadable image(s)")
            print("Unreadable files:")
            for msg in unreadable[: args.max_list]:
                print(f"  {msg}")
            if len(unreadable) > args.max_list:
                print(f"  ... and {len(unreadable) - args.max_list} more")
    if problems:
        print("PROBLEMS: " + "; ".join(problems))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
