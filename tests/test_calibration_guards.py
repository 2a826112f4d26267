"""Issue 6.2: NaN/Inf stops the run naming the layer and what state the model is left in; a router objective that
cannot reach any weight is reported."""

import dataclasses

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from loguru import logger
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401
from routealign import RouterAlignedRoundingModifier
from routealign.errors import NonFiniteError
from routealign.tiny import save_tiny
from routealign.runner import BlockRunner

from .conftest import calibration_ids


def _run(model, modifier, ids):
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])


def _modifier(**kw):
    base = dict(objective="vsraq", iters=4, batch_size=2, scheme="W4A16", targets="Linear", ignore=["lm_head"])
    return RouterAlignedRoundingModifier(**{**base, **kw})


@pytest.fixture
def qwen(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    return AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)


def test_nan_activation_stops_at_the_first_layer(qwen):
    ids = calibration_ids(rows=2, seq_len=16)
    with torch.no_grad():
        qwen.get_input_embeddings().weight[int(ids[0, 3])] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model.layers.0: calibration activations entering the layer "
                                             r"\(quantized stream\) contains 128 NaN and 0 Inf values"):
        _run(qwen, _modifier(), ids)


def test_nan_loss_stops_with_layer_iteration_and_last_good_state(qwen, monkeypatch):
    before = {n: p.detach().clone() for n, p in qwen.model.layers[1].named_parameters()}
    normed = BlockRunner.normed
    calls = {"n": 0}

    def poisoned(self, y):
        if self.name == "model.layers.1":
            calls["n"] += 1
            if calls["n"] > 2 * 2 + 1:  # targets() and expert counts do not call it; iterations 0..2 are finite
                return y * float("nan")
        return normed(self, y)

    monkeypatch.setattr(BlockRunner, "normed", poisoned)
    with pytest.raises(NonFiniteError) as err:
        _run(qwen, _modifier(), calibration_ids(rows=2, seq_len=16))
    message = str(err.value)
    assert message.startswith("model.layers.1: tuning loss is nan at iteration 2 (last finite loss ")
    assert "last finite loss" in message and "layers before model.layers.1 are quantized" in message
    # layer 1's weights are left as they were (attention and norms keep their names through linearization)
    layer1 = dict(qwen.model.layers[1].named_parameters())
    kept = [name for name in before if name in layer1]
    assert "self_attn.q_proj.weight" in kept
    for name in kept:
        assert torch.equal(layer1[name], before[name]), name


