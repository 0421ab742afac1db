"""Parsers of the on-disk layouts: records, relabelling, junk/distractors and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from src.data import (
    MSMT17,
    DatasetLayoutError,
    DukeMTMCReID,
    FileNameError,
    ImageFolderReID,
    ImageReadError,
    Market1501,
    ReIDRecord,
    build_dataset,
    read_image,
)
from src.data.datasets import DATASETS, register_dataset
from src.data.image_dataset import ImageDataset
from tests.data.conftest import write_image


def _as_tuples(records: list[ReIDRecord], root: Path) -> list[tuple[str, int, int, int]]:
    return [(os.path.relpath(r.img_path, root), r.pid, r.camid, r.index) for r in records]


# ------------------------------------------------------------------------------- Market-1501
def test_market_records_relabel_junk_and_distractors(market_root: Path) -> None:
    data = Market1501(market_root)
    # sorted file order; pids 2, 7, 9 -> 0, 1, 2; c1..c6 -> 0..5; index = position
    assert _as_tuples(data.train, market_root) == [
        ("bounding_box_train/0002_c1s1_000451_03.jpg", 0, 0, 0),
        ("bounding_box_train/0002_c2s1_000551_01.jpg", 0, 1, 1),
        ("bounding_box_train/0007_c3s1_000151_01.jpg", 1, 2, 2),
        ("bounding_box_train/0009_c1s1_000301_01.jpg", 2, 0, 3),
        ("bounding_box_train/0009_c6s2_000201_02.jpg", 2, 5, 4),
    ]
    # query/gallery keep the dataset's ids (they must agree); junk (-1) dropped, 0000 kept
    assert _as_tuples(data.query, market_root) == [
        ("query/0001_c1s1_001051_00.jpg", 1, 0, 0),
        ("query/0003_c2s1_000301_00.jpg", 3, 1, 1),
    ]
    assert [(r.pid, r.camid) for r in data.gallery] == [(0, 0), (1, 0), (1, 1), (3, 3)]
    assert [r.index for r in data.gallery] == [0, 1, 2, 3]
    assert data.skipped["gallery"]["junk"] == 2
    assert data.num_train_pids == 3 and data.num_train_cams == 4
    stats = data.stats()
    assert stats["gallery"] == {"images": 4, "ids": 2, "cams": 3, "distractors": 1}
    assert stats["train"] == {"images": 5, "ids": 3, "cams": 4, "distractors": 0}


def test_market_combine_all_merges_splits_without_distractors(market_root: Path) -> None:
    data = Market1501(market_root, combine_all=True)
    # train ids 2, 7, 9 + test ids 1, 3 (the distractor excluded) -> 5 classes
    assert data.num_train_pids == 5
    assert len(data.train) == 5 + 2 + 3
    assert sorted({r.pid for r in data.train}) == [0, 1, 2, 3, 4]
    assert len(data.gallery) == 4  # evaluation splits unchanged


def test_market_archive_folder_is_found(tmp_path: Path, make_dataset_files) -> None:
    from tests.data.conftest import MARKET_FILES

    root = make_dataset_files("m", [f"Market-1501-v15.09.15/{f}" for f in MARKET_FILES])
    assert len(Market1501(root).train) == 5


@pytest.mark.parametrize("missing", ["bounding_box_train", "query", "bounding_box_test"])
def test_market_missing_folder_names_path_and_layout(make_dataset_files, missing: str) -> None:
    from tests.data.conftest import MARKET_FILES

    root = make_dataset_files("m", [f for f in MARKET_FILES if not f.startswith(missing + "/")])
    with pytest.raises(DatasetLayoutError) as err:
        Market1501(root)
    message = str(err.value)
    assert str(root / missing) in message
    assert "bounding_box_train/" in message and "bounding_box_test/" in message


@pytest.mark.parametrize(
    "bad_name",
    ["0002_c1_000451.jpg", "abc_c1s1_000451_03.jpg", "0002c1s1_000451_03.jpg", "photo.png"],
)
def test_market_unparsable_name_names_the_file(market_root: Path, bad_name: str) -> None:
    write_image(market_root / "query" / bad_name)
    with pytest.raises(FileNameError) as err:
        Market1501(market_root)
    assert str(market_root / "query" / bad_name) in str(err.value)
    assert "0002_c1s1_000451_03.jpg" in str(err.value)  # shows the expected scheme


def test_market_camera_zero_is_an_error(market_root: Path) -> None:
    write_image(market_root / "bounding_box_test" / "0005_c0s1_000451_03.jpg")
    with pytest.raises(FileNameError, match="0005_c0s1_000451_03.jpg"):
        Market1501(market_root)


def test_undecodable_image_errors_when_read_naming_the_file(market_root: Path) -> None:
    bad = market_root / "bounding_box_train" / "0011_c1s1_000451_03.jpg"
    bad.write_bytes(b"this is not a jpeg")
    data = Market1501(market_root)  # parsing does not open images
    record = next(r for r in data.train if r.img_path == str(bad))
    with pytest.raises(ImageReadError, match="0011_c1s1_000451_03.jpg"):
        ImageDataset([record])[0]


def test_truncated_image_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    write_image(path, size=(64, 32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=str(path)):
        read_image(str(path))
    with pytest.raises(ImageReadError, match="not found"):
        read_image(str(tmp_path / "missing.jpg"))


# ----------------------------------------------------------------------------- DukeMTMC-reID
DUKE_FILES = [
    "bounding_box_train/0001_c2_f0046182.jpg",
    "bounding_box_train/0001_c5_f0051341.jpg",
    "bounding_box_train/0005_c8_f0000001.jpg",
    "query/0002_c1_f0044158.jpg",
    "bounding_box_test/0002_c7_f0044780.jpg",
    "bounding_box_test/0002_c1_f0044200.jpg",
    "bounding_box_test/4000_c3_f0000100.jpg",
]


def test_duke_records(make_dataset_files) -> None:
    root = make_dataset_files("duke", DUKE_FILES)
    data = DukeMTMCReID(root)
    assert [(r.pid, r.camid) for r in data.train] == [(0, 1), (0, 4), (1, 7)]
    assert [(r.pid, r.camid) for r in data.query] == [(2, 0)]
    assert sorted((r.pid, r.camid) for r in data.gallery) == [(2, 0), (2, 6), (4000, 2)]
    assert data.num_train_cams == 3


def test_duke_rejects_market_names(make_dataset_files) -> None:
    root = make_dataset_files("duke", [*DUKE_FILES, "query/0003_c1s1_000451_03.jpg"])
    with pytest.raises(FileNameError, match="0001_c2_f0046182.jpg"):
        DukeMTMCReID(root)


# ----------------------------------------------------------------------------------- MSMT17
def _msmt(make_dataset_files, lists: dict[str, list[str]] | None = None) -> Path:
    train = [
        ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
        ("0000/0000_001_05_0303morning_0020_1.jpg", 0),
        ("0004/0004_000_15_0303noon_0100_0.jpg", 4),
    ]
    val = [("0002/0002_000_03_0303noon_0001_0.jpg", 2)]
    query = [("0000/0000_000_02_0303morning_0008_0.jpg", 0)]
    gallery = [
        ("0000/0000_003_07_0303morning_0100_0.jpg", 0),
        ("0001/0001_000_02_0303morning_0200_0.jpg", 1),
    ]
    files = [f"train/{p}" for p, _ in train + val] + [f"test/{p}" for p, _ in query + gallery]
    root = make_dataset_files("msmt", files)
    contents = {
        "list_train.txt": [f"{p} {pid}" for p, pid in train],
        "list_val.txt": [f"{p} {pid}" for p, pid in val],
        "list_query.txt": [f"{p} {pid}" for p, pid in query],
        "list_gallery.txt": [f"{p} {pid}" for p, pid in gallery],
    }
    contents.update(lists or {})
    for name, lines in contents.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def test_msmt17_records(make_dataset_files) -> None:
    root = _msmt(make_dataset_files)
    data = MSMT17(root)
    # list_train + list_val; pids 0, 2, 4 -> 0, 1, 2; camera = 3rd field - 1
    assert [(r.pid, r.camid) for r in data.train] == [(0, 0), (0, 4), (2, 14), (1, 2)]
    assert data.train[0].img_path == str(root / "train/0000/0000_000_01_0303morning_0015_0.jpg")
    # test ids are shifted by one: pid 0 means "distractor" everywhere
    assert [(r.pid, r.camid) for r in data.query] == [(1, 1)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(1, 6), (2, 1)]
    assert data.stats()["gallery"]["distractors"] == 0
    assert len(MSMT17(root, include_val=False).train) == 3


def test_msmt17_combine_all_offsets_test_ids(make_dataset_files) -> None:
    data = MSMT17(_msmt(make_dataset_files), combine_all=True)
    # 3 train ids + 2 test ids that reuse the numbers 0 and 1: all distinct classes
    assert data.num_train_pids == 5 and len(data.train) == 4 + 1 + 2


@pytest.mark.parametrize(
    "missing", ["list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"]
)
def test_msmt17_missing_list_names_path(make_dataset_files, missing: str) -> None:
    root = _msmt(make_dataset_files)
    (root / missing).unlink()
    with pytest.raises(DatasetLayoutError) as err:
        MSMT17(root)
    assert str(root / missing) in str(err.value) and "list_query.txt" in str(err.value)


def test_msmt17_missing_image_folder(make_dataset_files) -> None:
    root = _msmt(make_dataset_files)
    os.rename(root / "test", root / "testing")
    with pytest.raises(DatasetLayoutError, match=str(root / "test")):
        MSMT17(root)


def test_msmt17_bad_list_line_names_file_and_line(make_dataset_files) -> None:
    root = _msmt(make_dataset_files, {"list_query.txt": ["0000/a.jpg 0", "only_a_path.jpg"]})
    with pytest.raises(FileNameError) as err:
        MSMT17(root)
    # the first line has a bad file name (no camera field)
    assert f"{root / 'list_query.txt'}:1" in str(err.value) and "a.jpg" in str(err.value)
    root2 = _msmt(make_dataset_files, {"list_gallery.txt": ["", "only_a_path.jpg"]})
    with pytest.raises(FileNameError, match=r"list_gallery.txt:2: expected"):
        MSMT17(root2)


# ------------------------------------------------------------------------- generic folders
def test_image_folder_ids_and_cameras(make_dataset_files) -> None:
    root = make_dataset_files(
        "folder",
        [
            "train/0001/0001_c1_a.jpg",
            "train/0001/0001_c3_b.jpg",
            "train/alice/img-c2-0001.png",
            "train/alice/notes.txt",
            "query/0004/x_c1.jpg",
            "query/bob/y_c2s1_000001_00.jpg",
            "gallery/0004/z_c3.jpg",
            "gallery/bob/w_c1.jpg",
            "gallery/0000/d_c1.jpg",
            "gallery/-1/junk_c2.jpg",
            "gallery/0004/no_camera_token.jpg",
        ],
    )
    data = ImageFolderReID(root)
    # every folder is an identity: -1, 0000, 0001, 0004, alice, bob -> 1..6 (ints by value first)
    # train: 0001 and alice -> 0, 1 after relabelling
    assert [(r.pid, r.camid) for r in data.train] == [(0, 0), (0, 2), (1, 1)]
    # bob = 6 in query and gallery alike; cameras c1, c2, c3 -> 0, 1, 2; no token -> 0
    assert [(r.pid, r.camid) for r in data.query] == [(4, 0), (6, 1)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(1, 1), (2, 0), (4, 0), (4, 2), (6, 0)]
    assert data.skipped["gallery"] == {"junk": 0, "distractor": 0}


def test_image_folder_identity_zero_is_trained_on(make_dataset_files) -> None:
    """A folder named 0 is a person like any other (only the Market/Duke formats have
    distractor and junk labels): none of its images is dropped from training."""
    root = make_dataset_files(
        "folder",
        ["train/0/a_c1.jpg", "train/0/b_c2.jpg", "train/1/c_c1.jpg", "query/0/q_c1.jpg"]
        + ["gallery/0/g_c2.jpg"],
    )
    data = ImageFolderReID(root)
    assert len(data.train) == 3 and data.num_train_pids == 2
    assert [r.pid for r in data.query] == [r.pid for r in data.gallery] == [1]


def test_image_folder_errors(make_dataset_files) -> None:
    root = make_dataset_files("folder", ["train/0001/a_c1.jpg", "query/0002/b_c1.jpg"])
    with pytest.raises(DatasetLayoutError) as err:
        ImageFolderReID(root)
    assert str(root / "gallery") in str(err.value) and "<identity>" in str(err.value)
    write_image(root / "gallery" / "loose_c1.jpg")
    with pytest.raises(FileNameError, match="loose_c1.jpg"):
        ImageFolderReID(root)


# ------------------------------------------------------------------------------- registry
def test_build_dataset_registry(market_root: Path) -> None:
    data = build_dataset("market1501", market_root, combine_all=True)
    assert isinstance(data, Market1501) and data.combine_all
    assert set(DATASETS) >= {"market1501", "dukemtmc", "msmt17", "folder", "synthetic"}
    with pytest.raises(KeyError, match="known: .*market1501"):
        build_dataset("market", market_root)
    with pytest.raises(KeyError, match="already registered"):
        register_dataset("market1501", Market1501)
