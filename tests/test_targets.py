"""RouterAlignedRoundingModifier touches exactly what it targets: targets outside the decoder layers (the LM head)
get RTN instead of a scale never computed, another modifier's modules are left to it, and targets that match
nothing are an error before calibration."""

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401
from routealign import RouterAlignedRoundingModifier
from routealign.checkpoint import load_model, save_compressed
from routealign.errors import InputError
from routealign.preflight import check_checkpoint
from routealign.tiny import save_tiny

from .conftest import calibration_ids

ROUTERS = ["re:.*mlp.gate$"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    save_tiny("qwen3_moe", root / "m", seed=7)  # tied embeddings
    return root / "m"


def _run(model_dir, recipe, ids):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    return model


@pytest.mark.parametrize("scheme", ["W4A16", "NVFP4"])
def test_lm_head_without_ignore_gets_rtn_not_garbage(tmp_path, model_dir, scheme):
    ids = calibration_ids(rows=4, seq_len=32)
    embeddings = AutoModelForCausalLM.from_pretrained(str(model_dir)).get_input_embeddings().weight.detach().clone()
    ours = _run(model_dir, RouterAlignedRoundingModifier(objective="none", iters=0, scheme=scheme, targets="Linear",
                                                          rounding={"full_range": False}, ignore=[]), ids)
    assert torch.equal(ours.get_input_embeddings().weight, embeddings)  # untied, not quantized with the head
    save_compressed(ours, tmp_path / "ours")
    rtn = _run(model_dir, QuantizationModifier(scheme=scheme, targets="Linear", ignore=ROUTERS), ids)
    save_compressed(rtn, tmp_path / "rtn")
    a, b = load_file(str(tmp_path / "ours" / "model.safetensors")), load_file(str(tmp_path / "rtn" / "model.safetensors"))
    head = sorted(k for k in a if k.startswith("lm_head."))
    assert "lm_head.weight_scale" in head
    for key in head:
        assert torch.isfinite(a[key].float()).all(), key
        # activations: ours from the causal stream, RTN's from the pipeline's; packed FP4 codes may differ in the
        # sign of zero, so the weights are compared by value below
        if key not in ("lm_head.input_global_scale", "lm_head.weight_packed"):
            assert torch.equal(a[key], b[key]), key
    report = check_checkpoint(tmp_path / "ours")
    assert report.ok, report.table()
    ours_loaded, rtn_loaded = load_model(tmp_path / "ours", torch.float32), load_model(tmp_path / "rtn", torch.float32)
    assert torch.equal(ours_loaded.lm_head.weight, rtn_loaded.lm_head.weight)
    with torch.no_grad():
        logits = ours_loaded(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_another_modifiers_targets_are_left_to_it(tmp_path, model_dir):
    """GPTQ on attention, ours on the experts: the attention weights are GPTQ's alone."""
    ids = calibration_ids(rows=4, seq_len=32)
    attention = "re:.*self_attn.(q|k|v|o)_proj$"
    both = _run(model_dir, [GPTQModifier(targets=attention, scheme="W4A16"),
                            RouterAlignedRoundingModifier(objective="vsraq", iters=3, batch_size=2, scheme="W4A16",
                                                          targets="re:.*experts.*proj$", rounding={"min_expert_tokens": 0})], ids)
    alone = _run(model_dir, GPTQModifier(targets=attention, scheme="W4A16"), ids)
    for name, module in alone.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            other = both.get_submodule(name)
            assert torch.equal(module.weight, other.weight), name
            assert torch.equal(module.weight_scale, other.weight_scale), name
    # the experts were quantized by ours (weights on the int4 grid differ from the unquantized ones)
    original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert not torch.equal(both.model.layers[0].mlp.experts[0].down_proj.weight,
                           original.model.layers[0].mlp.experts.down_proj[0])


def test_targets_that_match_nothing_are_an_error_before_calibration(model_dir):
    ids = calibration_ids(rows=2, seq_len=16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = []
    model.get_input_embeddings().register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(InputError, match="match no quantizable module"):
        oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}),
                recipe=RouterAlignedRoundingModifier(objective="none", scheme="W4A16", targets="re:.*nonexistent$"),
                num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    assert forwards == []  # refused before any calibration forward
    after = model.state_dict()  # (oneshot linearizes the experts before any modifier starts: their keys change)
    kept = [k for k in before if k in after]
    assert len(kept) > 10 and all(torch.equal(before[k], after[k]) for k in kept)
