"""MAR losses (src/losses/mar.py) against naive loop versions written from mar.md / the original
code's loops, hand-computed cases, gradchecks and edge cases."""

from __future__ import annotations

import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist

from src.losses.mar import (
    DiscriminativeLoss,
    JointLoss,
    MultilabelLoss,
    condensed_pairwise_agreement,
    log_soft_multilabel,
    pairwise_agreement,
    soft_multilabel,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------
# Naive references (float64 loops, straight from the definitions)
# ----------------------------------------------------------------------------------------------
def naive_joint(features, agents, labels, similarity, features_target, similarity_target, margin):
    sim_margin = 1 - margin / 2
    terms = []
    for f, label, sim in zip(features, labels, similarity):
        terms.append((f - agents[label]).pow(2).sum())
        hard = [j for j in range(len(agents)) if j != int(label) and float(sim[j]) > sim_margin]
        if hard:
            sq = torch.stack([(f - agents[j]).pow(2).sum() for j in hard])
            terms.append(torch.clamp(margin - sq, min=0).mean())
    for f, sim in zip(features_target, similarity_target):
        hard = [j for j in range(len(agents)) if float(sim[j]) > sim_margin]
        if hard:
            sq = torch.stack([(f - agents[j]).pow(2).sum() for j in hard])
            terms.append(torch.clamp(margin - sq, min=0).mean())
    return torch.stack(terms).mean()


def naive_camera_stats(x, views):
    """[(mean, unbiased std)] of each camera with >= 2 samples, looping over cameras."""
    out = []
    for v in sorted(set(views.tolist())):
        rows = x[views == v]
        if len(rows) < 2:
            continue
        out.append((rows.mean(0), rows.std(0)))
    return out


def naive_cml(x, views, center_mean, center_std, momentum, use_std=True):
    """Original order: centres updated from the detached batch, then the loss."""
    detached = naive_camera_stats(x.detach(), views)
    center_mean = center_mean * (1 - momentum) + torch.stack([m for m, _ in detached]).mean(0) * (
        momentum
    )
    if use_std:
        new_std = torch.stack([s for _, s in detached]).mean(0)
        center_std = center_std * (1 - momentum) + new_std * momentum
    terms = []
    for mean, std in naive_camera_stats(x, views):
        terms.append((mean - center_mean).pow(2).sum())
        if use_std:
            terms.append((std - center_std).pow(2).sum())
    return torch.stack(terms).mean(), center_mean, center_std


def naive_mdl(features, multilabels, threshold, ratio, labels):
    """scipy pdist + argsort + per-pair loops, as the original; returns loss, new T, |P|, |N|, TP."""
    f_np = features.detach().numpy()
    p_dist = pdist(f_np)
    p_agree = 1 - pdist(multilabels.numpy(), "minkowski", p=1) / 2
    n = int(len(p_dist) * ratio)
    mined = np.argsort(p_dist)[:n]
    is_pos = p_agree[mined] > threshold
    pairs = list(itertools.combinations(range(len(f_np)), 2))  # pdist order
    P = [pairs[k] for k in mined[is_pos]]
    N = [pairs[k] for k in mined[~is_pos]]

    def mean_sim(pair_list):
        return torch.stack(
            [torch.exp(-(features[i] - features[j]).pow(2).sum()) for i, j in pair_list]
        ).mean()

    pos = mean_sim(P) if P else torch.tensor(1.0, dtype=features.dtype)
    neg = mean_sim(N) if N else torch.tensor(0.5, dtype=features.dtype)
    loss = -torch.log(pos / (pos + neg))
    new_t = 0.9 * threshold + 0.1 * np.sort(p_agree)[-n]
    tp = sum(int(labels[i] == labels[j]) for i, j in P) / len(P) if P else 0.0
    return loss, new_t, len(P), len(N), tp


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def unit(x):
    return F.normalize(x, dim=1)


def clustered_agents(gen, num_agents, dim, noise=0.5):
    """Agents in small clusters, so rows get a few hard agents (cosine > 0.5)."""
    centres = unit(torch.randn(num_agents // 3 + 1, dim, generator=gen, dtype=torch.float64))
    cluster = torch.arange(num_agents) // 3
    spread = torch.randn(num_agents, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    return unit(centres[cluster] + noise * spread)


def rj_inputs(seed, batch_source=10, batch_target=9, num_agents=15, dim=12):
    gen = torch.Generator().manual_seed(seed)
    agents = clustered_agents(gen, num_agents, dim)
    labels = torch.randint(0, num_agents, (batch_source,), generator=gen)
    noise = torch.randn(batch_source, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    features = unit(agents[labels] + 0.4 * noise)
    near = torch.randint(0, num_agents, (batch_target,), generator=gen)
    noise_t = torch.randn(batch_target, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    features_target = unit(agents[near] + 0.6 * noise_t)
    features_target[0] = unit(-agents.sum(0, keepdim=True))[0]  # far from every agent
    return features, agents, labels, features_target


def test_helpers_and_inputs_are_meaningful():
    features, agents, labels, target = rj_inputs(0)
    sim_s, sim_t = features @ agents.t(), target @ agents.t()
    own = F.one_hot(labels, len(agents)).bool()
    hard_s = ((sim_s > 0.5) & ~own).sum(1)
    hard_t = (sim_t > 0.5).sum(1)
    # Rows without hard agents and rows with several occur.
    assert hard_t[0] == 0
    assert (hard_s > 1).any() and (hard_t > 0).any()


# ----------------------------------------------------------------------------------------------
# Soft multilabels and agreements
# ----------------------------------------------------------------------------------------------
def test_soft_multilabel_rows_gradient_and_log():
    gen = torch.Generator().manual_seed(1)
    f = unit(torch.randn(6, 8, generator=gen)).requires_grad_(True)
    agents = unit(torch.randn(11, 8, generator=gen)).requires_grad_(True)
    ml = soft_multilabel(f, agents, scale=30.0)
    assert ml.shape == (6, 11) and ml.dtype == torch.float32
    torch.testing.assert_close(ml.sum(1), torch.ones(6))
    torch.testing.assert_close(ml, torch.softmax(30.0 * f @ agents.t(), 1))
    log_ml = log_soft_multilabel(f, agents)
    torch.testing.assert_close(log_ml, torch.log(ml), rtol=1e-5, atol=1e-5)  # fp32: they agree
    (ml.sum() + log_ml.sum()).backward()
    assert agents.grad is None  # agents are detached
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_log_soft_multilabel_stays_finite_where_log_of_softmax_underflows():
    f = torch.tensor([[1.0, 0.0]])
    agents = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # At scale 30 in fp32 the second probability is e^-60 (fine); at scale 60 it underflows.
    assert torch.isinf(torch.log(soft_multilabel(f, agents, scale=60.0))).any()
    log_ml = log_soft_multilabel(f, agents, scale=60.0)
    assert torch.isfinite(log_ml).all()
    torch.testing.assert_close(log_ml[0, 1], torch.tensor(-120.0))


def test_pairwise_agreement_matches_scipy_and_min_sum():
    gen = torch.Generator().manual_seed(2)
    a = torch.softmax(3 * torch.randn(7, 13, generator=gen, dtype=torch.float64), 1)
    b = torch.softmax(3 * torch.randn(5, 13, generator=gen, dtype=torch.float64), 1)
    full = pairwise_agreement(a, b)
    expected = 1 - torch.from_numpy(np.abs(a.numpy()[:, None] - b.numpy()[None]).sum(-1)) / 2
    torch.testing.assert_close(full, expected, **TOL)
    # For probability rows: 1 - L1/2 = sum of element-wise minima.
    torch.testing.assert_close(full, torch.minimum(a[:, None], b[None]).sum(-1), **TOL)
    torch.testing.assert_close(pairwise_agreement(a, b, chunk_size=2), full, **TOL)
    condensed = condensed_pairwise_agreement(a, chunk_size=3)
    torch.testing.assert_close(
        condensed, torch.from_numpy(1 - pdist(a.numpy(), "cityblock") / 2), **TOL
    )
    torch.testing.assert_close(condensed_pairwise_agreement(a), condensed, **TOL)


# ----------------------------------------------------------------------------------------------
# RJ
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [1.0, 0.8])
def test_joint_loss_matches_naive_loop(seed, margin):
    features, agents, labels, target = rj_inputs(seed)
    sim_s, sim_t = features @ agents.t(), target @ agents.t()
    f1, t1 = features.clone().requires_grad_(True), target.clone().requires_grad_(True)
    f2, t2 = features.clone().requires_grad_(True), target.clone().requires_grad_(True)
    loss = JointLoss(margin)(f1, agents, labels, sim_s, t1, sim_t)
    ref = naive_joint(f2, agents, labels, sim_s, t2, sim_t, margin)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(f1.grad, f2.grad, **TOL)
    torch.testing.assert_close(t1.grad, t2.grad, **TOL)


def test_joint_loss_general_inputs_and_clamped_hinge():
    """Non-unit features and a similarity unrelated to them: the hinge clamp and the exact
    ‖f − a‖² (not 2 − 2S) must match the loop."""
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    agents = 0.3 * torch.randn(9, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 8, 1, 0])
    sim_s = torch.rand(6, 9, generator=gen, dtype=torch.float64)
    sim_t = torch.rand(5, 9, generator=gen, dtype=torch.float64)
    loss = JointLoss(2.5)(f, agents, labels, sim_s, t, sim_t)
    f2, t2 = f.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    ref = naive_joint(f2, agents, labels, sim_s, t2, sim_t, 2.5)
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(f.grad, f2.grad, **TOL)
    torch.testing.assert_close(t.grad, t2.grad, **TOL)


def test_joint_loss_hand_computed():
    agents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [SQRT2 / 2, SQRT2 / 2]], dtype=torch.float64)
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # label 0
    g = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    # Source: own agent 0 (excluded), cos with agent 2 = 0.707 > 0.5 -> hard, agent 1 cos 0.
    # Target 0: cos 1 with agent 1 and 0.707 with agent 2 -> both hard. Target 1: none.
    d_02 = 2 - 2 * SQRT2 / 2  # ‖f − a₂‖² for unit vectors
    positive = 0.0
    source_neg = 1 - d_02
    target_neg = ((1 - 0.0) + (1 - d_02)) / 2
    expected = (positive + source_neg + target_neg) / 3
    rj = JointLoss(1.0)
    loss = rj(f, agents, torch.tensor([0]), f @ agents.t(), g, g @ agents.t())
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(rj.last_stats["hard_agents_target"], torch.tensor(1.0).double())
    torch.testing.assert_close(rj.last_stats["active_rows_target"], torch.tensor(0.5).double())


def test_joint_loss_without_hard_agents_is_mean_of_positive_terms():
    gen = torch.Generator().manual_seed(3)
    agents = torch.eye(6, dtype=torch.float64)
    labels = torch.tensor([0, 2, 5, 2])
    f = unit(agents[labels] + 0.1 * torch.randn(4, 6, generator=gen, dtype=torch.float64))
    g = unit(torch.ones(3, 6, dtype=torch.float64))  # cosine 0.41 with every agent
    own = F.one_hot(labels, 6).bool()
    assert not ((f @ agents.t() > 0.5) & ~own).any()  # no hard agent anywhere
    rj = JointLoss()
    loss = rj(f, agents, labels, f @ agents.t(), g, g @ agents.t())
    expected = (f - agents[labels]).pow(2).sum(1).mean()
    torch.testing.assert_close(loss, expected, **TOL)
    assert float(rj.last_stats["active_rows_source"]) == 0.0
    assert float(rj.last_stats["active_rows_target"]) == 0.0


def test_joint_loss_gradcheck():
    features, agents, labels, target = rj_inputs(4, batch_source=4, batch_target=3, num_agents=6)
    sim_s, sim_t = features @ agents.t(), target @ agents.t()
    rj = JointLoss()
    inputs = (features.clone().requires_grad_(True), target.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda f, t: rj(f, agents, labels, sim_s, t, sim_t), inputs, eps=1e-6, atol=1e-6
    )


def test_joint_loss_rejects_bad_shapes():
    rj = JointLoss()
    f, a = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="similarity"):
        rj(f, a, torch.zeros(3, dtype=torch.long), torch.randn(3, 4), f, torch.randn(3, 5))
    with pytest.raises(ValueError, match="labels"):
        rj(f, a, torch.zeros(2, dtype=torch.long), torch.randn(3, 5), f, torch.randn(3, 5))


# ----------------------------------------------------------------------------------------------
# CML
# ----------------------------------------------------------------------------------------------
def cml_inputs(seed, batch=14, num_classes=9, views=(0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    return torch.log_softmax(logits, 1), torch.tensor(views)


@pytest.mark.parametrize("use_std", [True, False])
@pytest.mark.parametrize("num_views", [None, 6])
def test_multilabel_loss_matches_naive_loop(use_std, num_views):
    init_x, init_views = cml_inputs(10, views=(0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5))
    x, views = cml_inputs(11)  # camera 3 is a singleton, camera 5 absent
    cml = MultilabelLoss(368, use_std=use_std, num_views=num_views).double()
    cml.init_centers(init_x, init_views)
    c_mean, c_std = cml.center_mean.clone(), cml.center_std.clone()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss = cml(x1, views)
    ref, ref_mean, ref_std = naive_cml(x2, views, c_mean, c_std, 368 / 10000, use_std)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(cml.center_mean, ref_mean, **TOL)
    torch.testing.assert_close(cml.center_std, ref_std, **TOL)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    assert int(cml.last_stats["num_views_used"]) == 4
    if not use_std:
        torch.testing.assert_close(cml.center_std, c_std)  # untouched


def test_multilabel_init_centers_matches_naive_and_skips_singletons():
    x, views = cml_inputs(12)
    cml = MultilabelLoss(100).double()
    cml.init_centers(x, views)
    stats = naive_camera_stats(x, views)  # camera 3 (one sample) skipped
    torch.testing.assert_close(cml.center_mean, torch.stack([m for m, _ in stats]).mean(0), **TOL)
    torch.testing.assert_close(cml.center_std, torch.stack([s for _, s in stats]).mean(0), **TOL)
    assert cml.initialized and bool(cml.is_initialized)


def test_multilabel_hand_computed_momentum_and_loss():
    cml = MultilabelLoss(batch_size=100, num_views=3).double()  # eta = 0.01
    init = torch.tensor([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    cml.init_centers(init, torch.tensor([0, 0, 1, 1]))
    # camera 0: mean (1, 2), std (√2, √8); camera 1: mean (1, 2), std (0, √2)
    c_std0 = torch.tensor([SQRT2 / 2, 3 * SQRT2 / 2], dtype=torch.float64)
    torch.testing.assert_close(cml.center_mean, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(cml.center_std, c_std0)

    batch = torch.tensor([[1.0, 2.0], [3.0, 2.0], [7.0, 7.0]], dtype=torch.float64)
    loss = cml(batch, torch.tensor([0, 0, 2]))  # camera 2 is a singleton: skipped
    # camera 0: mean (2, 2), std (√2, 0)
    c_mean1 = 0.99 * torch.tensor([1.0, 2.0]) + 0.01 * torch.tensor([2.0, 2.0])
    c_std1 = 0.99 * c_std0 + 0.01 * torch.tensor([SQRT2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(cml.center_mean, c_mean1.double())
    torch.testing.assert_close(cml.center_std, c_std1)
    expected = (
        (torch.tensor([2.0, 2.0]).double() - c_mean1.double()).pow(2).sum()
        + (torch.tensor([SQRT2, 0.0], dtype=torch.float64) - c_std1).pow(2).sum()
    ) / 2
    torch.testing.assert_close(loss, expected)


def test_multilabel_gradcheck():
    x, views = cml_inputs(13, batch=7, num_classes=4, views=(0, 0, 0, 1, 1, 2, 3))
    cml = MultilabelLoss(368, num_views=4).double()
    cml.init_centers(x, views)
    state = {k: v.clone() for k, v in cml.state_dict().items()}

    def fn(inp):
        cml.load_state_dict(state)  # the centre update must not drift between evaluations
        return cml(inp, views)

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("views", [(0, 1, 2, 3), (2,)])
def test_multilabel_no_qualifying_camera_gives_zero_and_keeps_centres(views):
    x_init, v_init = cml_inputs(14)
    cml = MultilabelLoss(368, num_views=5).double()
    cml.init_centers(x_init, v_init)
    before = {k: v.clone() for k, v in cml.state_dict().items()}
    x = cml_inputs(15, batch=len(views))[0].requires_grad_(True)
    loss = cml(x, torch.tensor(views))
    assert loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    for key, value in cml.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_multilabel_single_camera_with_several_samples():
    x_init, views_init = cml_inputs(16)
    cml = MultilabelLoss(368, num_views=5).double()
    cml.init_centers(x_init, views_init)
    c_mean, c_std = cml.center_mean.clone(), cml.center_std.clone()
    x, _ = cml_inputs(17, batch=5)
    views = torch.full((5,), 3)
    loss = cml(x, views)
    ref, ref_mean, ref_std = naive_cml(x, views, c_mean, c_std, 0.0368)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(cml.center_mean, ref_mean, **TOL)
    torch.testing.assert_close(cml.center_std, ref_std, **TOL)


def test_multilabel_errors():
    cml = MultilabelLoss(368, num_views=3)
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="init_centers"):
        cml(x, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="at least two samples"):
        cml.init_centers(x[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_views=3"):
        cml.init_centers(x, torch.tensor([0, 0, 3, 3]))
    with pytest.raises(ValueError, match="NaN"):
        cml.init_centers(torch.full((4, 5), float("nan")), torch.tensor([0, 0, 1, 1]))


# ----------------------------------------------------------------------------------------------
# MDL
# ----------------------------------------------------------------------------------------------
def mdl_inputs(seed, batch=24, dim=6, num_classes=10):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(batch) // 3
    centres = torch.randn(batch // 3 + 1, dim, generator=gen, dtype=torch.float64)
    features = 0.5 * (
        centres[ids] + 0.6 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    )
    logits = 2 * torch.randn(batch // 3 + 1, num_classes, generator=gen, dtype=torch.float64)
    noise = torch.randn(batch, num_classes, generator=gen, dtype=torch.float64)
    multilabels = torch.softmax(logits[ids] + noise, 1)
    labels = torch.where(torch.rand(batch, generator=gen) < 0.8, ids, ids + 100)
    return features, multilabels, labels


def split_threshold(features, multilabels, ratio):
    """A threshold halfway between the two middle agreements of the mined pairs, so that both P
    and N are non-empty and no agreement ties with T."""
    p_dist = pdist(features.detach().numpy())
    agree = 1 - pdist(multilabels.numpy(), "cityblock") / 2
    mined = np.sort(agree[np.argsort(p_dist)[: int(len(p_dist) * ratio)]])
    middle = len(mined) // 2
    return float((mined[middle - 1] + mined[middle]) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.2, 0.05])
def test_discriminative_loss_matches_naive_loop(seed, ratio):
    features, multilabels, labels = mdl_inputs(seed)
    t0 = split_threshold(features, multilabels, ratio)
    mdl = DiscriminativeLoss(ratio).double()
    mdl.init_threshold(torch.tensor([t0], dtype=torch.float64))  # k = max(1, 0) = 1: T0 = t0
    assert float(mdl.threshold) == t0
    f1, f2 = features.clone().requires_grad_(True), features.clone().requires_grad_(True)
    loss = mdl(f1, multilabels, labels)
    ref, ref_t, n_pos, n_neg, tp = naive_mdl(f2, multilabels, t0, ratio, labels)
    assert n_pos > 0 and n_neg > 0  # both branches exercised
    torch.testing.assert_close(loss, ref, **TOL)
    assert float(mdl.threshold) == pytest.approx(ref_t, abs=1e-12)
    stats = mdl.last_stats
    assert int(stats["num_positives"]) == n_pos and int(stats["num_negatives"]) == n_neg
    assert float(stats["tp_rate"]) == pytest.approx(tp)
    assert float(stats["threshold_used"]) == t0
    loss.backward()
    ref.backward()
    torch.testing.assert_close(f1.grad, f2.grad, **TOL)


def test_discriminative_hand_computed_split_update_and_gradient():
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    ml = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    # agreements: (0,1) 0.5, (0,2) 0, (1,2) 0; distances: (0,1) 1, (0,2) 3, (1,2) √10.
    mdl = DiscriminativeLoss(mining_ratio=2 / 3).double()  # n = floor(3 · 2/3) = 2
    assert mdl.num_mined_pairs(3) == 2
    mdl.init_threshold(np.array([0.25]))
    loss = mdl(g, ml)
    p, q = math.exp(-1.0), math.exp(-9.0)  # (0,1) positive, (0,2) negative
    torch.testing.assert_close(loss, torch.tensor(-math.log(p / (p + q)), dtype=torch.float64))
    # T ← 0.9·0.25 + 0.1·(2nd largest agreement = 0)
    assert float(mdl.threshold) == pytest.approx(0.225, abs=1e-15)
    assert "tp_rate" not in mdl.last_stats
    loss.backward()
    d1, d2 = q / (p + q), -q / (p + q)  # dL/d‖g0−g1‖², dL/d‖g0−g2‖²
    expected = torch.zeros(3, 2, dtype=torch.float64)
    expected[0] = d1 * 2 * (g[0] - g[1]).detach() + d2 * 2 * (g[0] - g[2]).detach()
    expected[1] = -d1 * 2 * (g[0] - g[1]).detach()
    expected[2] = -d2 * 2 * (g[0] - g[2]).detach()
    torch.testing.assert_close(g.grad, expected)


def test_discriminative_empty_positive_and_empty_negative_fallbacks():
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    ml = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mdl = DiscriminativeLoss(mining_ratio=1 / 3).double()  # n = 1: the pair (0, 1), A = 0.5
    mdl.init_threshold(np.array([0.6]))  # 0.5 > 0.6 false: P empty -> P̄ = 1
    loss = mdl(g, ml)
    n_bar = math.exp(-1.0)
    torch.testing.assert_close(loss, torch.tensor(-math.log(1 / (1 + n_bar))).double())
    assert int(mdl.last_stats["num_positives"]) == 0
    assert float(mdl.threshold) == pytest.approx(0.9 * 0.6 + 0.1 * 0.5)

    mdl.init_threshold(np.array([0.4]))  # positive: N empty -> N̄ = 0.5
    loss = mdl(g, ml, torch.tensor([7, 7, 8]))
    p_bar = math.exp(-1.0)
    torch.testing.assert_close(loss, torch.tensor(-math.log(p_bar / (p_bar + 0.5))).double())
    assert float(mdl.last_stats["tp_rate"]) == 1.0
    assert int(mdl.last_stats["num_negatives"]) == 0


def test_discriminative_strict_split_uses_the_old_threshold():
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    ml = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mdl = DiscriminativeLoss(mining_ratio=1 / 3).double()  # mined pair (0, 1), A = 0.5 exactly
    mdl.init_threshold(np.array([0.5]))
    mdl(g, ml)
    assert int(mdl.last_stats["num_positives"]) == 0  # A = T is not a positive (strict >)
    # n = 2 gives t_b = 0, so T moves 0.54 -> 0.486 < 0.5: the split must use the old 0.54.
    mdl = DiscriminativeLoss(mining_ratio=2 / 3).double()
    mdl.init_threshold(np.array([0.54]))
    mdl(g, ml)
    assert int(mdl.last_stats["num_positives"]) == 0
    assert float(mdl.threshold) == pytest.approx(0.486)
    mdl(g, ml)  # next step splits with the updated T
    assert int(mdl.last_stats["num_positives"]) == 1


def test_discriminative_no_mined_pair_keeps_threshold():
    mdl = DiscriminativeLoss(mining_ratio=0.005)
    mdl.init_threshold(np.array([0.3]))
    g = torch.randn(20, 4, requires_grad=True)  # C(20, 2) · 0.005 = 0.95 -> n = 0
    ml = torch.softmax(torch.randn(20, 5), 1)
    with pytest.warns(RuntimeWarning, match="0 mined pairs"):
        loss = mdl(g, ml, torch.arange(20))
    torch.testing.assert_close(loss, torch.tensor(math.log(1.5)))
    assert float(mdl.threshold) == pytest.approx(0.3)
    loss.backward()
    assert torch.equal(g.grad, torch.zeros_like(g))
    assert float(mdl.last_stats["tp_rate"]) == 0.0
    with warnings.catch_warnings():  # warned once only
        warnings.simplefilter("error")
        mdl(g, ml)


def test_init_threshold_kth_largest_and_guard():
    values = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
    mdl = DiscriminativeLoss(mining_ratio=0.3)  # k = 3 -> 3rd largest = 0.7
    mdl.init_threshold(values)
    assert float(mdl.threshold) == pytest.approx(0.7)
    assert float(mdl.threshold) == pytest.approx(np.sort(values)[-int(len(values) * 0.3)])
    tiny = DiscriminativeLoss(mining_ratio=0.01)  # floor(10 · 0.01) = 0 -> k = 1 (maximum)
    tiny.init_threshold(torch.tensor(values))
    assert float(tiny.threshold) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="empty"):
        tiny.init_threshold(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        tiny.init_threshold(np.array([0.1, np.nan]))


def test_discriminative_forward_before_init_raises():
    with pytest.raises(RuntimeError, match="init_threshold"):
        DiscriminativeLoss()(torch.randn(4, 3), torch.rand(4, 5))


def test_discriminative_gradcheck():
    features, multilabels, labels = mdl_inputs(7, batch=8, dim=3, num_classes=5)
    mdl = DiscriminativeLoss(0.3).double()
    t0 = split_threshold(features, multilabels, 0.3)

    def fn(f):
        mdl.init_threshold(np.array([t0]))  # reset T between evaluations
        return mdl(f, multilabels, labels)

    assert torch.autograd.gradcheck(
        fn, (features.clone().requires_grad_(True),), eps=1e-6, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# Mixed precision, state, devices
# ----------------------------------------------------------------------------------------------
def test_bf16_autocast_inputs_give_finite_fp32_losses():
    features, agents, labels, target = rj_inputs(8, batch_source=12, batch_target=12)
    f = features.float().bfloat16().requires_grad_(True)
    t = target.float().bfloat16().requires_grad_(True)
    a = agents.float().bfloat16()
    views = torch.arange(12) % 3
    cml = MultilabelLoss(368, num_views=3)
    cml.init_centers(log_soft_multilabel(t.detach().float(), a.float()), views)
    mdl = DiscriminativeLoss(0.05)
    mdl.init_threshold(condensed_pairwise_agreement(soft_multilabel(t.detach(), a)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim_s, sim_t = f @ a.t(), t @ a.t()
        assert sim_s.dtype == torch.bfloat16
        log_ml = log_soft_multilabel(t, a)
        losses = [
            JointLoss()(f, a, labels, sim_s, t, sim_t),
            cml(log_ml, views),
            mdl(t, soft_multilabel(t, a).detach()),
        ]
    assert log_ml.dtype == torch.float32
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    sum(losses).backward()
    assert torch.isfinite(f.grad.float()).all() and torch.isfinite(t.grad.float()).all()
    assert cml.center_mean.dtype == torch.float32 and mdl.threshold.dtype == torch.float32


def test_state_dict_round_trip_restores_threshold_and_centres():
    x, views = cml_inputs(20)
    cml = MultilabelLoss(368).double()
    cml.init_centers(x, views)
    cml(x.clone().requires_grad_(True), views)  # centres moved by one update
    mdl = DiscriminativeLoss(0.2)
    mdl.init_threshold(np.array([0.1, 0.4, 0.35]))
    features, multilabels, _ = mdl_inputs(3)
    mdl(features.float(), multilabels.float())

    cml_copy = MultilabelLoss(368).double()  # centres not allocated yet (K unknown)
    mdl_copy = DiscriminativeLoss(0.2)
    assert not cml_copy.initialized and not mdl_copy.initialized
    cml_copy.load_state_dict(cml.state_dict())
    mdl_copy.load_state_dict(mdl.state_dict())
    assert cml_copy.initialized and mdl_copy.initialized
    torch.testing.assert_close(cml_copy.center_mean, cml.center_mean, rtol=0, atol=0)
    torch.testing.assert_close(cml_copy.center_std, cml.center_std, rtol=0, atol=0)
    torch.testing.assert_close(mdl_copy.threshold, mdl.threshold, rtol=0, atol=0)
    assert set(mdl.state_dict()) == {"threshold", "is_initialized"}
    assert set(cml.state_dict()) == {"center_mean", "center_std", "is_initialized"}
    # The restored modules continue exactly like the originals.
    torch.testing.assert_close(cml_copy(x, views), cml(x, views))
    torch.testing.assert_close(
        mdl_copy(features.float(), multilabels.float()), mdl(features.float(), multilabels.float())
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    features, multilabels, labels = mdl_inputs(4)
    cpu = DiscriminativeLoss(0.2)
    cpu.init_threshold(np.array([0.5]))
    gpu = DiscriminativeLoss(0.2).cuda()
    gpu.init_threshold(np.array([0.5]))
    loss_cpu = cpu(features.float(), multilabels.float(), labels)
    loss_gpu = gpu(features.float().cuda(), multilabels.float().cuda(), labels.cuda())
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Benchmark smoke test (no timing assertion: timings belong to the benchmark)
# ----------------------------------------------------------------------------------------------
def test_benchmark_quick_run_reports_ratios():
    from src.bench.mar_losses import run

    text = run(quick=True, device="cpu")
    for name in ("RJ (JointLoss)", "CML (MultilabelLoss)", "MDL (DiscriminativeLoss)", "all three"):
        match = re.search(rf"\| {re.escape(name)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|", text)
        assert match, name
        assert all(float(v) > 0 for v in match.groups())
    # Both versions computed the same losses on identical state.
    diffs = re.findall(r"x \| ([\d.e+-]+) \|", text)
    assert len(diffs) == 3 and all(float(d) < 1e-4 for d in diffs)


def test_joint_loss_dense_path_matches_sparse_gather(monkeypatch):
    """The accelerator path (dense distance matrix) and the CPU path (gathered hard pairs)
    give the same value and gradients, hinge clamp included."""
    gen = torch.Generator().manual_seed(11)
    f = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    agents = 0.4 * torch.randn(12, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 12, (7,), generator=gen)
    sim_s = torch.rand(7, 12, generator=gen, dtype=torch.float64)
    sim_t = torch.rand(6, 12, generator=gen, dtype=torch.float64)
    sparse = JointLoss(2.0)(f, agents, labels, sim_s, t, sim_t)
    g_sparse = torch.autograd.grad(sparse, (f, t))
    monkeypatch.setattr(JointLoss, "sparse_on_cpu", False)
    dense = JointLoss(2.0)(f, agents, labels, sim_s, t, sim_t)
    g_dense = torch.autograd.grad(dense, (f, t))
    torch.testing.assert_close(sparse, dense, **TOL)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, **TOL)


def test_condensed_agreement_does_not_depend_on_the_blocking():
    """The CPU default (16-row triangle blocks) and one full block give bitwise equal values, so
    the chunking (a speed choice) never changes which pairs MDL mines."""
    x = torch.softmax(torch.randn(53, 40, generator=torch.Generator().manual_seed(3)) * 3, 1)
    blocked = condensed_pairwise_agreement(x)
    assert torch.equal(blocked, condensed_pairwise_agreement(x, chunk_size=53))
    assert torch.equal(blocked, condensed_pairwise_agreement(x, chunk_size=7))
