"""Routing metrics on hand-made cases whose answers are known."""

import math

import pytest
import torch

from routealign.metrics import (
    RoutingAgreement,
    exact_set,
    expert_load,
    jaccard,
    load_drift,
    match_score,
    overlap_at_k,
    quantized_ranks,
    rank_weighted_jaccard,
    routing_kl,
    top1_agreement,
    weights_l1,
)
from routealign.routing import FAMILIES, Routing

SOFTMAX = next(f for f in FAMILIES if f.name == "softmax_topk")
SIGMOID = next(f for f in FAMILIES if f.name == "sigmoid_bias_group_topk")

I = torch.tensor([[0, 1, 2, 3]])
SWAP = torch.tensor([[0, 1, 3, 2]])  # ranks 3 and 4 swapped
DISJOINT = torch.tensor([[4, 5, 6, 7]])
ONE_OUT = torch.tensor([[0, 1, 2, 5]])  # rank-4 expert replaced


def test_identical_routing():
    for fn in (overlap_at_k, jaccard, exact_set, top1_agreement, match_score, rank_weighted_jaccard):
        assert fn(I, I).item() == pytest.approx(1.0)


def test_disjoint_routing():
    for fn in (overlap_at_k, jaccard, exact_set, top1_agreement, match_score, rank_weighted_jaccard):
        assert fn(I, DISJOINT).item() == 0.0
    assert quantized_ranks(I, DISJOINT).tolist() == [[4, 4, 4, 4]]


def test_single_adjacent_swap_documented_values():
    assert overlap_at_k(I, SWAP).item() == 1.0
    assert jaccard(I, SWAP).item() == 1.0
    assert exact_set(I, SWAP).item() == 1.0
    assert top1_agreement(I, SWAP).item() == 1.0
    assert match_score(I, SWAP).item() == pytest.approx(0.75)  # (1 + 1 + 1/2 + 1/2) / 4
    w = [0.95 ** r for r in range(4)]
    s_min = w[0] + w[1] + w[3] + w[3]
    s_max = w[0] + w[1] + w[2] + w[2]
    assert rank_weighted_jaccard(I, SWAP).item() == pytest.approx(s_min / s_max, rel=1e-6)
    assert rank_weighted_jaccard(I, SWAP).item() == pytest.approx(0.975966, abs=1e-6)


def test_one_expert_replaced():
    assert overlap_at_k(I, ONE_OUT).item() == 0.75
    assert jaccard(I, ONE_OUT).item() == pytest.approx(3 / 5)
    assert exact_set(I, ONE_OUT).item() == 0.0
    assert match_score(I, ONE_OUT).item() == 0.75  # three exact credits, one zero
    w = [0.95 ** r for r in range(4)]
    # expert 3 (ref rank 4) and expert 5 (quant rank 4) each contribute only to the max sum
    expected = (w[0] + w[1] + w[2]) / (w[0] + w[1] + w[2] + 2 * w[3])
    assert rank_weighted_jaccard(I, ONE_OUT).item() == pytest.approx(expected, rel=1e-6)


def test_top1_and_rank_shift():
    shifted = torch.tensor([[1, 2, 3, 0]])  # top-1 moved to the last place
    assert top1_agreement(I, shifted).item() == 0.0
    assert exact_set(I, shifted).item() == 1.0
    # ref ranks (1,2,3,4) land at (4,1,2,3): credits 1/4, 1/2, 1/2, 1/2
    assert match_score(I, shifted).item() == pytest.approx((0.25 + 0.5 + 0.5 + 0.5) / 4)


def _routing(logits, indices, weights):
    return Routing(logits=logits, rank_scores=logits, indices=indices, weights=weights)


def test_kl_zero_for_identical_and_known_value():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = _routing(z, torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))
    assert routing_kl(SOFTMAX, r, r).item() == pytest.approx(0.0, abs=1e-7)
    assert routing_kl(SIGMOID, r, r).item() == pytest.approx(0.0, abs=1e-7)
    z2 = torch.tensor([[1.0, 1.0, 0.0, -1.0]])
    q = _routing(z2, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    p, pq = torch.softmax(z, -1), torch.softmax(z2, -1)
    assert routing_kl(SOFTMAX, r, q).item() == pytest.approx(float((p * (p / pq).log()).sum()), rel=1e-5)
    s, sq = torch.sigmoid(z), torch.sigmoid(z2)
    bern = s * (s / sq).log() + (1 - s) * ((1 - s) / (1 - sq)).log()
    assert routing_kl(SIGMOID, r, q).item() == pytest.approx(float(bern.mean()), rel=1e-5)


def test_weights_l1_and_load_drift():
    z = torch.zeros(1, 4)
    r = _routing(z, torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]]))
    q = _routing(z, torch.tensor([[0, 2]]), torch.tensor([[0.7, 0.3]]))
    assert weights_l1(r, q).item() == pytest.approx(0.1 + 0.4 + 0.3)
    load_a = expert_load(torch.tensor([[0, 1], [0, 1]]), 4)
    load_b = expert_load(torch.tensor([[2, 3], [2, 3]]), 4)
    assert load_a.tolist() == [2, 2, 0, 0]
    assert load_drift(load_a, load_a) == 0.0
    assert load_drift(load_a, load_b) == 1.0


def test_agreement_accumulates_positions_then_layers():
    agg = RoutingAgreement()
    logits = torch.randn(2, 8)
    # layer a: both tokens identical; layer b: token 0 identical, token 1 disjoint
    same = _routing(logits, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), torch.full((2, 4), 0.25))
    other = _routing(logits, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), torch.full((2, 4), 0.25))
    agg.add("a", SOFTMAX, same, same)
    agg.add("b", SOFTMAX, same, other)
    summary = agg.summary()
    rows = {r["layer"]: r for r in summary["per_layer"]}
    assert rows["a"]["overlap_at_k"] == 1.0 and rows["b"]["overlap_at_k"] == 0.5
    assert summary["mean"]["overlap_at_k"] == 0.75
    assert summary["mean"]["match_score"] == 0.75
    # confusion: layer b, token 1 sends all four reference experts "out" (column k)
    conf = torch.tensor(summary["confusion"]["b"])
    assert conf[:, 4].tolist() == [1, 1, 1, 1] and conf.diagonal().tolist() == [1, 1, 1, 1]
    margins, flipped = agg.margins("b")
    assert flipped.tolist() == [False, True]
    expected_margin = torch.topk(logits, 5, -1).values
    assert torch.allclose(margins, expected_margin[:, 3] - expected_margin[:, 4])
    assert math.isclose(rows["b"]["load_drift"], 0.5)
