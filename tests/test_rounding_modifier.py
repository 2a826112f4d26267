"""RouterAlignedRoundingModifier inside llm-compressor's oneshot: exact RTN at iters=0, exact save/reload,
vLLM-ready config, YAML recipes, starving experts."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from loguru import logger
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401  (registers the modifiers)
from routealign import RouterAlignedRoundingModifier
from routealign.checkpoint import load_model
from routealign.errors import NotMoEError
from routealign.tiny import save_tiny

from .conftest import calibration_ids, quantize_with_llmcompressor

RECIPES = Path(__import__("routealign.recipes").recipes.path("vsraq_w4a16")).parent


def _dataset(ids):
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _run(model_dir, recipe, ids, dtype=torch.float32, out=None):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    oneshot(model=model, dataset=_dataset(ids), recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    logits = None
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if out is not None:
        model.save_pretrained(str(out), save_compressed=True)
    return model, logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for t in ("qwen3_moe", "glm4_moe", "qwen2_moe"):
        save_tiny(t, root / t, seed=21)
        save_tiny(t, root / f"{t}-bf16", seed=21, dtype=torch.bfloat16)
    return root


@pytest.mark.parametrize("model_type,scheme,chunk", [("qwen3_moe", "W4A16", 0), ("glm4_moe", "W4A16_ASYM", 0),
                                                     ("qwen2_moe", "W3A16", 0), ("qwen3_moe", "W8A16", 0),
                                                     ("qwen3_moe", "W2A16", 0), ("qwen3_moe", "W4A16", 3),
                                                     ("glm4_moe", "W8A16", 5)])
def test_none_with_zero_iters_equals_rtn_checkpoint(tmp_path, tiny, model_type, scheme, chunk):
    """bf16 models, every integer width llm-compressor presets, experts whole or a chunk at a time (chunks that do
    not divide the experts: the last is shorter)."""
    ids = calibration_ids(rows=4, seq_len=32)
    model_dir = tiny / f"{model_type}-bf16"
    quantize_with_llmcompressor(model_dir, tmp_path / "rtn", scheme, ids, dtype=torch.bfloat16)
    ours = RouterAlignedRoundingModifier(objective="none", iters=0, scheme=scheme, targets="Linear",
                                         ignore=["lm_head"], rounding={"min_expert_tokens": 0, "full_range": False},
                                         memory={"expert_chunk": chunk})
    _run(model_dir, ours, ids, dtype=torch.bfloat16, out=tmp_path / "ours")
    a = load_file(tmp_path / "rtn" / "model.safetensors")
    b = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_none_with_zero_iters_equals_rtn_nvfp4_values(tmp_path, tiny):
    """NVFP4A16: same scales and global scales, same dequantized weights (packed bytes may differ only in the sign
    of exact zeros: compressed-tensors maps -0 to +0 when the stored weight is already quantize-dequantized)."""
    ids = calibration_ids(rows=4, seq_len=32)
    model_dir = tiny / "qwen3_moe-bf16"
    quantize_with_llmcompressor(model_dir, tmp_path / "rtn", "NVFP4A16", ids, dtype=torch.bfloat16)
    ours = RouterAlignedRoundingModifier(objective="none", iters=0, rounding={"min_expert_tokens": 0}, scheme="NVFP4A16",
                                         targets="Linear", ignore=["lm_head"])
    _run(model_dir, ours, ids, dtype=torch.bfloat16, out=tmp_path / "ours")
    a = load_file(tmp_path / "rtn" / "model.safetensors")
    b = load_file(tmp_path / "ours" / "model.safetensors")
    for key in a:
        if not key.endswith("weight_packed"):
            assert torch.equal(a[key], b[key]), key
    ra = dict(load_model(tmp_path / "rtn").named_parameters())
    rb = dict(load_model(tmp_path / "ours").named_parameters())
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def _kept_iterations(report: list[dict]) -> list[int]:
    """Per tuned layer, the iteration its kept arm kept (0: the RTN start)."""
    return [row["arms"]["router" if row["router"] in ("kept", "ungated") else "plain"]["best_iter"] for row in report]


def _rtn_weights(model_dir, scheme, ids, dtype):
    """The weights of the same modifier at iters 0 (RTN on the same grid), by name."""
    mod = RouterAlignedRoundingModifier(objective="none", iters=0, scheme=scheme, targets="Linear", ignore=["lm_head"])
    model, _ = _run(model_dir, mod, ids, dtype=dtype)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}


@pytest.mark.parametrize("scheme,dtype", [("W4A16", torch.float32), ("W4A16_ASYM", torch.float32),
                                          ("NVFP4", torch.float32), ("NVFP4A16", torch.float32),
                                          ("W4A16", torch.bfloat16), ("NVFP4", torch.bfloat16)])
def test_tuned_checkpoint_reloads_to_the_in_memory_model(tmp_path, tiny, scheme, dtype):
    """Learned codes (layers kept tuned iterations, not the RTN start; weights that differ from RTN's) survive
    packing: the reloaded checkpoint computes the in-memory model's logits bit for bit."""
    ids = calibration_ids(rows=16, seq_len=32, seed=2)
    mod = RouterAlignedRoundingModifier(objective="vsraq", router_scope="both", iters=9, batch_size=4, lr=0.02,
                                        holdout={"every": 3}, gate={"enabled": False}, scheme=scheme, targets="Linear",
                                        ignore=["lm_head"])
    name = "glm4_moe" if dtype == torch.float32 else "glm4_moe-bf16"
    model, logits = _run(tiny / name, mod, ids, dtype=dtype)
    # tuned iterations kept (not the RTN start), and experts' and attention weights unlike RTN's: learned codes
    assert sum(it > 0 for it in _kept_iterations(mod.report)) >= 2, _kept_iterations(mod.report)
    rtn = _rtn_weights(tiny / name, scheme, ids, dtype)
    moved = [n for n, p in model.named_parameters() if n in rtn and not torch.equal(p, rtn[n])]
    assert any(".experts." in n for n in moved) and any("self_attn" in n for n in moved)
    model.save_pretrained(str(tmp_path / "q"), save_compressed=True)
    reloaded = load_model(tmp_path / "q", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    # every layer was tuned on exactly the 16 calibration sequences (the tuner's own forwards through the next
    # layer must not be captured as that layer's inputs)
    assert [row["samples"] for row in mod.report] == [16, 16, 16]
    assert all(row["iters"] == 9 for row in mod.report)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("nvfp4-pack-quantized" if scheme.startswith("NVFP4") else "pack-quantized")
    assert {"model.layers.1.mlp.gate", "model.layers.2.mlp.gate"} <= set(qc["ignore"])
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert "model.layers.1.mlp.gate.weight" in state and "model.layers.1.mlp.gate.weight_packed" not in state
    if scheme.startswith("NVFP4"):
        for e in range(8):
            p = f"model.layers.1.mlp.experts.{e}."
            assert torch.equal(state[p + "gate_proj.weight_global_scale"], state[p + "up_proj.weight_global_scale"])
        p = "model.layers.0.self_attn."
        assert torch.equal(state[p + "q_proj.weight_global_scale"], state[p + "k_proj.weight_global_scale"])
        assert torch.equal(state[p + "q_proj.weight_global_scale"], state[p + "v_proj.weight_global_scale"])


def test_shared_expert_gate_stays_unquantized(tmp_path, tiny):
    ids = calibration_ids(rows=4, seq_len=32)
    mod = RouterAlignedRoundingModifier(objective="topk_mse", iters=2, batch_size=2, scheme="W4A16",
                                        targets="Linear", ignore=["lm_head"])
    _run(tiny / "qwen2_moe", mod, ids, out=tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.shared_expert_gate" in qc["ignore"]
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert state["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.shared_expert.up_proj.weight_packed" in state


@pytest.mark.parametrize("name", ["vsraq_w4a16", "vsraq_nvfp4", "expertquant_w4a16", "autoround_w4a16",
                                  "smooth_vsraq_nvfp4"])
def test_recipes_load_and_run(tmp_path, tiny, name):
    text = (RECIPES / f"{name}.yaml").read_text().replace("iters: 200", "iters: 2")
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    model, _ = _run(tiny / "qwen3_moe", str(recipe), calibration_ids(rows=2, seq_len=32))
    from llmcompressor.core import active_session

    mods = active_session().lifecycle.recipe.modifiers
    expected = (["ExpertAwareSmoothingModifier"] if name.startswith("smooth") else []) + ["RouterAlignedRoundingModifier"]
    assert [type(m).__name__ for m in mods] == expected
    assert mods[-1].iters == 2 and mods[-1].report
    assert model.model.layers[0].mlp.experts[0].gate_proj.quantization_scheme is not None


def test_recipe_typo_fails_with_pydantic_message(tmp_path, tiny):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    RouterAlignedRoundingModifier:\n"
                      "      objectiv: vsraq\n      scheme: W4A16\n")
    with pytest.raises(Exception, match=r"objectiv[\s\S]*Extra inputs are not permitted"):
        _run(tiny / "qwen3_moe", str(recipe), calibration_ids(rows=2, seq_len=16))
    with pytest.raises(Exception, match="unknown router objective 'vsrq'; known: none, expertquant, kl, topk_mse, vsraq"):
        RouterAlignedRoundingModifier(objective="vsrq", scheme="W4A16")
    with pytest.raises(Exception, match="router_scope"):
        RouterAlignedRoundingModifier(router_scope="previous", scheme="W4A16")


def test_starved_expert_gets_rtn_fallback_and_is_logged(tmp_path):
    """A correction bias of -100 keeps expert 7 out of every top-k: it gets no routed token."""
    model = save_tiny("glm4_moe", tmp_path / "ref", seed=5)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias[7] = -100.0
    model.save_pretrained(tmp_path / "ref")
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        mod = RouterAlignedRoundingModifier(objective="vsraq", iters=3, batch_size=2, rounding={"min_expert_tokens": 1},
                                            scheme="W4A16", targets="Linear", ignore=["lm_head"])
        _run(tmp_path / "ref", mod, calibration_ids(rows=4, seq_len=32))
    finally:
        logger.remove(sink)
    for row in mod.report[1:]:
        assert row["rtn_fallback"] == {f"mlp.experts.7.{p}": 0 for p in ("gate_proj", "up_proj", "down_proj")}
    assert mod.report[0]["rtn_fallback"] == {}  # the dense first layer has no experts
    logged = [line for line in lines if "routed calibration tokens use MSE-clipped RTN" in line]
    assert len(logged) == 2 and all("1 experts with fewer than 1" in l and "experts.7 (0 tokens)" in l for l in logged)


def test_mse_clip_fallback_is_no_worse_than_rtn():
    from compressed_tensors.quantization import preset_name_to_scheme

    from routealign.schemes import WeightQuantizer
    from routealign.modifiers.rounding.weights import TunedWeight

    lin = torch.nn.Linear(256, 32, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.weight[:, 5] = 0.5  # outliers make clipping worthwhile
    quant = WeightQuantizer(preset_name_to_scheme("W4A16", ["Linear"]).weights)
    tw = TunedWeight("x", lin, quant, None, expert=0)
    rtn, _ = tw.final()
    tw.mse_clip_fallback(tuple(1.0 - 0.05 * i for i in range(11)))
    clipped, _ = tw.final()
    err = lambda w: (w - lin.weight).pow(2).sum().item()  # noqa: E731
    assert err(clipped) < err(rtn) and not tw.trainable and (tw.clip_lo < 1).any()
    # an RTN-fallback weight is fake-quantized once, outside autograd, and reused by every tuning iteration
    frozen = tw.fake_weight()
    assert frozen.grad_fn is None and tw.fake_weight() is frozen
    assert torch.equal(frozen.to(lin.weight.dtype), clipped)


def test_router_objective_on_dense_model_is_an_error(tmp_path):
    from transformers import LlamaConfig

    from routealign.tiny import byte_tokenizer

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256,
                                                         num_hidden_layers=1, num_attention_heads=2))
    dense.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    mod = RouterAlignedRoundingModifier(objective="vsraq", iters=1, scheme="W4A16", targets="Linear",
                                        ignore=["lm_head"])
    with pytest.raises(NotMoEError, match="objective='vsraq'.*LlamaForCausalLM has no MoE layer"):
        _run(tmp_path / "dense", mod, calibration_ids(rows=2, seq_len=16))
    plain = RouterAlignedRoundingModifier(objective="none", iters=2, batch_size=2, scheme="W4A16",
                                          targets="Linear", ignore=["lm_head"])
    _run(tmp_path / "dense", plain, calibration_ids(rows=2, seq_len=16))
    assert plain.report[0]["iters"] == 2


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "NVFP4A16"])
def test_saved_integers_are_the_tuned_float32_decisions(scheme):
    """Offsets parked next to rounding boundaries (as signed gradient descent leaves them) must survive the write
    to a bf16 weight: compressed-tensors re-quantizes the written weight to exactly the tuned integers."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from routealign.schemes import WeightQuantizer
    from routealign.modifiers.rounding.weights import TunedWeight

    lin = torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    quant = WeightQuantizer(preset_name_to_scheme(scheme, ["Linear"]).weights)
    tw = TunedWeight("x", lin, quant, quant.global_scale(lin.weight), expert=None)
    with torch.no_grad():
        # place w/s + v within 1e-3 grid units of a rounding boundary for every weight
        qp = quant.rtn_qparams(tw.weight32, tw._gs32)
        eff = qp.scale if qp.global_scale is None else qp.scale / qp.global_scale.reshape(-1, 1)
        scaled = tw.weight32 / eff.repeat_interleave(quant.group_size(256), -1)
        target = torch.floor(scaled) + 0.5 + torch.where(torch.rand_like(scaled) < 0.5, -1e-3, 1e-3)
        tw.offset.copy_((target - scaled).clamp(-0.5, 0.5))
    written, qp = tw.final()
    assert written.dtype == torch.bfloat16
    # the integers the float32 tuning arithmetic rounds to (what the tuning loss saw), as compressed-tensors' int8
    # codes (NVFP4: its FP4 values, stored here as twice the value)
    tuned = tw.snapshot().codes.float() / (2 if scheme.startswith("NVFP4") else 1)
    saved = quantize(written, qp.scale, qp.zero_point, quant.args, global_scale=qp.global_scale)
    assert torch.equal(saved.float(), tuned)
    # int schemes: bf16 arithmetic (x / scale in bf16) would have decided otherwise for a good share of these
    # weights
    if not scheme.startswith("NVFP4"):
        bf16_path = quant.fake_quant(lin.weight.detach(), qp, tw.offset)
        assert (bf16_path != written).float().mean().item() > 0.01


def test_router_scope_reaches_the_documented_weights():
    """The block's own router depends only on attention weights; the next block's router on everything."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from routealign.tiny import tiny_model
    from routealign.streams import BlockInputs
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig

    from llmcompressor.modeling.moe.linearize import linearize_moe

    model = tiny_model("qwen3_moe", seed=2)
    linearize_moe(model)  # per-expert Linears, as oneshot does
    block, nxt = model.model.layers[0], model.model.layers[1]
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = calibration_ids(rows=2, seq_len=16)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(16).unsqueeze(0)
        q = BlockInputs(h, {"position_embeddings": model.model.rotary_emb(h, pos), "attention_mask": None})
    for scope in ("block", "next"):
        with suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets,
                               TuningConfig(objective="vsraq", iters=1, router_scope=scope, router_weight=1.0), nxt)
            reference = tuner.reference(q)
            with torch.enable_grad():
                _, router = tuner.step_losses(q, reference, torch.arange(2), use_router=True)
                router.backward()
        reached = {w.name for w in tuner.weights if w.offset.grad is not None and w.offset.grad.abs().sum() > 0}
        attention = {w.name for w in tuner.weights if w.name.startswith("self_attn.")}
        if scope == "block":
            assert reached == attention  # q/k/v/o feed the router through the residual stream; no expert does
        else:
            assert any(n.startswith("mlp.experts.") for n in reached) and attention <= reached, sorted(reached)


