"""Router objectives: zero when quantized equals full precision, hand-computed values, useful gradients."""

import math

import pytest
import torch

from routealign.losses import OBJECTIVES, LossSettings, RouterLoss
from routealign.modifiers.rounding import TuningConfig
from routealign.losses.expertquant import gap_hinge, soft_rank_jaccard
from routealign.losses.kl import kl as kl_term
from routealign.losses.vsraq import rank_loss
from routealign.metrics import rank_weighted_jaccard
from routealign.routing import find_moe_layers
from routealign.tiny import tiny_model


def _router(model_type, **overrides):
    layer = find_moe_layers(tiny_model(model_type, **overrides))[0]
    return layer.family, layer.router


def sp(x):
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_zero_when_quantized_equals_full_precision(model_type, objective):
    family, router = _router(model_type)
    z = torch.randn(64, router.num_experts, generator=torch.Generator().manual_seed(0)) * 2
    loss = RouterLoss(objective, LossSettings(), family, router)
    tgt = loss.target(z)
    value = loss(z.clone().requires_grad_(), tgt)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    if objective != "none":
        noisy = loss(z + 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1)), tgt)
        assert noisy.item() > 1e-4


def _hand_case():
    family, router = _router("qwen3_moe", num_experts=4, num_experts_per_tok=2)
    z_fp = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    z_q = torch.tensor([[2.5, 2.2, 1.1, 0.0]], requires_grad=True)
    return family, router, z_fp, z_q


def test_vsraq_hand_computed():
    family, router, z_fp, z_q = _hand_case()
    topk = ((2.5 - 3) ** 2 + (2.2 - 2) ** 2) / 2
    w3, w2 = sig(3) * (1 - sig(3)) + 1e-3, sig(2) * (1 - sig(2)) + 1e-3
    sigm = (w3 * (sig(2.5) - sig(3)) ** 2 + w2 * (sig(2.2) - sig(2)) ** 2) / 2
    margin = ((2.2 - 1.1) - (2 - 1)) ** 2
    for anchor, rank in ((False, sp(-(2.5 - 2.2))), (True, sp(-(2.5 - 2.2)) - sp(-(3 - 2)))):
        loss = RouterLoss("vsraq", LossSettings(vsraq={"rank_anchor": anchor}), family, router)
        terms = loss.terms(z_q, loss.target(z_fp))
        assert terms["topk_mse"].item() == pytest.approx(topk, rel=1e-6)
        assert terms["sigmoid_mse"].item() == pytest.approx(sigm, rel=1e-5)
        assert terms["rank"].item() == pytest.approx(rank, rel=1e-6)
        assert terms["margin"].item() == pytest.approx(margin, rel=1e-5)
        total = loss(z_q, loss.target(z_fp)).item()
        assert total == pytest.approx(0.7 * topk + 0.3 * sigm + 0.01 * rank + 0.05 * margin, rel=1e-5)


def test_anchored_rank_is_zero_when_gap_grows():
    family, router, z_fp, _ = _hand_case()
    loss = RouterLoss("vsraq", LossSettings(), family, router)
    wider = torch.tensor([[3.5, 2.0, 1.0, 0.0]])
    assert rank_loss(loss, wider, loss.target(z_fp)).item() == 0.0
    paper = RouterLoss("vsraq", LossSettings(vsraq={"rank_anchor": False}), family, router)
    assert rank_loss(paper, wider, paper.target(z_fp)).item() == pytest.approx(sp(-1.5))


def test_topk_mse_kl_gap_hinge_hand_computed():
    family, router, z_fp, z_q = _hand_case()
    tgt = RouterLoss("vsraq", LossSettings(), family, router).target(z_fp)
    kl = RouterLoss("kl", LossSettings(), family, router)
    p = [sig(1.0), 1 - sig(1.0)]  # softmax over the two chosen logits (norm_topk_prob)
    q = [sig(0.3), 1 - sig(0.3)]
    assert kl_term(kl, z_q, tgt).item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    eq = RouterLoss("expertquant", LossSettings(), family, router)
    assert gap_hinge(eq, z_q, tgt).item() == pytest.approx((3 - 2) - (2.5 - 2.2), rel=1e-6)


