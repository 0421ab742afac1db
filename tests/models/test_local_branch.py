"""AlignedReID local branch."""

from __future__ import annotations

import pytest
import torch

from src.models.local_branch import LocalBranch


def _naive_local(branch: LocalBranch, fmap: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-stripe loop with eval-mode BN, as written in the paper."""
    weight = branch.conv.weight[:, :, 0, 0]  # (d, C)
    bn = branch.bn
    n, _, h, _ = fmap.shape
    out = torch.empty(n, h, weight.shape[0])
    for i in range(n):
        for row in range(h):
            stripe = fmap[i, :, row, :]  # (C, w)
            pooled = stripe.max(dim=1).values if branch.pool == "max" else stripe.mean(dim=1)
            z = weight @ pooled
            z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            out[i, row] = z.clamp(min=0)
    return out


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_local_branch_matches_naive_loop(pool):
    torch.manual_seed(0)
    branch = LocalBranch(in_channels=32, local_dim=8, pool=pool)
    branch.bn.running_mean.uniform_(-0.5, 0.5)
    branch.bn.running_var.uniform_(0.5, 2.0)
    branch.bn.bias.data.uniform_(-0.2, 0.2)
    branch.eval()
    fmap = torch.randn(3, 32, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(branch(fmap), _naive_local(branch, fmap))


def test_local_branch_shape_and_gradient():
    branch = LocalBranch(in_channels=512)
    fmap = torch.randn(2, 512, 8, 4, requires_grad=True)
    local = branch(fmap)
    assert local.shape == (2, 8, 128)
    local.sum().backward()
    assert fmap.grad is not None and branch.conv.weight.grad is not None


def test_local_branch_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="median"):
        LocalBranch(16, pool="median")
