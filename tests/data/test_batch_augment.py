"""The batch-wise train augmentation equals the per-sample pipeline bit for bit, for the same
seeds (flip, pad + crop, normalise, random erasing), and is what the DataModule trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.batch_augment import TrainAugmentParams, apply_train_augment, augment_batch
from src.data.transforms import build_transforms

SETTINGS = [
    dict(flip_p=0.5, pad=10, random_erasing_p=0.5),  # the default recipe
    dict(flip_p=1.0, pad=3, random_erasing_p=1.0),
    dict(flip_p=0.0, pad=0, random_erasing_p=0.0),
    dict(flip_p=0.5, pad=10, random_erasing_p=0.5, interpolation="bicubic"),
]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(20, 90)), int(rng.integers(40, 160))) for _ in range(n)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("setting", SETTINGS, ids=["default", "always", "none", "bicubic"])
def test_batched_equals_per_sample_pipeline(setting):
    height, width = 64, 32
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    per_sample = build_transforms(height, width, True, mean, std, **setting)
    params = TrainAugmentParams(height, width, mean, std, **setting)
    images = _images(48)
    expected, drawn = [], []
    for k, img in enumerate(images):
        with torch.random.fork_rng():
            torch.manual_seed(1000 + k)  # the sample's seed (src.data.seeding)
            expected.append(per_sample(img))
        with torch.random.fork_rng():
            torch.manual_seed(1000 + k)
            drawn.append(params(img))
    got = apply_train_augment(
        torch.stack([d.img for d in drawn]),
        torch.stack([d.params for d in drawn]),
        torch.stack([d.norm for d in drawn]),
        setting["pad"],
    )
    assert got.dtype == torch.float32 and got.shape == (48, 3, height, width)
    assert torch.equal(got, torch.stack(expected))
    if setting["random_erasing_p"] == 1.0:  # boxes were drawn and applied
        assert (torch.stack([d.params for d in drawn])[:, 5] > 0).all()


def test_a_cached_array_gives_the_pil_images_draw_and_a_wrong_one_is_named():
    """A cached image arrives as its resized (H, W, 3) uint8 array: the same sample as from the
    PIL image of the same pixels; an array of another size or dtype is an error."""
    params = TrainAugmentParams(16, 8, (0.5,) * 3, (0.25,) * 3)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    pixels.flags.writeable = False  # as DecodedImageCache.get_array hands it over
    with torch.random.fork_rng():
        torch.manual_seed(5)
        from_array = params(pixels)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        from_pil = params(Image.fromarray(pixels))
    assert all(torch.equal(a, b) for a, b in zip(from_array, from_pil, strict=True))
    with pytest.raises(ValueError, match=r"\(16, 8, 3\) uint8, got uint8 \(8, 16, 3\)"):
        params(np.zeros((8, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="got float32"):
        params(np.zeros((16, 8, 3), np.float32))


def test_augment_batch_walks_nested_batches_and_leaves_others():
    params = TrainAugmentParams(16, 8, (0.5,) * 3, (0.25,) * 3)
    drawn = [params(img) for img in _images(4)]
    batch = {
        "img": torch.stack([d.img for d in drawn]),
        "aug": torch.stack([d.params for d in drawn]),
        "aug_norm": torch.stack([d.norm for d in drawn]),
        "pid": torch.arange(4),
    }
    eval_batch = {"img": torch.zeros(2, 3, 16, 8), "pid": torch.arange(2)}
    out = augment_batch({"source": batch, "target": eval_batch}, pad=10)
    assert set(out["source"]) == {"img", "pid"} and out["source"]["img"].dtype == torch.float32
    assert out["target"] is eval_batch or torch.equal(out["target"]["img"], eval_batch["img"])
    with pytest.raises(ValueError, match="uint8"):
        apply_train_augment(batch["img"].float(), batch["aug"], batch["aug_norm"], 10)


@pytest.mark.parametrize("image_cache", [False, True])
def test_datamodule_trains_on_the_per_sample_result(tiny_data_root, image_cache, monkeypatch):
    """The loader + on_after_batch_transfer give exactly the per-sample pipeline's batch, also
    from the image cache (epoch 0 fills it, epoch 1 reads its arrays without PIL)."""
    from src.data import ReIDDataModule

    def module(batch_augment, cache=False):
        dm = ReIDDataModule(
            source={"name": "synthetic", "root": str(tiny_data_root / "synthetic" / "A"),
                    "domain": "A", "preset": "tiny"},
            height=32, width=16, batch_size=16, num_instances=4, num_workers=0, seed=3,
            batch_augment=batch_augment, image_cache=cache,
        )  # fmt: skip
        dm.prepare_data()
        dm.setup("fit")
        return dm

    from src.data.image_dataset import DecodedImageCache

    hits = []  # cached reads served as arrays (filled slots)
    get_array = DecodedImageCache.get_array

    def counting_get_array(self, i, path):
        hits.append(bool(self._filled[i]))
        return get_array(self, i, path)

    monkeypatch.setattr(DecodedImageCache, "get_array", counting_get_array)
    batched, per_sample = module(True, image_cache), module(False)
    assert batched.batch_augment and not per_sample.batch_augment
    loaders = batched.train_dataloader(), per_sample.train_dataloader()
    for epoch in range(2):
        for a, b in zip(*loaders, strict=True):
            assert a["img"].dtype == torch.uint8 and "aug" in a
            a = batched.on_after_batch_transfer(a, 0)
            assert torch.equal(a["img"], b["img"]) and torch.equal(a["pid"], b["pid"]), epoch
    assert (sum(hits) > len(hits) // 4) if image_cache else not hits
    jitter = ReIDDataModule(
        source={"name": "synthetic", "root": "x", "domain": "A"}, color_jitter_p=0.5,
        color_jitter=(0.2, 0.2, 0.2, 0.0),
    )  # fmt: skip
    assert not jitter.batch_augment  # colour jitter has no batched form: per-sample pipeline
