"""ExpertAwareSmoothingModifier: exact folds on every family, the formula on a hand-made case, routed-token
statistics, composition with quantizing modifiers, clear errors."""


import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401
from routealign import ExpertAwareSmoothingModifier
from routealign.checkpoint import load_model, save_compressed
from routealign.errors import InputError
from routealign.modifiers.smoothing.folds import (
    aggregate_scales,
    fold_norm_into_consumers,
    fold_up_down,
    fold_v_o,
    smooth_scales,
)
from routealign.preflight import check_checkpoint
from routealign.routing import RouterTap, find_moe_layers
from routealign.tiny import TINY_FAMILIES, save_tiny

from .conftest import calibration_ids


def _load(tmp_path, model_type, seed=3):
    save_tiny(model_type, tmp_path / model_type, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / model_type), dtype=torch.float32)
    linearize_moe(model)
    return model


def _oneshot(model, recipe, rows=4, seq_len=32):
    ids = calibration_ids(rows=rows, seq_len=seq_len)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), recipe=recipe,
            num_calibration_samples=rows, max_seq_length=seq_len)


def _logits_and_routes(model, ids):
    layers = find_moe_layers(model)
    with torch.no_grad(), RouterTap(layers) as tap:
        logits = model(input_ids=ids).logits
    return logits, [tap.routing(l).indices.clone() for l in layers]


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_smoothing_is_exact_in_float32_on_every_family(tmp_path, model_type):
    model = _load(tmp_path, model_type)
    ids = calibration_ids(rows=2, seq_len=32, seed=9)
    logits0, routes0 = _logits_and_routes(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mod = ExpertAwareSmoothingModifier(mode="expertquant")
    _oneshot(model, mod)
    logits1, routes1 = _logits_and_routes(model, ids)
    assert (logits1 - logits0).abs().max() <= 1e-5 * logits0.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(routes0, routes1))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    folded = [r for r in mod.report if r.get("folded")]
    assert folded and changed  # something was really folded
    assert {"moe_input", "attention_input"} <= {r["mapping"] for r in folded}
    skipped = {(r["mapping"], r["skipped"].split(":")[0]) for r in mod.report if "skipped" in r}
    expected = {"gpt_oss": {("expert_down", "GptOssExpertMLP")},
                "deepseek_v3": {("attention_vo", "attention without v_proj/o_proj (e.g. MLA)")}}
    assert skipped == expected.get(model_type, set())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe"])
def test_search_mode_is_exact_and_reports_the_local_errors_it_chose_by(tmp_path, model_type):
    """The search folds exactly (logits and routes unchanged) and keeps, per mapping, a candidate whose quantized
    reconstruction error on the calibration statistics is no larger than without smoothing (its own measure: that
    the whole model quantizes better is not claimed; on these random models smoothing then RTN was 6% worse in
    next-token KL than RTN alone, issue 44's note)."""
    model = _load(tmp_path, model_type)
    ids = calibration_ids(rows=2, seq_len=32, seed=9)
    logits0, routes0 = _logits_and_routes(model, ids)
    mod = ExpertAwareSmoothingModifier(mode="search", scheme="NVFP4")
    _oneshot(model, mod)
    logits1, routes1 = _logits_and_routes(model, ids)
    assert (logits1 - logits0).abs().max() <= 1e-5 * logits0.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(routes0, routes1))
    rows = [r for r in mod.report if "error_before" in r]
    assert rows and all(r["error_after"] <= r["error_before"] for r in rows)
    assert any(r["error_after"] < r["error_before"] for r in rows)
    assert all((r["strength"] is None) == (not r["folded"]) for r in rows)


