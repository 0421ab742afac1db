"""Parsers for the on-disk layouts of re-ID datasets, and the `build_dataset` registry.

Every dataset object exposes `.train`, `.query`, `.gallery` (lists of :class:`ReIDRecord`) with:

- junk images (pid -1) dropped from every split, distractors (pid 0) kept in the gallery only;
- train pids relabelled to 0..N-1 (query/gallery keep the dataset's ids so that they agree);
- camids 0-based; `index` = position of the record in its split.

Bad input fails loudly: a missing folder or list file raises :class:`DatasetLayoutError` naming
the path and the expected layout; a file name (or list line) that does not parse raises
:class:`FileNameError` naming the file. Files without an image extension (``Thumbs.db``,
``.DS_Store``) are not images and are ignored; every image file must parse.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from src.data.records import (
    DISTRACTOR_PID,
    JUNK_PID,
    DatasetLayoutError,
    FileNameError,
    ReIDRecord,
    is_image_file,
    make_records,
    relabel,
    split_stats,
)

RawItems = list[tuple[str, int, int]]  # (img_path, pid, camid 0-based)


class ReIDDataset:
    """Base class: a parsed dataset with train/query/gallery splits.

    Subclasses implement :meth:`_parse`, returning raw (img_path, pid, camid) tuples per split with
    junk already removed (counted in `self.skipped`); this class drops distractors from train and
    query, optionally merges all splits for training (`combine_all`) and relabels train pids.

    Args:
        root: dataset folder.
        combine_all: train on train + query + gallery (distractors excluded), as MAR does with its
            MSMT17 source. Query and gallery stay as parsed, so evaluation on them is no longer
            held-out.
    """

    #: Human-readable name used in messages.
    display_name: ClassVar[str] = "dataset"
    #: Expected layout, printed by layout errors.
    layout: ClassVar[str] = ""
    #: Whether train and test pids share one id space (False: test ids are offset on combine_all).
    shared_id_space: ClassVar[bool] = True
    #: Whether pid 0 marks distractors (dropped from train and query, kept in the gallery).
    has_distractors: ClassVar[bool] = True

    def __init__(self, root: str | os.PathLike[str], combine_all: bool = False) -> None:
        self.root = str(root)
        self.combine_all = combine_all
        self.skipped: dict[str, dict[str, int]] = {
            split: {"junk": 0, "distractor": 0} for split in ("train", "query", "gallery")
        }
        self.val_items: RawItems | None = None
        train, query, gallery = self._parse()
        if self.has_distractors:
            train = self._drop_distractors(train, "train")
            query = self._drop_distractors(query, "query")
        if combine_all:
            offset = 0 if self.shared_id_space else max((p for _, p, _ in train), default=-1) + 1
            extra = [(path, pid + offset, cam) for path, pid, cam in query + gallery]
            train = train + [item for item in extra if item[1] != DISTRACTOR_PID + offset]
        labels = relabel(train + (self.val_items or []))
        self.train: list[ReIDRecord] = make_records(labels[: len(train)])
        #: a dataset's own validation images (MSMT17 list_val with include_val=False), else None;
        #: their pids use the training labels.
        self.val: list[ReIDRecord] | None = (
            None if self.val_items is None else make_records(labels[len(train) :])
        )
        self.query: list[ReIDRecord] = make_records(query)
        self.gallery: list[ReIDRecord] = make_records(gallery)

    def _parse(self) -> tuple[RawItems, RawItems, RawItems]:
        raise NotImplementedError

    def _drop_distractors(self, items: RawItems, split: str) -> RawItems:
        kept = [item for item in items if item[1] != DISTRACTOR_PID]
        self.skipped[split]["distractor"] += len(items) - len(kept)
        return kept

    def _require_dir(self, path: str) -> str:
        if not os.path.isdir(path):
            raise DatasetLayoutError(
                f"{self.display_name}: missing folder {path}. Expected layout:\n{self.layout}"
            )
        return path

    def _require_file(self, path: str) -> str:
        if not os.path.isfile(path):
            raise DatasetLayoutError(
                f"{self.display_name}: missing file {path}. Expected layout:\n{self.layout}"
            )
        return path

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (= classifier size)."""
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of cameras seen in the training split."""
        return len({r.camid for r in self.train})

    @property
    def num_cams(self) -> int:
        """Number of cameras over all splits (camids are 0..num_cams-1 for the real layouts)."""
        return len({r.camid for split in (self.train, self.query, self.gallery) for r in split})

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-split counts: images, ids, cams, distractors (see :func:`split_stats`)."""
        return {
            "train": split_stats(self.train),
            "query": split_stats(self.query),
            "gallery": split_stats(self.gallery, has_distractors=True),
        }

    def summary(self) -> str:
        """A small table of the per-split counts (what `python -m src.data.check` prints)."""
        lines = [f"{self.display_name} at {self.root}", "  split   | # ids | # cams | # images"]
        for split, s in self.stats().items():
            lines.append(f"  {split:<7} | {s['ids']:5d} | {s['cams']:6d} | {s['images']:8d}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"{type(self).__name__}(root={self.root!r}, train={s['train']['images']} images/"
            f"{s['train']['ids']} ids, query={s['query']['images']}, "
            f"gallery={s['gallery']['images']})"
        )


def _resolve_root(root: str, marker: str, subfolders: Sequence[str]) -> str:
    """`root`, or `root/<sub>` when the archive's top folder was kept (e.g. Market-1501-v15.09.15)."""
    if os.path.exists(os.path.join(root, marker)):
        return root
    for sub in subfolders:
        if os.path.exists(os.path.join(root, sub, marker)):
            return os.path.join(root, sub)
    return root


class _MarketLayout(ReIDDataset):
    """Market-1501-style folders: bounding_box_train/, query/, bounding_box_test/."""

    archive_folders: ClassVar[tuple[str, ...]] = ()
    name_pattern: ClassVar[re.Pattern[str]]
    name_example: ClassVar[str]

    def _parse(self) -> tuple[RawItems, RawItems, RawItems]:
        self.root = _resolve_root(self.root, "bounding_box_train", self.archive_folders)
        folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
        dirs = {
            split: self._require_dir(os.path.join(self.root, f)) for split, f in folders.items()
        }
        return (
            self._parse_dir(dirs["train"], "train"),
            self._parse_dir(dirs["query"], "query"),
            self._parse_dir(dirs["gallery"], "gallery"),
        )

    def _parse_dir(self, folder: str, split: str) -> RawItems:
        items: RawItems = []
        for name in sorted(os.listdir(folder)):
            if not is_image_file(name):
                continue
            path = os.path.join(folder, name)
            match = self.name_pattern.match(name)
            if match is None:
                raise FileNameError(
                    f"{path}: file name does not follow the {self.display_name} naming scheme "
                    f"(expected e.g. {self.name_example})"
                )
            pid, cam = int(match.group("pid")), int(match.group("cam"))
            if cam < 1:
                raise FileNameError(f"{path}: camera number must be >= 1 (c1, c2, ...), got c{cam}")
            if pid == JUNK_PID:
                self.skipped[split]["junk"] += 1
                continue
            items.append((path, pid, cam - 1))
        return items


class Market1501(_MarketLayout):
    """Market-1501 (Zheng et al., ICCV 2015).

    Names like ``0002_c1s1_000451_03.jpg``: pid, camera c1..c6, sequence s, frame, box index.
    pid -1 = junk (dropped), 0000 = distractor (kept in the gallery).
    """

    display_name = "Market-1501"
    archive_folders = ("Market-1501-v15.09.15", "Market-1501", "market1501")
    name_pattern = re.compile(
        r"^(?P<pid>-1|\d+)_c(?P<cam>\d+)s\d+_\d+_\d+\.[A-Za-z]+$", flags=re.ASCII
    )
    name_example = "0002_c1s1_000451_03.jpg"
    layout = (
        "  ROOT/bounding_box_train/0002_c1s1_000451_03.jpg ...  (training images)\n"
        "  ROOT/query/0001_c1s1_001051_00.jpg ...             (query images)\n"
        "  ROOT/bounding_box_test/0000_c1s1_000151_01.jpg ... (gallery; -1 junk, 0000 distractors)"
    )


class DukeMTMCReID(_MarketLayout):
    """DukeMTMC-reID (Zheng et al., ICCV 2017): Market-1501 folders, names ``0001_c2_f0046182.jpg``."""

    display_name = "DukeMTMC-reID"
    archive_folders = ("DukeMTMC-reID",)
    name_pattern = re.compile(r"^(?P<pid>-1|\d+)_c(?P<cam>\d+)_f\d+\.[A-Za-z]+$", flags=re.ASCII)
    name_example = "0001_c2_f0046182.jpg"
    layout = (
        "  ROOT/bounding_box_train/0001_c2_f0046182.jpg ...  (training images)\n"
        "  ROOT/query/0005_c2_f0046985.jpg ...               (query images)\n"
        "  ROOT/bounding_box_test/0002_c7_f0044780.jpg ...   (gallery images)"
    )


class MSMT17(ReIDDataset):
    """MSMT17 (Wei et al., CVPR 2018).

    Layout: ``train/``, ``test/`` and the lists ``list_train.txt``, ``list_val.txt`` (paths relative
    to ``train/``), ``list_query.txt``, ``list_gallery.txt`` (relative to ``test/``); each line is
    ``<relative/path.jpg> <pid>``. The camera is the third ``_`` field of the file name
    (``0000_000_01_0303morning_0015_0.jpg`` -> camera 01 -> camid 0). MSMT17 has no distractors
    and numbers test identities from 0, so query/gallery pids are the list labels + 1 (pid 0 means
    "distractor" in every dataset).

    Args:
        root: dataset folder (or its parent holding ``MSMT17_V1``/``MSMT17``).
        include_val: train on list_train + list_val (the official 32,621-image training set). MAR's
            original code used list_train only (30,248 images): set False to reproduce it.
        combine_all: see :class:`ReIDDataset`; test ids are offset past the training ids because
            MSMT17 numbers train and test identities separately.
    """

    display_name = "MSMT17"
    shared_id_space = False
    has_distractors = False  # train labels start at 0; test labels are shifted to start at 1
    layout = (
        "  ROOT/train/0000/0000_000_01_0303morning_0015_0.jpg ...\n"
        "  ROOT/test/0000/0000_000_01_0303morning_0008_0.jpg ...\n"
        "  ROOT/list_train.txt, ROOT/list_val.txt      (lines: 0000/0000_000_01_...jpg 0)\n"
        "  ROOT/list_query.txt, ROOT/list_gallery.txt  (paths relative to test/)"
    )

    def __init__(
        self, root: str | os.PathLike[str], include_val: bool = True, combine_all: bool = False
    ) -> None:
        self.include_val = include_val
        super().__init__(root, combine_all=combine_all)

    def _parse(self) -> tuple[RawItems, RawItems, RawItems]:
        self.root = _resolve_root(self.root, "list_train.txt", ("MSMT17_V1", "MSMT17"))
        train_dir = self._require_dir(os.path.join(self.root, "train"))
        test_dir = self._require_dir(os.path.join(self.root, "test"))
        lists = ["list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"]
        paths = {name: self._require_file(os.path.join(self.root, name)) for name in lists}
        train = self._parse_list(paths["list_train.txt"], train_dir, "train")
        val = self._parse_list(paths["list_val.txt"], train_dir, "train")
        if self.include_val:
            train += val
        else:  # the official validation images (data.val_ids=official), train pids as labels
            self.val_items = val
        # MSMT17 has no distractors and numbers test ids from 0: shift them by one so that pid 0
        # keeps meaning "distractor" in every dataset's gallery.
        query = self._parse_list(paths["list_query.txt"], test_dir, "query", pid_offset=1)
        gallery = self._parse_list(paths["list_gallery.txt"], test_dir, "gallery", pid_offset=1)
        return train, query, gallery

    def _parse_list(
        self, list_path: str, img_dir: str, split: str, pid_offset: int = 0
    ) -> RawItems:
        items: RawItems = []
        with open(list_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
                    raise FileNameError(
                        f"{list_path}:{lineno}: expected '<relative/path.jpg> <pid>', got "
                        f"{line.rstrip()!r}"
                    )
                rel_path, pid = fields[0], int(fields[1])
                path = os.path.join(img_dir, rel_path)
                tokens = os.path.basename(rel_path).split("_")
                if len(tokens) < 3 or not tokens[2].isdigit() or int(tokens[2]) < 1:
                    raise FileNameError(
                        f"{path} (listed in {list_path}:{lineno}): file name does not follow the "
                        "MSMT17 scheme PPPP_NNN_CC_<date><time>_FFFF_B.jpg (camera CC >= 01)"
                    )
                if pid == JUNK_PID:
                    self.skipped[split]["junk"] += 1
                    continue
                items.append((path, pid + pid_offset, int(tokens[2]) - 1))
        return items


_CAMERA_TOKEN = re.compile(r"^c(\d+)(?:s\d+)?$", flags=re.ASCII)
_INT_NAME = re.compile(r"^-?\d+$", flags=re.ASCII)


class ImageFolderReID(ReIDDataset):
    """A generic folder-of-identities layout for users' own data.

    Layout: ``ROOT/{train,query,gallery}/<identity>/<image>``. Every identity folder is an
    identity, whatever its name (``0``, ``-1`` and ``0000`` included: junk and distractor labels
    exist only in the Market-1501/DukeMTMC formats). Names get ids 1, 2, ... in sorted order over
    all splits (integer names by value first, then the others), so that the same name is the
    same person everywhere; 0 stays free (the distractor id of the other formats).

    The camera comes from a ``c<N>`` token in the file name, tokens being separated by ``_``, ``-``,
    ``.`` or spaces (``cam_c3_0001.jpg``, ``0002_c1s1_000451_03.jpg``); the numbers N found over
    the whole dataset are renumbered 0..C-1 in increasing order. A file without such a token gets
    camid 0. Note that the Market-1501 evaluation protocol discards gallery images with the query's
    id *and* camera, so a dataset without camera tokens has no valid query: name the cameras.
    """

    display_name = "image folder"
    has_distractors = False
    layout = (
        "  ROOT/train/<identity>/<image>.jpg ...   (e.g. ROOT/train/0001/0001_c1_0003.jpg)\n"
        "  ROOT/query/<identity>/<image>.jpg ...\n"
        "  ROOT/gallery/<identity>/<image>.jpg ... (every folder name is an identity)\n"
        "  camera: a c<N> token in the file name (c1, c2, ...), else camera 0"
    )

    def _parse(self) -> tuple[RawItems, RawItems, RawItems]:
        files: dict[str, list[tuple[str, str, int | None]]] = {}
        for split in ("train", "query", "gallery"):
            split_dir = self._require_dir(os.path.join(self.root, split))
            files[split] = []
            for name in sorted(os.listdir(split_dir)):
                id_dir = os.path.join(split_dir, name)
                if not os.path.isdir(id_dir):
                    if is_image_file(name):
                        raise FileNameError(
                            f"{id_dir}: image outside an identity folder (expected "
                            f"{split_dir}/<identity>/{name})"
                        )
                    continue
                for img in sorted(os.listdir(id_dir)):
                    if is_image_file(img):
                        files[split].append((os.path.join(id_dir, img), name, _camera_number(img)))
        names = {name for items in files.values() for _, name, _ in items}
        ints = sorted((n for n in names if _INT_NAME.match(n)), key=lambda n: (int(n), n))
        others = sorted(n for n in names if not _INT_NAME.match(n))
        pid_of = {name: i for i, name in enumerate([*ints, *others], start=1)}
        cams = sorted({c for items in files.values() for _, _, c in items if c is not None})
        camid_of = {c: i for i, c in enumerate(cams)}
        out: dict[str, RawItems] = {
            split: [
                (path, pid_of[name], 0 if cam is None else camid_of[cam])
                for path, name, cam in items
            ]
            for split, items in files.items()
        }
        return out["train"], out["query"], out["gallery"]


def _camera_number(file_name: str) -> int | None:
    """N of the first ``c<N>`` (or Market ``c<N>s<M>``) token of a file name, None if absent."""
    for token in re.split(r"[_\-. ]", Path(file_name).stem):
        match = _CAMERA_TOKEN.match(token)
        if match:
            return int(match.group(1))
    return None


def _synthetic(root: str, **kwargs: Any) -> ReIDDataset:
    from src.data.synthetic import SyntheticReID  # lazy: keeps the generator out of plain parsing

    return SyntheticReID(root, **kwargs)


DATASETS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": Market1501,
    "dukemtmc": DukeMTMCReID,
    "msmt17": MSMT17,
    "folder": ImageFolderReID,
    "synthetic": _synthetic,
}


def register_dataset(name: str, factory: Callable[..., ReIDDataset]) -> None:
    """Add a dataset to the :func:`build_dataset` registry (`factory(root, **kwargs)`)."""
    if name in DATASETS:
        raise KeyError(f"dataset {name!r} is already registered")
    DATASETS[name] = factory


def build_dataset(name: str, root: str | os.PathLike[str], **kwargs: Any) -> ReIDDataset:
    """Parse the dataset `name` (market1501, dukemtmc, msmt17, folder, synthetic) at `root`.

    Extra keyword arguments go to the dataset class (e.g. ``combine_all=True``,
    ``include_val=False`` for msmt17, ``domain="B"`` for synthetic).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](os.path.expandvars(os.path.expanduser(str(root))), **kwargs)