def test_activation_scale_tokens_routed_versus_all(tmp_path, tiny):
    """NVFP4 expert activation global scales: from all tokens (default) the expert input maxima are those of the
    whole block input, so every expert's gate/up scale is the same and no larger than from routed tokens."""
    ids = calibration_ids(rows=2, seq_len=32)
    scales = {}
    for tokens in ("routed", "all"):
        mod = RouterAlignedRoundingModifier(objective="none", iters=0, scheme="NVFP4", targets="Linear",
                                            ignore=["lm_head"], rounding={"activation_scale_tokens": tokens})
        model, _ = _run(tiny / "qwen3_moe", mod, ids)
        experts = model.model.layers[1].mlp.experts
        scales[tokens] = torch.stack([experts[e].gate_proj.input_global_scale.float() for e in range(8)]).flatten()
    assert torch.all(scales["all"] <= scales["routed"] * (1 + 1e-6))  # (equal up to float rounding where the
    # expert saw the largest token)
    assert torch.unique(scales["all"]).numel() == 1 and torch.unique(scales["routed"]).numel() > 1


def test_nvfp4_tuning_sees_activation_quantization():
    """With NVFP4 the tuning forward quantizes each target's inputs (W4A4), so the loss it starts from is the
    deployed model's error, larger than the weight-only one."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from llmcompressor.modeling.moe.linearize import linearize_moe

    from routealign.tiny import tiny_model
    from routealign.streams import BlockInputs
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig

    model = tiny_model("qwen3_moe", seed=2)
    linearize_moe(model)
    block, nxt = model.model.layers[0], model.model.layers[1]
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    targets = {n: scheme.weights for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    activations = {n: scheme.input_activations for n in targets}
    ids = calibration_ids(rows=4, seq_len=16)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        q = BlockInputs(h, {"position_embeddings": model.model.rotary_emb(h, torch.arange(16)[None]),
                            "attention_mask": None})
    first = {}
    for simulate, batched in ((False, True), (True, True), (True, False)):
        with suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets,
                               TuningConfig(objective="none", iters=1, batch_size=4, rounding={"quantize_activations": simulate},
                                            memory={"batched_experts": batched}), nxt, activations=activations)
            result = tuner.tune(q, q)
        first[simulate, batched] = result.history[0]
        assert not any(m._forward_pre_hooks for m in block.modules())  # hooks are only on during the loop
    assert first[True, True] > 1.5 * first[False, True]
    # the batched experts apply the experts' input quantization themselves, as the loop's hooks do
    assert first[True, True] == pytest.approx(first[True, False], rel=1e-5)


@pytest.mark.parametrize("scheme", ["W4A16", "W3A16"])
def test_full_range_checkpoint_reloads_exactly_and_passes_check(tmp_path, tiny, scheme):
    """full_range writes signed scales (AutoRound's grid, as llm-compressor's AutoRoundModifier saves them): the
    checkpoint reloads to the in-memory model bit for bit, and a W4A16 one passes routealign check."""
    from routealign.checkpoint import save_compressed
    from routealign.preflight import check_checkpoint

    ids = calibration_ids(rows=16, seq_len=32, seed=2)
    mod = RouterAlignedRoundingModifier(objective="none", iters=9, batch_size=4, lr=0.02, holdout={"every": 3},
                                        rounding={"full_range": True}, scheme=scheme, targets="Linear", ignore=["lm_head"])
    model, logits = _run(tiny / "glm4_moe", mod, ids)
    assert all(it > 0 for it in _kept_iterations(mod.report)[1:]), _kept_iterations(mod.report)  # learned codes
    save_compressed(model, tmp_path / "q")
    reloaded = load_model(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    state = load_file(tmp_path / "q" / "model.safetensors")
    scales = torch.cat([v.float().reshape(-1) for k, v in state.items() if k.endswith("weight_scale")])
    assert bool((scales < 0).any()) and bool((scales > 0).any())
    if scheme == "W4A16":
        report = check_checkpoint(tmp_path / "q")
        assert report.ok, report.table()


def test_tuned_w8a16_on_a_bf16_model_is_refused_before_calibrating(tmp_path, tiny):
    """Issue 44, item 5: iters 0 writes QuantizationModifier's checkpoint exactly (above); tuned 8-bit integers
    cannot all be packed from bf16 weights, so the run is refused with the module, dtype and field named."""
    from routealign.errors import InputError

    ids = calibration_ids(rows=4, seq_len=32)
    mod = RouterAlignedRoundingModifier(objective="none", iters=2, scheme="W8A16", targets="Linear", ignore=["lm_head"])
    with pytest.raises(InputError, match=r"torch.bfloat16 with 8-bit integer weights \(scheme W8A16\).*iters: 0"):
        _run(tiny / "qwen3_moe-bf16", mod, ids, dtype=torch.bfloat16)


def test_finalize_refuses_a_run_that_left_a_layer_with_targets_untuned(tiny):
    """As GPTQModifier's on_finalize does: a decoder layer whose sequential epoch never ended would be saved with
    uninitialised scales. A full run finalizes; the same modifier with one layer's tuning missing is refused."""
    ids = calibration_ids(rows=2, seq_len=16)
    mod = RouterAlignedRoundingModifier(objective="none", iters=0, scheme="W4A16", targets="Linear",
                                        ignore=["lm_head"])
    _run(tiny / "qwen3_moe", mod, ids)
    assert mod.on_finalize(None) is True and len(mod.report) == 2
    mod._report = [row for row in mod._report if row["layer"] != "model.layers.1"]
    with pytest.raises(ValueError, match=r"1 decoder layers with targets were never tuned \(model.layers.1\)"):
        mod.on_finalize(None)
