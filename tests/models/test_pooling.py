"""GeM and average pooling."""

from __future__ import annotations

import pytest
import torch

from src.models.pooling import GeneralizedMeanPooling, GlobalAvgPool, build_pooling


def _positive_map(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, 5, 4, 2, generator=generator) + 0.05


def test_avg_pool_is_the_spatial_mean():
    x = _positive_map()
    expected = torch.stack([x[n, c].sum() / 8 for n in range(3) for c in range(5)]).view(3, 5)
    torch.testing.assert_close(GlobalAvgPool()(x), expected)


def test_gem_hand_computed_value():
    # p = 0.5 on [1, 4, 9, 16]: mean of square roots = 2.5, squared = 6.25.
    x = torch.tensor([1.0, 4.0, 9.0, 16.0]).view(1, 1, 2, 2)
    out = GeneralizedMeanPooling(p=0.5)(x)
    torch.testing.assert_close(out, torch.tensor([[6.25]]))


def test_gem_with_p_one_equals_avg_pooling():
    x = _positive_map(1)
    torch.testing.assert_close(GeneralizedMeanPooling(p=1.0)(x), GlobalAvgPool()(x))


def test_gem_with_large_p_approaches_max_pooling():
    x = _positive_map(2)
    max_pool = x.amax(dim=(2, 3))
    previous = GlobalAvgPool()(x)
    for p in (2.0, 8.0, 32.0, 128.0):
        out = GeneralizedMeanPooling(p=p)(x)
        # Power means increase with p and are bounded by max * (1 / hw)^(1/p) from below.
        assert (out >= previous - 1e-5).all()
        assert (out <= max_pool + 1e-5).all()
        assert (out >= max_pool * (1 / 8) ** (1 / p) - 1e-5).all()
        previous = out
    torch.testing.assert_close(previous, max_pool, rtol=2e-2, atol=0)


def test_gem_clamps_negative_inputs_to_eps():
    x = torch.tensor([-3.0, -1.0, 4.0, 0.0]).view(1, 1, 2, 2)
    gem = GeneralizedMeanPooling(p=1.0, eps=1e-6)
    torch.testing.assert_close(gem(x), torch.tensor([[(4.0 + 3e-6) / 4]]))


def test_gem_p_is_learnable_or_fixed():
    x = _positive_map(3).requires_grad_()
    learnable = GeneralizedMeanPooling(p=3.0)
    learnable(x).sum().backward()
    assert isinstance(learnable.p, torch.nn.Parameter)
    assert learnable.p.grad is not None and torch.isfinite(learnable.p.grad)
    fixed = GeneralizedMeanPooling(p=3.0, p_trainable=False)
    assert "p" in dict(fixed.named_buffers()) and not list(fixed.parameters())


def test_gem_half_input_is_finite():
    # 300^3 = 2.7e7 overflows fp16 (max 65504): GeM must compute in fp32.
    x = torch.full((1, 2, 2, 2), 300.0, dtype=torch.float16)
    out = GeneralizedMeanPooling(p=3.0)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((1, 2), 300.0), rtol=1e-4, atol=0)


def test_build_pooling():
    assert isinstance(build_pooling("avg"), GlobalAvgPool)
    gem = build_pooling("gem", p=4.0, eps=1e-5)
    assert (
        isinstance(gem, GeneralizedMeanPooling) and gem.p.detach().item() == 4.0 and gem.eps == 1e-5
    )
    with pytest.raises(ValueError, match="max"):
        build_pooling("max")
    with pytest.raises(ValueError, match="p must be > 0"):
        GeneralizedMeanPooling(p=0.0)
