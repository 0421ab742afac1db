"""MAR step functions (src/systems/mar_steps.py) without a Trainer: memory semantics against a naive
loop, warm-up, the weighted objective against the loss modules called one by one, gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from src.losses.mar import log_soft_multilabel, soft_multilabel
from src.systems.mar_steps import (
    MARWeights,
    all_gather_nograd,
    describe_nonfinite,
    first_occurrence,
    gather_target_batch,
    mar_objective,
    mar_train_step,
    nonfinite_flags,
    update_memory,
)
from tests.systems._mar_helpers import make_problem, naive_memory_update

WEIGHTS = MARWeights(lambda_cml=2e-4, lambda_ral=50.0, beta=0.2)


def _step(p, weights=WEIGHTS, mdl_active=True, **kwargs):
    return mar_train_step(
        source_feat=p.source_feat,
        source_pids=p.source_pids,
        target_feat=p.target_feat,
        target_camids=p.target_camids,
        target_index=p.target_index,
        classifier_weight=p.classifier_weight,
        memory=p.memory,
        memory_visited=p.visited,
        joint_loss=p.joint,
        multilabel_loss=p.multilabel,
        discriminative_loss=p.discriminative,
        weights=weights,
        target_pids=p.target_pids,
        mdl_active=mdl_active,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def test_first_occurrence():
    index = torch.tensor([5, 3, 5, 7, 3, 5])
    assert first_occurrence(index).tolist() == [0, 1, 0, 3, 1, 0]


def test_update_memory_matches_naive_loop_over_steps():
    g = torch.Generator().manual_seed(1)
    n, k = 30, 6
    memory, visited = torch.zeros(n, k), torch.zeros(n, dtype=torch.bool)
    ref_memory, ref_visited = memory.clone(), visited.clone()
    for step in range(6):
        # overlapping index sets, so rows are first visited at different steps
        index = torch.randperm(n, generator=g)[:12]
        if step % 2:
            index[-3:] = index[:3]  # DistributedSampler-style repeats inside the batch
        values = torch.softmax(torch.randn(12, k, generator=g) * 3, dim=1)
        update_memory(memory, visited, index, values, momentum=0.1)
        ref_memory, ref_visited = naive_memory_update(ref_memory, ref_visited, index, values, 0.1)
        assert torch.equal(visited, ref_visited)
        torch.testing.assert_close(memory, ref_memory, rtol=0, atol=1e-7)
    assert visited.any() and not visited.all()
    assert torch.equal(memory[~visited], torch.zeros_like(memory[~visited]))


def test_update_memory_first_visit_copies_then_ema_by_hand():
    memory, visited = torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool)
    update_memory(memory, visited, torch.tensor([1]), torch.tensor([[0.2, 0.8]]))
    assert memory[1].tolist() == pytest.approx([0.2, 0.8])
    update_memory(memory, visited, torch.tensor([1, 2]), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    # 0.9 * old + 0.1 * new for the visited row, copy for the new one
    assert memory[1].tolist() == pytest.approx([0.9 * 0.2 + 0.1, 0.9 * 0.8])
    assert memory[2].tolist() == pytest.approx([0.5, 0.5])
    assert memory[0].tolist() == [0.0, 0.0] and visited.tolist() == [False, True, True]


def test_update_memory_duplicates_use_first_occurrence():
    memory, visited = torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool)
    values = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.4, 0.6]])
    update_memory(memory, visited, torch.tensor([2, 2, 2]), values)
    assert memory[2].tolist() == pytest.approx([0.1, 0.9])


# ----------------------------------------------------------------------------------------------
# one step against the loss modules called one by one
# ----------------------------------------------------------------------------------------------
def _manual_terms(p, scale=30.0, momentum=0.1, clone=True):
    """The objective's terms from fresh copies of the modules, in the original's order."""
    p = p.clone() if clone else p
    f = F.normalize(p.source_feat, dim=1)
    g = F.normalize(p.target_feat, dim=1)
    a = F.normalize(p.classifier_weight, dim=1)
    sim_s = f.mm(a.t())
    al = F.cross_entropy(scale * sim_s, p.source_pids)
    rj = p.joint(f, a, p.source_pids, sim_s, g, g.mm(a.t()))
    cml = p.multilabel(log_soft_multilabel(g, a, scale), p.target_camids)
    memory, _ = naive_memory_update(
        p.memory, p.visited, p.target_index, soft_multilabel(g, a, scale), momentum
    )
    mdl = p.discriminative(g, memory[p.target_index], p.target_pids)
    return {"loss_al": al, "loss_rj": rj, "loss_cml": cml, "loss_mdl": mdl}, p, memory


def test_step_equals_weighted_sum_of_the_terms():
    p = make_problem(seed=0)
    terms, after, memory = _manual_terms(p)
    out = _step(p)
    for name, value in terms.items():
        torch.testing.assert_close(out.terms[name], value.detach(), rtol=1e-6, atol=1e-6)
    manual = (
        terms["loss_mdl"]
        + 2e-4 * terms["loss_cml"]
        + 50.0 * (terms["loss_al"] + 0.2 * terms["loss_rj"])
    )
    torch.testing.assert_close(out.loss.detach(), manual.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), mar_objective(out.terms, WEIGHTS))
    # state moved exactly as the modules moved it
    torch.testing.assert_close(p.memory, memory)
    torch.testing.assert_close(p.discriminative.threshold, after.discriminative.threshold)
    torch.testing.assert_close(p.multilabel.center_mean, after.multilabel.center_mean)
    torch.testing.assert_close(p.multilabel.center_std, after.multilabel.center_std)
    assert out.terms["loss_mdl"] > 0 and out.terms["loss_cml"] > 0
    for key in ("num_pos", "num_neg", "tp_rate", "threshold", "active_agents", "batch_quantile"):
        assert key in out.stats and out.stats[key].dtype == torch.float32
    assert out.stats["num_pos"] + out.stats["num_neg"] == 4  # floor(C(10,2) * 0.1)
    assert out.nonfinite.tolist() == [False, False, False]


@pytest.mark.parametrize(
    "weights",
    [
        MARWeights(1.0, 0.0, 0.0),
        MARWeights(0.0, 1.0, 0.0),
        MARWeights(0.0, 1.0, 3.0),
        MARWeights(0.5, 2.0, 0.7),
    ],
)
def test_objective_weights(weights):
    p = make_problem(seed=3)
    terms, _, _ = _manual_terms(p)
    out = _step(p, weights=weights)
    want = (
        terms["loss_mdl"]
        + weights.lambda_cml * terms["loss_cml"]
        + weights.lambda_ral * (terms["loss_al"] + weights.beta * terms["loss_rj"])
    )
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-6, atol=1e-6)


def test_warmup_has_no_mdl_and_no_memory_write():
    p = make_problem(seed=1)
    threshold = p.discriminative.threshold.clone()
    centre = p.multilabel.center_mean.clone()
    out = _step(p, mdl_active=False)
    assert out.terms["loss_mdl"] == 0
    assert not p.visited.any() and not p.memory.any()
    assert torch.equal(p.discriminative.threshold, threshold)
    assert "num_pos" not in out.stats
    # CML (and its centre EMA), AL and RJ do run in the warm-up epoch, as in the original
    assert not torch.equal(p.multilabel.center_mean, centre)
    manual = 2e-4 * out.terms["loss_cml"] + 50.0 * (
        out.terms["loss_al"] + 0.2 * out.terms["loss_rj"]
    )
    torch.testing.assert_close(out.loss.detach(), manual)


def test_mdl_reads_the_memory_after_this_steps_update():
    p = make_problem(seed=2)
    g = torch.Generator().manual_seed(5)
    # a visited memory whose old rows differ from the current soft multilabels
    p.memory[:] = torch.softmax(torch.randn(p.memory.shape, generator=g) * 4, dim=1)
    p.visited[:] = True
    terms, _, _ = _manual_terms(p)  # reads 0.9 * old + 0.1 * new
    out = _step(p)
    torch.testing.assert_close(out.terms["loss_mdl"], terms["loss_mdl"].detach())


def test_agents_learn_from_al_only():
    """Apart from weight decay, AL is the only term that moves the agents (mar.md §2)."""
    p = make_problem(seed=4)
    p.classifier_weight.requires_grad_(True)
    _step(p, weights=MARWeights(lambda_cml=1.0, lambda_ral=0.0, beta=1.0)).loss.backward()
    assert p.classifier_weight.grad is None or not p.classifier_weight.grad.any()
    q = make_problem(seed=4)
    q.classifier_weight.requires_grad_(True)
    _step(q).loss.backward()
    assert q.classifier_weight.grad.abs().sum() > 0


def test_gradients_match_float64_manual_objective():
    p = make_problem(seed=6, dtype=torch.float64)
    p.source_feat.requires_grad_(True)
    p.target_feat.requires_grad_(True)
    q = p.clone()
    out = _step(p)
    out.loss.backward()
    terms, _, _ = _manual_terms(q, clone=False)
    manual = mar_objective(terms, WEIGHTS)
    manual.backward()
    torch.testing.assert_close(p.source_feat.grad, q.source_feat.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(p.target_feat.grad, q.target_feat.grad, rtol=1e-5, atol=1e-8)


def test_bf16_features_compute_in_fp32():
    p = make_problem(seed=7)
    q = copy.deepcopy(p)
    q.source_feat = q.source_feat.bfloat16()
    q.target_feat = q.target_feat.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _step(q)
    assert out.loss.dtype == torch.float32
    p.source_feat = q.source_feat.float()
    p.target_feat = q.target_feat.float()
    ref = _step(p)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def test_gathers_are_identities_in_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    cams, index = torch.tensor([0, 1, 0, 1]), torch.tensor([3, 1, 2, 0])
    batch = gather_target_batch(x, cams, index, None)
    assert batch.feat is x and batch.camids is cams and batch.index is index and batch.pids is None
    assert all_gather_nograd(index) is index


def test_nonfinite_flags():
    ok = torch.zeros(3)
    assert nonfinite_flags(None, torch.tensor(0.5), ok, ok).tolist() == [False, False, False]
    bad_rows = torch.tensor([[0.0, float("nan")]])
    flags = nonfinite_flags(bad_rows, torch.tensor(float("inf")), ok, ok).tolist()
    assert flags == [True, True, False]
    assert "memory" in describe_nonfinite(flags) and "threshold" in describe_nonfinite(flags)
    flags = nonfinite_flags(None, torch.tensor(0.5), ok, torch.tensor([float("nan")])).tolist()
    assert flags == [False, False, True] and "centres" in describe_nonfinite(flags)


def test_step_flags_a_nan_memory_row():
    p = make_problem(seed=8)
    p.memory[p.target_index[0]] = float("nan")
    p.visited[p.target_index[0]] = True
    out = _step(p)
    assert out.nonfinite[0]


def test_step_without_mined_pairs_keeps_threshold_and_warns():
    p = make_problem(seed=9, mining_ratio=0.01)  # floor(C(10,2) x 0.01) = 0 pairs
    threshold = p.discriminative.threshold.clone()
    with pytest.warns(RuntimeWarning, match="0 mined pairs"):
        out = _step(p)
    assert torch.equal(p.discriminative.threshold, threshold)
    assert out.stats["num_pos"] == 0 and out.stats["num_neg"] == 0
    torch.testing.assert_close(out.terms["loss_mdl"], torch.tensor(math.log(1.5)))
    assert p.visited.sum() == 10  # the memory is still written
