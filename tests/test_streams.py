"""The causal stream engine runs every decoder layer as the model's own forward does (masks, attention, sinks),
and RouterAlignedRoundingModifier's unquantized stream is that of the model, layer by layer, for every family."""

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot

import routealign  # noqa: F401
from routealign import RouterAlignedRoundingModifier
from routealign.streams import StreamEngine, attention_implementation, run_block
from routealign.tiny import TINY_FAMILIES, save_tiny, tiny_model
from routealign.modifiers.rounding import BlockTuner

from .conftest import calibration_ids

# GPT-OSS with a sliding-window layer whose window is shorter than the sequence: the mask matters
OVERRIDES = {"gpt_oss": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16)}


def _layers(model):
    from llmcompressor.utils.pytorch import infer_sequential_targets

    classes = set(infer_sequential_targets(model, sequential_targets=None))
    return [n for n, m in model.named_modules() if type(m).__name__ in classes]


def _final_norm(model):
    base = model.model
    return next(getattr(base, a) for a in ("norm", "norm_f") if hasattr(base, a))


def _reference_streams(model, ids):
    """The model's own per-layer outputs (float32); the last one is the final norm's output in transformers."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[1:]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_engine_stream_equals_the_models_hidden_states(family):
    model = tiny_model(family, seed=3, **OVERRIDES.get(family, {}))
    ids = calibration_ids(rows=2, seq_len=40)
    names = _layers(model)
    reference = _reference_streams(model, ids)
    assert len(reference) == len(names)
    engine = StreamEngine(model, names)
    h, kwargs = engine.capture(ids)
    for i, name in enumerate(names):
        block = model.get_submodule(name)
        params = dict(list(block.named_parameters()) + list(block.named_buffers()))
        with torch.no_grad():
            h, _ = run_block(block, params, h, kwargs[name])
        ours = _final_norm(model)(h) if i == len(names) - 1 else h
        torch.testing.assert_close(ours, reference[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"{family} {name}: {m}")


def test_gpt_oss_runs_eager_with_its_sinks_and_refuses_a_missing_mask():
    model = tiny_model("gpt_oss", seed=3, **OVERRIDES["gpt_oss"])
    block = model.model.layers[0]
    assert attention_implementation(block) == "eager"
    assert attention_implementation(tiny_model("qwen3_moe").model.layers[0]) == "sdpa"
    ids = calibration_ids(rows=1, seq_len=24)
    engine = StreamEngine(model, _layers(model))
    h, kwargs = engine.capture(ids)
    params = dict(block.named_parameters())
    with pytest.raises(ValueError, match="bidirectionally"):
        run_block(block, params, h, {**kwargs["model.layers.0"], "attention_mask": None})
    # the sinks are part of the function: zeroing them changes the layer's output
    with torch.no_grad():
        y, _ = run_block(block, params, h, kwargs["model.layers.0"])
        no_sinks = {**params, "self_attn.sinks": torch.full_like(params["self_attn.sinks"], -1e4)}
        y0, _ = run_block(block, no_sinks, h, kwargs["model.layers.0"])
    assert (y - y0).abs().max() > 1e-3


def test_engine_kwargs_are_cached_per_shape():
    model = tiny_model("qwen3_moe", seed=1)
    engine = StreamEngine(model, _layers(model))
    a = engine.layer_kwargs(32)
    assert engine.layer_kwargs(32) is a
    assert engine.layer_kwargs(16) is not a
    assert a["model.layers.0"]["position_embeddings"][0].shape[-2] == 32


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_modifier_unquantized_stream_equals_the_model_after_every_layer(family, monkeypatch, tmp_path):
    """Inside oneshot (where llm-compressor propagates bidirectional activations) the modifier's unquantized stream
    is the causal model's, layer by layer."""
    from transformers import AutoModelForCausalLM

    save_tiny(family, tmp_path / family, seed=5, **OVERRIDES.get(family, {}))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / family), dtype=torch.float32)
    ids = calibration_ids(rows=3, seq_len=40)
    reference = _reference_streams(model, ids)
    names = _layers(model)
    norm = _final_norm(model)
    seen = {}
    original = BlockTuner.tune

    def record(self, q, fp, *args):
        out = original(self, q, fp, *args)
        seen.setdefault("input", fp.hidden.detach().clone())
        seen[self.name] = out.outputs.detach().clone()
        return out

    monkeypatch.setattr(BlockTuner, "tune", record)
    recipe = RouterAlignedRoundingModifier(objective="none", iters=0, scheme="W4A16", targets="Linear",
                                           ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=3, max_seq_length=40)
    # llm-compressor's dataloader may reorder the calibration rows: match them by the first layer's input
    embeddings = model.get_input_embeddings()(ids)
    order = torch.cdist(seen.pop("input").flatten(1), embeddings.flatten(1)).argmin(1)
    assert sorted(order.tolist()) == list(range(ids.shape[0]))
    assert list(seen) == names
    for i, name in enumerate(names):
        ours = seen[name][order.argsort()]
        if i == len(names) - 1:
            with torch.no_grad():
                ours = norm(ours)
        torch.testing.assert_close(ours, reference[i], rtol=1e-5, atol=1e-5, msg=lambda m: f"{family} {name}: {m}")
