"""Decoded-image cache and the PIL-side train transform: the same outputs as reading the files with
the former tensor-side pipeline's random draws; one decode per image across workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from src.data import build_dataset
from src.data.image_dataset import DecodedImageCache, ImageDataset
from src.data.transforms import PadCrop, build_transforms


def _image(h: int = 50, w: int = 23, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("pad", [1, 4, 10])
def test_padcrop_equals_pad_then_random_crop(pad):
    img = _image(32, 16)
    reference = T.Compose([T.Pad(pad, fill=0), T.RandomCrop((32, 16)), T.ToImage()])
    ours = T.Compose([PadCrop(32, 16, pad), T.ToImage()])
    for seed in range(30):
        torch.manual_seed(seed)
        expected = reference(img)
        torch.manual_seed(seed)
        assert torch.equal(ours(img), expected), seed


def test_train_transform_equals_the_tensor_pipeline_after_the_resize():
    """Flip/pad/crop on PIL give the tensor pipeline's output bit for bit (same random draws);
    only the resize is PIL's (the reference's): within 1 grey level of the tensor resize."""
    img = _image()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    tensor_side = T.Compose(
        [
            T.ToImage(),
            T.Resize((32, 16), antialias=True),
            T.RandomHorizontalFlip(0.5),
            T.Pad(4, fill=0),
            T.RandomCrop((32, 16)),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
            T.RandomErasing(0.5, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0.0),
        ]
    )
    ours = build_transforms(32, 16, True, mean, std, pad=4)
    resized = img.resize((16, 32), Image.Resampling.BILINEAR)
    std_t = torch.tensor(std)[:, None, None]
    for seed in range(20):
        torch.manual_seed(seed)
        got = ours(img)
        torch.manual_seed(seed)
        assert torch.equal(got, tensor_side(resized)), seed  # the same draws, bit for bit
        torch.manual_seed(seed)
        grey_levels = ((got - tensor_side(img)) * std_t * 255).abs().max()
        assert grey_levels <= 1.0 + 1e-4, (seed, float(grey_levels))


def test_cache_gives_the_file_outputs_and_decodes_once(tiny_data_root, monkeypatch):
    data = build_dataset("synthetic", tiny_data_root / "synthetic" / "A", domain="A", preset="tiny")
    records = data.train[:12]
    transform = build_transforms(32, 16, True, pad=3)
    plain = ImageDataset(records, transform)
    cache = DecodedImageCache(len(records), 32, 16)
    cached = ImageDataset(records, transform, cache=cache)
    for epoch in range(2):  # epoch 0 fills the cache, epoch 1 reads it
        for i in range(len(records)):
            torch.manual_seed(100 * epoch + i)
            expected = plain[i]["img"]
            torch.manual_seed(100 * epoch + i)
            assert torch.equal(cached[i]["img"], expected), (epoch, i)
    assert len(cache) == len(records)

    import src.data.image_dataset as module

    def no_decode(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(module, "read_image", no_decode)
    for i in range(len(records)):
        cached[i]  # from memory only
    # the array read (batch-wise augmentation) is the same pixels, read-only: the shared slot
    # cannot be written through it
    array = cache.get_array(0, records[0].img_path)
    assert np.array_equal(array, np.asarray(cache.get(0, records[0].img_path)))
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0, 0] = 1


def test_cache_is_shared_by_forked_workers(tiny_data_root):
    data = build_dataset("synthetic", tiny_data_root / "synthetic" / "A", domain="A", preset="tiny")
    records = data.train[:16]
    cache = DecodedImageCache(len(records), 32, 16)
    dataset = ImageDataset(records, build_transforms(32, 16, False), cache=cache)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    assert sum(len(b["img"]) for b in batches) == 16
    assert len(cache) == 16  # the workers' writes are visible in this process
    first = np.asarray(records and Image.open(records[0].img_path).convert("RGB").resize((16, 32)))
    assert np.array_equal(cache._images[0], first)
    assert cache.nbytes == 16 * 32 * 16 * 3


def test_bad_cache_size_is_an_error():
    with pytest.raises(ValueError, match="slots"):
        ImageDataset([], None, cache=DecodedImageCache(3, 8, 4))
