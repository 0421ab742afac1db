"""Records, errors and label helpers shared by every re-ID dataset parser.

Nothing here imports torch, so the parsers, the `check` CLI and the synthetic generator stay light.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: pid of junk images (bad detections). Dropped by every parser: never in a returned split.
JUNK_PID = -1
#: pid of distractor images (people outside the query set). Kept in the gallery only.
DISTRACTOR_PID = 0

#: File extensions treated as images when a parser lists a folder (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True, slots=True)
class ReIDRecord:
    """One image of a re-ID split.

    Attributes:
        img_path: path of the image file.
        pid: identity. Train splits: relabelled to 0..N-1. Query/gallery: the dataset's own id
            (so that query and gallery agree), 0 = distractor (gallery only). Never -1 (junk).
        camid: camera, 0-based.
        index: position of the record in its split list (0..len(split)-1).
    """

    img_path: str
    pid: int
    camid: int
    index: int


class DatasetLayoutError(FileNotFoundError):
    """A folder or list file that a dataset layout requires is missing."""


class FileNameError(ValueError):
    """A file name (or list-file line) does not follow the dataset's naming scheme."""


class ImageReadError(OSError):
    """An image file cannot be opened or decoded."""


def is_image_file(name: str) -> bool:
    """True if `name` has one of the image extensions in :data:`IMAGE_EXTENSIONS`."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def make_records(items: Iterable[tuple[str, int, int]]) -> list[ReIDRecord]:
    """(img_path, pid, camid) tuples -> records whose `index` is their position in the list."""
    return [ReIDRecord(path, pid, camid, i) for i, (path, pid, camid) in enumerate(items)]


def relabel(items: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Map the pids of (img_path, pid, camid) tuples to 0..N-1 in increasing order of pid."""
    label_of = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, label_of[pid], camid) for path, pid, camid in items]


def split_stats(records: Sequence[ReIDRecord], has_distractors: bool = False) -> dict[str, int]:
    """Counts of a split: images, identities, cameras and distractor images.

    With `has_distractors` (gallery splits) pid 0 is counted as distractor images, not as an
    identity; in train splits pid 0 is an ordinary (relabelled) identity.
    """
    is_distractor = [has_distractors and r.pid == DISTRACTOR_PID for r in records]
    return {
        "images": len(records),
        "ids": len({r.pid for r, d in zip(records, is_distractor) if not d}),
        "cams": len({r.camid for r in records}),
        "distractors": sum(is_distractor),
    }
