"""Router families: our ordered top-k and combine weights equal what the model's own routers return."""

import pytest
import torch
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modeling.moe.linearize import linearize_moe

from routealign.errors import NotMoEError, UnsupportedRouterError
from routealign.routing import FAMILIES, RouterTap, find_moe_layers, supported_router_classes
from routealign.tiny import TINY_FAMILIES, tiny_model

EXPECTED_FAMILY = {
    "qwen3_moe": "softmax_topk",
    "qwen2_moe": "softmax_topk",
    "olmoe": "softmax_topk",
    "mixtral": "softmax_topk",
    "deepseek_v3": "sigmoid_bias_group_topk",
    "glm4_moe": "sigmoid_bias_group_topk",
    "solar_open": "sigmoid_bias_group_topk",
    "nemotron_h": "sigmoid_bias_group_topk",
    "gpt_oss": "logits_topk_softmax",
}


def _capture_router_io(model, layers, ids):
    """The model's own router inputs and outputs, per MoE layer."""
    seen = {}
    handles = [
        layer.router.register_forward_hook(
            lambda mod, args, out, name=layer.name: seen.__setitem__(name, (args[0].detach(), out))
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


def _assert_routing_matches(model, ids):
    layers = find_moe_layers(model)
    seen = _capture_router_io(model, layers, ids)
    assert set(seen) == {layer.name for layer in layers}
    for layer in layers:
        hidden, (logits, weights, indices) = seen[layer.name]
        ours = layer.route(hidden)
        torch.testing.assert_close(ours.logits, logits.float(), rtol=0, atol=0)
        # same expert sets; the softmax and GPT-OSS routers also return them best-first, as we do
        assert torch.equal(ours.indices.sort(-1).values, indices.sort(-1).values), layer.name
        if layer.family.selection != "sigmoid_bias":
            assert torch.equal(ours.indices, indices)
        # our order is best-first in the family's ranking space
        ranked = ours.rank_scores.gather(1, ours.indices)
        assert torch.all(ranked[:, :-1] >= ranked[:, 1:])
        # combine weights, matched by expert id
        theirs = torch.zeros_like(ours.logits).scatter(1, indices, weights.float())
        torch.testing.assert_close(ours.dense_weights(), theirs, rtol=1e-6, atol=1e-7)
        assert ours.weights.dtype == weights.dtype
    return layers


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_topk_and_weights_equal_model_router(model_type):
    model = tiny_model(model_type, seed=1)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    layers = _assert_routing_matches(model, ids)
    assert {layer.family.name for layer in layers} == {EXPECTED_FAMILY[model_type]}
    assert all(layer.top_k == 2 and layer.num_experts == 8 for layer in layers)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "glm4_moe", "gpt_oss", "nemotron_h", "mixtral"])
def test_same_description_after_linearize_moe(model_type):
    model = tiny_model(model_type, seed=3)
    before = [l.describe() for l in find_moe_layers(model)]
    linearize_moe(model)
    after = find_moe_layers(model)
    assert all(isinstance(l.experts, LinearExperts2D) for l in after)
    assert [{**d, "experts_class": None} for d in before] == [{**l.describe(), "experts_class": None} for l in after]
    _assert_routing_matches(model, torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(4)))


def test_structure_found_per_family():
    glm = find_moe_layers(tiny_model("glm4_moe"))
    assert [l.layer_index for l in glm] == [1, 2]  # first_k_dense_replace=1: layer 0 is dense
    assert glm[0].shared_expert_names == ["model.layers.1.mlp.shared_experts"]
    qwen2 = find_moe_layers(tiny_model("qwen2_moe"))
    assert qwen2[0].shared_expert_names == ["model.layers.0.mlp.shared_expert", "model.layers.0.mlp.shared_expert_gate"]
    nemo = find_moe_layers(tiny_model("nemotron_h"))
    assert [l.router_name for l in nemo] == ["model.layers.1.mixer.gate", "model.layers.3.mixer.gate"]
    oss = find_moe_layers(tiny_model("gpt_oss"))
    assert oss[0].router_name == "model.layers.0.mlp.router"


def test_group_limited_selection_is_exercised():
    """DeepSeek-V3 tiny config has n_group=4, topk_group=2: masking must change some selections, and we must
    reproduce the masked choice (not the plain top-k of the corrected scores)."""
    model = tiny_model("deepseek_v3", seed=5)
    layers = find_moe_layers(model)
    seen = _capture_router_io(model, layers, torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(6)))
    changed = 0
    for layer in layers:
        hidden, (_, _, indices) = seen[layer.name]
        ours = layer.route(hidden)
        unmasked = torch.topk(ours.logits.sigmoid() + layer.router.e_score_correction_bias, 2, dim=-1).indices
        changed += int((unmasked.sort(-1).values != indices.sort(-1).values).any(-1).sum())
        assert torch.isinf(ours.rank_scores).any(-1).all()  # every token has masked groups
    assert changed > 0


def test_forced_routing_with_own_choice_is_identity():
    """Forcing each router to its own choice (weights recomputed by the family) reproduces the model's logits."""
    for model_type in ("qwen3_moe", "glm4_moe", "gpt_oss", "mixtral"):
        model = tiny_model(model_type, seed=7)
        layers = find_moe_layers(model)
        ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(8))
        with torch.no_grad(), RouterTap(layers) as tap:
            plain = model(input_ids=ids).logits
        forced = {l.name: tap.routing(l).indices for l in layers}
        with torch.no_grad(), RouterTap(layers, force=forced):
            again = model(input_ids=ids).logits
        torch.testing.assert_close(again, plain, rtol=0, atol=0)


class FancyRouter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4, 8))


class FancyMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = FancyRouter()
        self.experts = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])


def test_unknown_router_error_names_class_and_path():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([FancyMoE()])
    with pytest.raises(UnsupportedRouterError, match=r"unsupported MoE router class FancyRouter at 'layers.0.gate'"):
        find_moe_layers(model)


def test_dense_model_is_not_moe():
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(NotMoEError, match="LlamaForCausalLM has no MoE layer"):
        find_moe_layers(dense)
    assert find_moe_layers(dense, require=False) == []


def test_every_family_class_is_supported_once():
    names = [c for fam in FAMILIES for c in fam.classes]
    assert len(names) == len(set(names)) == len(supported_router_classes())