def test_soft_jaccard_tends_to_exact_rank_weighted_jaccard():
    family, router = _router("qwen3_moe", num_experts=8, num_experts_per_tok=4)
    z_fp = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    z_q = torch.tensor([[4.0, 3.0, 0.9, 1.0, 0.0, -1.0, -2.0, -3.0]])  # experts 2 and 3 swap
    loss = RouterLoss("expertquant", LossSettings(expertquant={"tau": 1e-3}), family, router)
    exact = 1 - rank_weighted_jaccard(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 1, 3, 2]])).item()
    assert soft_rank_jaccard(loss, z_q, loss.target(z_fp)).item() == pytest.approx(exact, abs=1e-4)
    dropped = torch.tensor([[4.0, 3.0, 2.0, -0.5, 0.0, -1.0, -2.0, -3.0]])  # expert 3 leaves, 4 enters
    exact = 1 - rank_weighted_jaccard(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 1, 2, 4]])).item()
    assert soft_rank_jaccard(loss, dropped, loss.target(z_fp)).item() == pytest.approx(exact, abs=1e-4)


def test_gradients_push_toward_full_precision_order():
    family, router, z_fp, _ = _hand_case()
    z_q = torch.tensor([[2.0, 2.4, 1.0, 0.0]], requires_grad=True)  # top-2 order inverted
    for objective in ("vsraq", "expertquant", "topk_mse", "kl"):
        z = z_q.detach().clone().requires_grad_()
        loss = RouterLoss(objective, LossSettings(), family, router)
        loss(z, loss.target(z_fp)).backward()
        assert z.grad[0, 0] < 0 and z.grad[0, 1] > 0, objective  # descent raises expert 0, lowers expert 1


def test_sigmoid_family_uses_corrected_scores_and_groups():
    family, router = _router("deepseek_v3")
    z = torch.randn(16, router.num_experts, generator=torch.Generator().manual_seed(3))
    loss = RouterLoss("vsraq", LossSettings(), family, router)
    tgt = loss.target(z)
    selected = family.route(router, z).indices
    assert torch.equal(tgt.order[:, : loss.k].sort(-1).values, selected.sort(-1).values)
    expected = z.sigmoid() + router.e_score_correction_bias
    torch.testing.assert_close(loss.selection(z), expected)


def _sigmoid_case():
    """A GLM-style sigmoid router with correction biases that reorder two experts: by logits 0 > 1, by
    selection score (sigmoid + bias) 1 > 0."""
    family, router = _router("glm4_moe", n_routed_experts=4, num_experts_per_tok=2)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.0]))
    z_fp = torch.tensor([[1.0, 0.5, -1.0, -2.0]])
    z_q = torch.tensor([[0.8, 0.6, -0.7, -2.0]], requires_grad=True)
    return family, router, z_fp, z_q


def test_structure_terms_on_logits_by_default_for_sigmoid_routers():
    family, router, z_fp, z_q = _sigmoid_case()
    s = lambda z, e: sig(z) + (0.3 if e == 1 else 0.0)  # noqa: E731
    # full-precision order by selection score: expert 1 (0.922), expert 0 (0.731), then 2, 3
    for space in ("logits", "scores"):
        loss = RouterLoss("vsraq", LossSettings(structure_space=space), family, router)
        tgt = loss.target(z_fp)
        assert tgt.order[0, :3].tolist() == [1, 0, 2]
        terms = loss.terms(z_q, tgt)
        if space == "logits":
            gap_q, gap_fp = 0.6 - 0.8, 0.5 - 1.0            # z_1 - z_0 (VSRAQ eq. 13 on logits)
            margin = ((0.8 - -0.7) - (1.0 - -1.0)) ** 2     # z_0 - z_2 (eq. 14-15 on logits)
        else:
            gap_q, gap_fp = s(0.6, 1) - s(0.8, 0), s(0.5, 1) - s(1.0, 0)
            margin = ((s(0.8, 0) - s(-0.7, 2)) - (s(1.0, 0) - s(-1.0, 2))) ** 2
        rank = max(0.0, sp(-gap_q) - sp(-gap_fp))
        assert terms["rank"].item() == pytest.approx(rank, rel=1e-5), space
        assert terms["margin"].item() == pytest.approx(margin, rel=1e-5), space
        eq = RouterLoss("expertquant", LossSettings(structure_space=space), family, router)
        assert eq.terms(z_q, eq.target(z_fp))["gap_hinge"].item() == pytest.approx(max(0.0, gap_fp - gap_q), rel=1e-5)