def test_formula_and_folds_on_a_hand_made_case():
    xmax = torch.tensor([4.0, 1.0, 0.0, 9.0])
    wmax = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(xmax, wmax, alpha=0.5, s_min=1e-3, s_max=1e3)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # sqrt(x)/sqrt(w); empty channels get 1
    assert torch.allclose(smooth_scales(torch.tensor([1e6]), torch.tensor([1.0]), 0.6, 1e-2, 10.0), torch.tensor([10.0]))
    # routed-token-weighted geometric mean: experts with 3 and 1 tokens, an unused one ignored
    agg = aggregate_scales(torch.tensor([[2.0, 1.0], [8.0, 4.0], [100.0, 100.0]]), torch.tensor([3, 1, 0]))
    assert torch.allclose(agg, torch.tensor([2.0 ** 0.75 * 8.0 ** 0.25, 4.0 ** 0.25]))

    up, down = torch.nn.Linear(3, 2, bias=True), torch.nn.Linear(2, 3, bias=False)
    u0, ub0, d0 = up.weight.detach().clone(), up.bias.detach().clone(), down.weight.detach().clone()
    fold_up_down(up, down, torch.tensor([2.0, 4.0]))
    assert torch.equal(up.weight, u0 / torch.tensor([[2.0], [4.0]])) and torch.equal(up.bias, ub0 / torch.tensor([2.0, 4.0]))
    assert torch.equal(down.weight, d0 * torch.tensor([[2.0, 4.0]]))
    fold_up_down(up, down, torch.tensor([4.0, 9.0]), power=2)  # relu^2: up rows / sqrt(s)
    assert torch.allclose(up.weight, u0 / torch.tensor([[4.0], [12.0]]))

    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    router = torch.nn.Linear(2, 4, bias=False)
    r0 = router.weight.detach().clone()
    fold_norm_into_consumers(norm, [router], torch.tensor([2.0, 0.5]))
    assert torch.equal(norm.weight, torch.tensor([0.5, 4.0])) and torch.equal(router.weight, r0 * torch.tensor([[2.0, 0.5]]))

    # GQA: 2 kv heads of dim 2, 4 query heads: o_proj column c reads kv channel (c // 2 // 2) * 2 + c % 2
    v, o = torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(8, 3, bias=False)
    v0, o0 = v.weight.detach().clone(), o.weight.detach().clone()
    fold_v_o(v, o, torch.tensor([1.0, 2.0, 3.0, 4.0]), head_dim=2)
    assert torch.equal(v.weight, v0 / torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    assert torch.equal(o.weight, o0 * torch.tensor([[1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]]))


def test_statistics_come_from_routed_tokens_only(tmp_path):
    """llm-compressor's default all-experts calibration runs every expert on every token; the smoothing counts
    only the routed ones, and an expert that no token reaches is left alone."""
    model = _load(tmp_path, "glm4_moe", seed=5)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias[7] = -100.0
    mod = ExpertAwareSmoothingModifier(mode="expertquant", mappings=["moe_input", "expert_down"])
    _oneshot(model, mod, rows=4, seq_len=32)
    for row in [r for r in mod.report if r["mapping"] == "moe_input"]:
        assert sum(row["routed_tokens"]) == 4 * 32 * 2 and row["routed_tokens"][7] == 0
    starved = [r for r in mod.report if r["where"].endswith("experts.7")]
    assert len(starved) == 2 and all(not r["folded"] and "no routed calibration token" in r["note"] for r in starved)


def test_unknown_mapping_and_bad_fields_are_clear_errors(tmp_path):
    with pytest.raises(Exception, match=r"mappings\.1[\s\S]*Input should be 'moe_input', 'expert_down', "
                                        r"'attention_vo', 'mlp_down' or 'attention_input'"):
        ExpertAwareSmoothingModifier(mappings=["moe_input", "gate_up"])
    with pytest.raises(Exception, match=r"mode[\s\S]*'search' or 'expertquant'"):
        ExpertAwareSmoothingModifier(mode="awq")
    with pytest.raises(Exception, match=r"smoothing_strength[\s\S]*less than or equal to 1"):
        ExpertAwareSmoothingModifier(smoothing_strength=2)
    with pytest.raises(Exception, match=r"'alpha' is now smoothing_strength"):
        ExpertAwareSmoothingModifier(alpha=0.5)
    model = _load(tmp_path, "qwen3_moe")
    with pytest.raises(InputError, match=r"s_min \(10.0\) must be below s_max \(1.0\)"):
        _oneshot(model, ExpertAwareSmoothingModifier(s_min=10.0, s_max=1.0))


def test_composes_with_rounding_in_one_recipe_and_saves_a_vllm_ready_checkpoint(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "quant_stage:\n  quant_modifiers:\n"
        "    ExpertAwareSmoothingModifier:\n      mode: search\n"
        "    RouterAlignedRoundingModifier:\n      objective: vsraq\n      iters: 2\n      batch_size: 2\n"
        "      scheme: NVFP4\n      targets: [Linear]\n      ignore: [lm_head]\n")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    _oneshot(model, str(recipe))
    ids = calibration_ids(rows=2, seq_len=32, seed=9)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_compressed(model, tmp_path / "q")
    assert check_checkpoint(tmp_path / "q").ok
    reloaded = load_model(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_refuses_a_later_static_activation_quantizer(tmp_path):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = _load(tmp_path, "qwen3_moe")
    recipe = [ExpertAwareSmoothingModifier(),
              QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head", "re:.*mlp.gate$"])]
    with pytest.raises(InputError, match="before QuantizationModifier with static activation quantization"):
        _oneshot(model, recipe)


def test_gptq_hessians_are_rescaled_with_the_fold(tmp_path, monkeypatch):
    """Composed with GPTQ in one recipe, the Hessian GPTQ uses for a smoothed module is the one of the smoothed
    inputs: H' = diag(1/s) H diag(1/s), with H what GPTQ alone accumulates on the same data."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    import routealign.modifiers.smoothing.sites as glue

    seen: dict[str, torch.Tensor] = {}
    real = GPTQModifier.compress_module_list

    def spy(self, modules):
        for m in modules:
            if m in self._hessians and self._module_names.get(m, "").endswith("layers.0.mlp.experts.0.down_proj"):
                seen[self._module_names[m]] = self._hessians[m].clone()
        return real(self, modules)

    scales = {}
    real_fold = glue.fold_up_down

    def record(up, down, scale, power=1):
        scales.setdefault(id(down), scale.clone())
        return real_fold(up, down, scale, power)

    monkeypatch.setattr(GPTQModifier, "compress_module_list", spy)
    monkeypatch.setattr(glue, "fold_up_down", record)
    hessians = []
    for smoothing in (False, True):
        seen.clear()
        model = _load(tmp_path / str(smoothing), "qwen3_moe")
        gptq = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])
        recipe = ([ExpertAwareSmoothingModifier(mode="expertquant", mappings=["expert_down"])] if smoothing
                  else []) + [gptq]
        _oneshot(model, recipe)
        (hessian,) = seen.values()
        hessians.append(hessian)
    s = scales[id(model.model.layers[0].mlp.experts[0].down_proj)]
    expected = hessians[0] / s[:, None] / s[None, :]
    assert not torch.allclose(hessians[1], hessians[0], rtol=1e-3)
    assert torch.allclose(hessians[1], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_bfloat16_model_routes_in_its_own_dtype(tmp_path):
    """Statistics route tokens in the model's dtype (a bf16 router on float32 activations would fail)."""
    save_tiny("glm4_moe", tmp_path / "m", seed=3, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    mod = ExpertAwareSmoothingModifier(mode="search", scheme="W4A16")
    _oneshot(model, mod)
    moe = [r for r in mod.report if r["mapping"] == "moe_input"]
    assert len(moe) == 2 and all(sum(r["routed_tokens"]) == 4 * 32 * 2 for r in moe)
    assert model.model.layers[1].post_attention_layernorm.weight.dtype == torch.bfloat16


def test_weight_only_quantization_modifier_in_the_same_recipe_sees_the_smoothed_weights(tmp_path):
    """Smoothing + QuantizationModifier(W4A16) in one recipe writes exactly what smoothing first, then RTN in a
    second oneshot call, writes (weight observers run at the epoch end, after the fold)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    def rtn():
        return QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])

    one = _load(tmp_path / "one", "qwen3_moe")
    _oneshot(one, [ExpertAwareSmoothingModifier(mode="expertquant"), rtn()])
    two = _load(tmp_path / "two", "qwen3_moe")
    _oneshot(two, [ExpertAwareSmoothingModifier(mode="expertquant")])
    _oneshot(two, [rtn()])
    a, b = one.state_dict(), two.state_dict()
    keys = [k for k in a if k.endswith(("weight_scale", ".weight")) and "experts.3" in k or "layers.1.self_attn" in k]
    assert keys
    for key in keys:
        assert torch.equal(a[key], b[key]), key
    plain = _load(tmp_path / "plain", "qwen3_moe")
    _oneshot(plain, [rtn()])
    assert any(not torch.equal(a[k], plain.state_dict()[k]) for k in keys)  # the smoothing did change them


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm4_moe", "gpt_oss"])
def test_statistics_come_from_the_causal_model(tmp_path, model_type, monkeypatch):
    """Inside oneshot, llm-compressor propagates bidirectional activations from the second layer on; the smoothing
    statistics of every layer (o_proj input maxima, routed-token counts) are those of the causal model."""
    model = _load(tmp_path, model_type)
    rows, seq_len = 4, 32
    ids = calibration_ids(rows=rows, seq_len=seq_len)
    layers = find_moe_layers(model)
    # the causal model's own statistics, from its forward
    o_max, counts = {}, {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith("self_attn.o_proj"):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: o_max.__setitem__(name, torch.maximum(
                    o_max.get(name, torch.zeros(a[0].shape[-1])), a[0].reshape(-1, a[0].shape[-1]).abs().amax(0)))))
    with torch.no_grad(), RouterTap(layers) as tap:
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for l in layers:
        counts[l.name] = torch.bincount(tap.routing(l).indices.reshape(-1), minlength=l.num_experts)
    seen = {}
    original = ExpertAwareSmoothingModifier._fold_decoder_layer

    def snapshot(self, model, prefix):
        for key, stats in self._stats.items():
            if key.startswith(prefix + "."):
                seen[key] = (None if stats.max is None else stats.max.clone(),
                             None if stats.counts is None else stats.counts.clone())
        return original(self, model, prefix)

    monkeypatch.setattr(ExpertAwareSmoothingModifier, "_fold_decoder_layer", snapshot)
    _oneshot(model, ExpertAwareSmoothingModifier(mode="expertquant"), rows=rows, seq_len=seq_len)
    checked = 0
    for name, expected in o_max.items():
        if name in seen:
            torch.testing.assert_close(seen[name][0], expected, rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
    for name, expected in counts.items():
        assert torch.equal(seen[name][1], expected), (name, seen[name][1], expected)
        checked += 1
    assert checked >= 3
