"""A validation split of held-out *training* identities, so that no model is chosen on the test split.

:func:`hold_out_identities` removes a number (or fraction) of identities from the training split,
chosen by seed, and turns their images into a query/gallery pair the way Market-1501 builds its
test split: per held-out identity, one image of each of its cameras is a query (only identities
seen by at least two cameras have queries), every other image is in the gallery.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from src.data.records import ReIDRecord, make_records, relabel

Split = list[ReIDRecord]


def num_held_out(val_ids: int | float, num_ids: int) -> int:
    """How many of `num_ids` identities `val_ids` (a count >= 1, or a fraction in (0, 1)) holds out."""
    if isinstance(val_ids, bool) or not isinstance(val_ids, int | float) or val_ids < 0:
        raise ValueError(
            f"data.val_ids must be a count >= 1, a fraction in (0, 1) or 0, got {val_ids!r}"
        )
    n = int(val_ids) if val_ids >= 1 else int(round(val_ids * num_ids))
    if val_ids > 0 and n < 1:
        raise ValueError(f"data.val_ids={val_ids} holds out no identity of {num_ids}")
    if n >= num_ids - 1:
        raise ValueError(
            f"data.val_ids={val_ids} holds out {n} of the {num_ids} training identities: at least "
            "two must stay for training"
        )
    return n


def hold_out_identities(
    train: Sequence[ReIDRecord], val_ids: int | float, seed: int
) -> tuple[Split, Split, Split]:
    """Split `train` into (train, val_query, val_gallery).

    Args:
        train: training records (pids 0..N-1).
        val_ids: identities to hold out: a count (>= 1) or a fraction of the identities.
        seed: the choice of identities and queries depends on it alone.

    Returns the remaining training records (pids relabelled to 0..N'-1, `index` renumbered) and
    the validation query and gallery (the held-out identities keep their training pid).
    """
    pids = sorted({r.pid for r in train})
    rng = np.random.default_rng([int(seed) % 2**32, 0x7A1])
    held = set(rng.permutation(pids)[: num_held_out(val_ids, len(pids))].tolist())
    kept = relabel([(r.img_path, r.pid, r.camid) for r in train if r.pid not in held])
    query, gallery = query_gallery_of([r for r in train if r.pid in held], rng)
    return make_records(kept), query, gallery


def query_gallery_of(
    records: Sequence[ReIDRecord], rng: np.random.Generator
) -> tuple[Split, Split]:
    """Market-1501-style query/gallery of `records`: per identity seen by two or more cameras,
    one random image of each camera is a query; all other images are the gallery."""
    by_id_cam: dict[int, dict[int, list[ReIDRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_id_cam[r.pid][r.camid].append(r)
    query: list[tuple[str, int, int]] = []
    gallery: list[tuple[str, int, int]] = []
    for pid in sorted(by_id_cam):
        cams = by_id_cam[pid]
        for cam in sorted(cams):
            images = cams[cam]
            pick = int(rng.integers(len(images))) if len(cams) > 1 else -1
            for i, r in enumerate(images):
                (query if i == pick else gallery).append((r.img_path, r.pid, r.camid))
    return make_records(query), make_records(gallery)


def official_validation(records: Sequence[ReIDRecord], seed: int) -> tuple[Split, Split]:
    """Query/gallery of a dataset's own validation list (MSMT17's ``list_val.txt``)."""
    return query_gallery_of(records, np.random.default_rng([int(seed) % 2**32, 0x7A1]))
