"""CrossEntropyLabelSmooth against the Inception-v3 definition and torch's label smoothing."""

from __future__ import annotations

import math

import pytest
import torch

from src.losses import CrossEntropyLabelSmooth

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _naive(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    n, k = logits.shape
    total = []
    for i in range(n):
        log_z = torch.log(torch.exp(logits[i]).sum())
        row = []
        for c in range(k):
            q = (1 - epsilon) * (1.0 if c == targets[i] else 0.0) + epsilon / k
            row.append(-q * (logits[i, c] - log_z))
        total.append(torch.stack(row).sum())
    return torch.stack(total).mean()


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_matches_naive_loop_and_torch(epsilon: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 7, generator=g, dtype=DT).requires_grad_(True)
    targets = torch.randint(0, 7, (9,), generator=g)
    loss = CrossEntropyLabelSmooth(7, epsilon)(logits, targets)
    ref = _naive(logits, targets, epsilon)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits, targets, label_smoothing=epsilon), **TOL
    )
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_hand_computed() -> None:
    # Uniform logits: every class has probability 1/K, so the loss is log K whatever eps.
    assert CrossEntropyLabelSmooth(5, 0.1)(torch.zeros(3, 5), torch.tensor([0, 2, 4])).item() == (
        pytest.approx(math.log(5))
    )
    # Two classes, logits (0, log 3): p = (1/4, 3/4); target 1, eps 0.2 -> q = (0.1, 0.9).
    loss = CrossEntropyLabelSmooth(2, 0.2)(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(-(0.1 * math.log(0.25) + 0.9 * math.log(0.75)))


def test_gradcheck() -> None:
    logits = torch.randn(4, 6, dtype=DT, requires_grad=True)
    targets = torch.tensor([5, 0, 3, 3])
    assert torch.autograd.gradcheck(CrossEntropyLabelSmooth(6, 0.1), (logits, targets))


def test_bf16_autocast_input_gives_fp32_result() -> None:
    logits = (torch.randn(8, 4101) * 30).bfloat16()
    targets = torch.randint(0, 4101, (8,))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = CrossEntropyLabelSmooth(4101)(logits, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, CrossEntropyLabelSmooth(4101)(logits.float(), targets))


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"logits \(N, 5\)"):
        CrossEntropyLabelSmooth(5)(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets"):
        CrossEntropyLabelSmooth(5)(torch.zeros(2, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="epsilon"):
        CrossEntropyLabelSmooth(5, epsilon=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        CrossEntropyLabelSmooth(0)