def test_structure_space_makes_no_difference_for_softmax_routers():
    family, router, z_fp, z_q = _hand_case()
    values = {}
    for space in ("logits", "scores"):
        loss = RouterLoss("vsraq", LossSettings(structure_space=space), family, router)
        values[space] = loss(z_q, loss.target(z_fp))
    assert torch.equal(values["logits"], values["scores"])


def test_logit_space_margin_gradient_is_not_damped_by_the_sigmoid():
    family, router, z_fp, _ = _sigmoid_case()
    grads = {}
    for space in ("logits", "scores"):
        z_q = torch.tensor([[1.0, 0.5, -0.5, -2.0]], requires_grad=True)  # boundary margin shrunk by 0.5
        loss = RouterLoss("vsraq", LossSettings(structure_space=space,
                                           vsraq={"alpha": 0.0, "beta_rank": 0.0}),
                          family, router)
        terms = loss.terms(z_q, loss.target(z_fp))
        terms["margin"].backward()
        grads[space] = z_q.grad[0, 2].abs().item()
    # d/dz of (Δq - Δfp)^2 on logits is 2|Δq - Δfp| = 1.0; on scores it carries sigmoid'(z) <= 0.25 twice over
    assert grads["logits"] == pytest.approx(1.0, rel=1e-5)
    assert grads["scores"] < 0.25 * grads["logits"]


def test_a_new_objective_is_one_module(tmp_path, monkeypatch):
    """A module in the objectives' package that registers an Objective is found by name: the modifier's field
    accepts it, its own settings are the recipe's ``loss: {abs_topk: ...}`` section (validated, documented), and the
    loss computes its terms with them; an unknown name is refused with the list of known ones."""
    import routealign.losses as losses
    from routealign.losses.base import REGISTRY
    from routealign.modifiers.fields import field_lines

    (tmp_path / "abs_topk.py").write_text(
        "from pydantic import BaseModel, Field\n"
        "from routealign.losses.base import Objective, gather, register\n\n"
        "class AbsTopKSettings(BaseModel):\n"
        "    \"\"\"Absolute top-k error.\"\"\"\n"
        "    scale: float = Field(2.0, gt=0, description='weight of the absolute error.')\n\n"
        "@register\n"
        "class AbsTopK(Objective):\n"
        "    name = 'abs_topk'\n"
        "    Settings = AbsTopKSettings\n\n"
        "    def terms(self, loss, zq, tgt):\n"
        "        idx = tgt.order[:, : loss.k]\n"
        "        return {'abs': (gather(zq, idx) - gather(tgt.logits, idx)).abs().mean()}\n\n"
        "    def weights(self, params):\n"
        "        return {'abs': params.scale}\n")
    monkeypatch.setattr(losses, "__path__", [*losses.__path__, str(tmp_path)])
    monkeypatch.setattr("routealign.losses.base.REGISTRY", REGISTRY)
    try:
        assert "abs_topk" in losses.names()
        family, router = _router("qwen3_moe", num_experts=4, num_experts_per_tok=2)
        z_fp, z_q = torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[2.5, 2.2, 1.1, 0.0]])
        loss = RouterLoss("abs_topk", LossSettings(), family, router)
        assert loss(z_q, loss.target(z_fp)).item() == pytest.approx(2.0 * (0.5 + 0.2) / 2, rel=1e-6)
        from routealign import RouterAlignedRoundingModifier

        modifier = RouterAlignedRoundingModifier(objective="abs_topk", loss={"abs_topk": {"scale": 3.0}},
                                                 scheme="W4A16", targets="Linear")
        assert modifier.objective == "abs_topk" and modifier.params.scale == 3.0
        loss = RouterLoss("abs_topk", modifier.loss, family, router)
        assert loss(z_q, loss.target(z_fp)).item() == pytest.approx(3.0 * (0.5 + 0.2) / 2, rel=1e-6)
        with pytest.raises(ValueError, match=r"loss\.abs_topk\.scale: Input should be greater than 0"):
            LossSettings(abs_topk={"scale": -1})
        assert "    - `loss.abs_topk.scale` (2.0): weight of the absolute error." in field_lines(TuningConfig)
    finally:
        REGISTRY.pop("abs_topk", None)
    with pytest.raises(ValueError, match=r"unknown router objective 'abs_topk'; known: none, expertquant, kl"):
        TuningConfig(objective="abs_topk")
