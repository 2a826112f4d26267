"""Issue 6.1: bad settings fail before the first calibration forward, with a message naming the problem."""

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot

import routealign  # noqa: F401
from routealign import RouterAlignedRoundingModifier
from routealign.errors import InputError, UnsupportedRouterError
from routealign.routing import find_moe_layers
from routealign.tiny import save_tiny, tiny_model
from transformers import AutoModelForCausalLM
from routealign.validation import check_calibration

from .conftest import calibration_ids


def _dataset(ids):
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


class _ForwardCounter:
    """Counts forward calls of the embedding: proves an error came before any calibration forward."""

    def __init__(self, model):
        self.calls = 0
        model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def _modifier(**kw):
    base = dict(objective="vsraq", iters=1, batch_size=2, scheme="W4A16", targets="Linear", ignore=["lm_head"])
    return RouterAlignedRoundingModifier(**{**base, **kw})


def _oneshot(model, modifier, ids):
    oneshot(model=model, dataset=_dataset(ids), recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])


def _model(folder, model_type="qwen3_moe", **overrides):
    save_tiny(model_type, folder, seed=0, **overrides)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def test_group_size_that_does_not_divide_names_every_offending_module(tmp_path):
    model = _model(tmp_path, moe_intermediate_size=96)  # down_proj in_features 96, group 128
    counter = _ForwardCounter(model)
    with pytest.raises(InputError) as err:
        _oneshot(model, _modifier(), calibration_ids(rows=2, seq_len=16))
    message = str(err.value)
    assert "RouterAlignedRoundingModifier" in message and "16 targeted module(s)" in message  # 2 layers x 8 experts
    assert "model.layers.0.mlp.experts.0.down_proj (weights: in_features 96, group_size 128)" in message
    assert "gate_proj" not in message and counter.calls == 0


def test_token_ids_outside_the_vocabulary_fail_before_calibration(tmp_path):
    model = _model(tmp_path)
    counter = _ForwardCounter(model)
    ids = calibration_ids(rows=2, seq_len=16)
    ids[1, 5] = 400  # vocabulary is 320
    with pytest.raises(InputError, match=r"dataset row 1 has token id 400 outside the model's vocabulary \[0, 320\)"):
        _oneshot(model, _modifier(), ids)
    assert counter.calls == 0


def test_boundary_wider_than_the_experts_outside_top_k_names_the_field(tmp_path):
    model = _model(tmp_path)  # 8 experts, top-2: 6 margins exist
    with pytest.raises(InputError, match=r"boundary=7: model.layers.0.mlp.gate has 8 experts and top_k 2, so at most 6"):
        _oneshot(model, _modifier(loss={"vsraq": {"boundary": 7}}), calibration_ids(rows=2, seq_len=16))


def test_out_of_range_recipe_fields_fail_with_pydantic_message():
    with pytest.raises(Exception, match=r"iters[\s\S]*greater than or equal to 0"):
        _modifier(iters=-1)
    with pytest.raises(Exception, match=r"alpha[\s\S]*less than or equal to 1"):
        _modifier(loss={"vsraq": {"alpha": 1.5}})
    with pytest.raises(Exception, match=r"lr[\s\S]*greater than 0"):
        _modifier(lr=0)


def test_calibration_set_rules():
    ok = check_calibration([{"input_ids": torch.ones(2, 8, dtype=torch.long)}] * 3, vocab_size=10)
    assert (ok.samples, ok.seq_len, ok.batches) == (6, 8, 3)
    with pytest.raises(InputError, match="the calibration set is empty"):
        check_calibration([], vocab_size=10)
    with pytest.raises(InputError, match="no calibration data was given"):
        check_calibration(None, vocab_size=10)
    with pytest.raises(InputError, match=r"batch 0 \(in calibration order\) has a sequence of 1 real token"):
        check_calibration([{"input_ids": torch.ones(1, 1, dtype=torch.long)}], vocab_size=10)
    # variable lengths and padding are calibrated on (real tokens only); a hole in a mask is refused
    mixed = check_calibration([{"input_ids": torch.ones(1, 8, dtype=torch.long)},
                               {"input_ids": torch.ones(2, 6, dtype=torch.long),
                                "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]])}],
                              vocab_size=10)
    assert (mixed.samples, mixed.seq_len, mixed.padded, mixed.variable) == (3, 8, True, True)
    with pytest.raises(InputError, match=r"batch 0 \(in calibration order\) row 0 has padding between real tokens"):
        check_calibration([{"input_ids": torch.ones(1, 4, dtype=torch.long),
                            "attention_mask": torch.tensor([[1, 0, 1, 1]])}], vocab_size=10)
    with pytest.raises(InputError, match=r"batch 0 \(in calibration order\) has a sequence of 1 real token"):
        check_calibration([{"input_ids": torch.ones(1, 4, dtype=torch.long),
                            "attention_mask": torch.tensor([[0, 0, 0, 1]])}], vocab_size=10)
    # token ids under padding are not checked (pad ids may lie outside the vocabulary)
    check_calibration([{"input_ids": torch.tensor([[1, 2, -1]]), "attention_mask": torch.tensor([[1, 1, 0]])}],
                      vocab_size=10)
    with pytest.raises(InputError, match=r"batch 0 \(in calibration order\) has token id -1 outside"):
        check_calibration([{"input_ids": torch.tensor([[1, -1, 2]])}], vocab_size=10)
    with pytest.raises(InputError, match="batch 0 has no 'input_ids'"):
        check_calibration([{"text": ["hello"]}], vocab_size=10)


def test_expert_weights_without_a_router_are_an_error():
    model = tiny_model("qwen3_moe", seed=0)
    del model.model.layers[1].mlp.gate
    with pytest.raises(UnsupportedRouterError, match=r"model.layers.1.mlp holds experts but no router"):
        find_moe_layers(model)
