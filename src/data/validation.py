"""Checks that a split can be trained on or evaluated, run before any training starts.

Shared by :class:`~src.data.datamodule.ReIDDataModule` (``setup`` raises) and the
``python -m src.data.check`` command (exit status 1). Nothing here imports torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from src.data.image_io import read_image
from src.data.records import ImageReadError, ReIDRecord


class DataValidationError(ValueError):
    """A split that cannot be evaluated or trained on (the message names the split/folder)."""


def queries_without_match(query: Sequence[ReIDRecord], gallery: Sequence[ReIDRecord]) -> int:
    """Queries with no gallery image of their identity taken by another camera (the
    Market-1501 protocol ignores them)."""
    cams_of: dict[int, set[int]] = defaultdict(set)
    for r in gallery:
        cams_of[r.pid].add(r.camid)
    return sum(not (cams_of.get(q.pid, set()) - {q.camid}) for q in query)


def evaluation_problems(
    query: Sequence[ReIDRecord], gallery: Sequence[ReIDRecord], where: str
) -> list[str]:
    """Why a query/gallery pair cannot be evaluated with the Market-1501 protocol ([] if it can).

    Args:
        query, gallery: the records.
        where: names the data in the messages (e.g. "synthetic at data/synthetic/B (test split)").
    """
    problems = []
    if not query:
        problems.append(f"{where}: the query split is empty")
    if not gallery:
        problems.append(f"{where}: the gallery split is empty")
    if problems:
        return problems
    cameras = {r.camid for r in (*query, *gallery)}
    if len(cameras) == 1:
        problems.append(
            f"{where}: every query and gallery image has the same camera id, so no query has a "
            "true match in another camera (the protocol discards same-camera matches). Name the "
            "cameras in the file names (a c<N> token for the folder format)"
        )
    elif queries_without_match(query, gallery) == len(query):
        problems.append(
            f"{where}: none of the {len(query)} queries has a gallery image of its identity from "
            "another camera: nothing can be evaluated"
        )
    return problems


def ids_with_fewer_images(records: Sequence[ReIDRecord], k: int) -> int:
    """Identities with fewer than `k` images (a P x K batch repeats their images)."""
    counts: dict[int, int] = defaultdict(int)
    for r in records:
        counts[r.pid] += 1
    return sum(c < k for c in counts.values())


def find_unreadable(
    records: Sequence[ReIDRecord],
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Error messages (each naming its file) of the records whose image cannot be decoded.

    Decodes in `workers` threads (PIL releases the GIL); `progress(n)` is called after each image.
    """

    def check(record: ReIDRecord) -> str | None:
        try:
            read_image(record.img_path)
        except ImageReadError as e:
            return str(e)
        finally:
            if progress is not None:
                progress(1)
        return None

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        return [msg for msg in pool.map(check, records) if msg is not None]