def test_unreachable_router_objective_is_reported(tmp_path):
    """Nemotron-H MoE blocks hold only the MoE: the block's own router precedes every tuned weight."""
    save_tiny("nemotron_h", tmp_path / "m", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        mod = _modifier(router_scope="block", iters=2)
        _run(model, mod, calibration_ids(rows=2, seq_len=16))
    finally:
        logger.remove(sink)
    by_layer = {row["layer"]: row["router_unreachable"] for row in mod.report}
    assert by_layer == {"model.layers.0": [], "model.layers.1": ["model.layers.1.mixer.gate"],
                        "model.layers.2": [], "model.layers.3": ["model.layers.3.mixer.gate"]}
    warned = [l for l in lines if "router_scope 'block' cannot reach any tuned weight" in l]
    assert len(warned) == 2 and "model.layers.1" in warned[0]



def test_input_global_scale_refuses_what_compressed_tensors_would_hide():
    """compressed-tensors' generate_gparam turns a NaN input maximum into the scale 1.0 and an infinite one into 0.0
    (both finite); routealign's helper refuses a non-finite input maximum instead, naming the module, and otherwise
    writes exactly generate_gparam's value."""
    from compressed_tensors.quantization.utils import generate_gparam

    from routealign.schemes import input_global_scale

    for bad, hidden, counts in ((float("inf"), 0.0, "0 NaN and 1 Inf"), (float("nan"), 1.0, "1 NaN and 0 Inf")):
        # what would be written without the guard: a finite scale that check_finite cannot catch
        assert float(generate_gparam(-torch.tensor([bad]), torch.tensor([bad]))) == hidden
        with pytest.raises(NonFiniteError, match=rf"^lm_head: largest input \(for the input global scale\) "
                                                 rf"contains {counts} values"):
            input_global_scale(bad, "lm_head")
    value = torch.tensor([3.5])
    assert torch.equal(input_global_scale(value, "x"), generate_gparam(-value, value))
    assert input_global_scale(0.0, "x").tolist() == [1.0]


def test_non_finite_expert_input_maximum_stops_the_run_naming_the_module(qwen, monkeypatch):
    """Through the modifier: an expert whose largest NVFP4 input is infinite stops the run before any scale is
    written, naming the module (the maxima are poisoned where the runner measures them)."""
    measured = BlockRunner.routed_input_amax

    def poisoned(self, q, names, *args, **kwargs):
        amax = measured(self, q, names, *args, **kwargs)
        if self.name == "model.layers.1":
            amax["mlp.experts.2.up_proj"] = torch.tensor(float("inf"))
        return amax

    monkeypatch.setattr(BlockRunner, "routed_input_amax", poisoned)
    with pytest.raises(NonFiniteError, match=r"^model\.layers\.1\.mlp\.experts\.2\.up_proj: largest input \(for "
                                             r"the input global scale\) contains 0 NaN and 1 Inf values"):
        _run(qwen, _modifier(objective="none", scheme="NVFP4", iters=1), calibration_ids(rows=2, seq_len=16))


def _poison_writes(monkeypatch, module, prefix: str, nth: int, what: str) -> dict:
    """Make the ``nth`` call of ``module.quantized_writes`` for a weight named under ``prefix`` return a NaN in
    ``what`` (``weight`` or ``scale``) from ``TunedWeight.final``; returns the call counter."""
    real = module.quantized_writes
    calls = {"n": 0}

    def poisoned(w, where, store=False):
        if where.startswith(prefix):
            calls["n"] += 1
            if calls["n"] == nth:
                final = w.final

                def bad():
                    weight, qp = final()
                    if what == "weight":
                        weight = weight.clone()
                        weight.view(-1)[0] = float("nan")
                    else:
                        scale = qp.scale.clone()
                        scale.view(-1)[-1] = float("nan")
                        qp = dataclasses.replace(qp, scale=scale)
                    return weight, qp

                w.final = bad
        return real(w, where, store)

    monkeypatch.setattr(module, "quantized_writes", poisoned)
    return calls


@pytest.mark.parametrize("chunk,nth,what", [(0, 1, "scale"), (2, 2, "weight")])
def test_non_finite_written_weight_stops_the_run_and_leaves_the_layer_as_it_was(qwen, monkeypatch, chunk, nth, what):
    """A NaN in what would be written (a tuned weight's scale, or in the second chunk of experts its weight) raises
    NonFiniteError naming the weight; the layers before it are quantized, it and the later layers are unchanged
    (with chunks: the first chunk's experts included; the writes are applied once every chunk is finite)."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from routealign.modifiers.rounding import tune

    linearize_moe(qwen)  # per-expert weights under the names they keep through oneshot
    before = {n: p.detach().clone() for n, p in qwen.named_parameters()}
    calls = _poison_writes(monkeypatch, tune, "model.layers.1.mlp.experts", nth, what)
    with pytest.raises(NonFiniteError, match=rf"^model\.layers\.1\.mlp\.experts\.\w+: quantized "
                                             rf"{'weight_scale' if what == 'scale' else 'weight'} contains 1 NaN and "
                                             r"0 Inf values$"):
        _run(qwen, _modifier(iters=2, memory={"expert_chunk": chunk}, rounding={"min_expert_tokens": 0}), calibration_ids(rows=2, seq_len=16))
    assert calls["n"] == nth
    after = dict(qwen.named_parameters())
    layer0 = [n for n in after if n.startswith("model.layers.0.") and n.endswith("proj.weight")]
    assert layer0 and all(n in before for n in layer0)
    assert all(not torch.equal(after[n], before[n]) for n in layer0), "layer 0 was not quantized"
    later = [n for n in after if n in before and not n.startswith("model.layers.0.")]
    assert any(".mlp.experts." in n for n in later) and any(n.startswith("model.layers.1.") for n in later)
    changed = [n for n in later if not torch.equal(after[n], before[n])]
    assert changed == []


def test_non_finite_lm_head_weight_stops_the_run_naming_it(qwen, monkeypatch):
    """The LM head (quantized outside the decoder layers) is checked like the tuned weights."""
    from routealign.modifiers.rounding import base

    _poison_writes(monkeypatch, base, "lm_head", 1, "scale")
    with pytest.raises(NonFiniteError, match=r"^lm_head: quantized weight_scale contains 1 NaN and 0 Inf values$"):
        _run(qwen, _modifier(iters=1, ignore=[]), calibration_ids(rows=2, seq_len=16))


def test_non_finite_layer_output_stops_the_run_naming_the_layer(qwen):
    """An unquantized layer whose output overflows stops the run at that layer, before it is tuned."""
    with torch.no_grad():
        qwen.model.layers[1].mlp.experts.down_proj.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"^model\.layers\.1: the unquantized layer's output contains \d+ NaN "
                                             r"and \d+ Inf values"):
        _run(qwen, _modifier(iters=1), calibration_ids(rows=2, seq_len=16))
