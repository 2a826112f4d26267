"""Issue 5.2: llm-compressor's sequential onloading keeps working when the model does not fit the execution device:
decoder layers offloaded to disk (compressed-tensors' DiskCache) give the same quantized model as in memory."""

import pytest
import torch
from compressed_tensors.offload.dispatch import dispatch_with_map
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

from routealign import ExpertAwareSmoothingModifier, RouterAlignedRoundingModifier
from routealign.tiny import save_tiny

from .conftest import calibration_ids


@pytest.mark.parametrize("scheme,smooth", [("W4A16", False), ("NVFP4", True)])
def test_disk_offloaded_model_quantizes_like_the_in_memory_one(tmp_path, scheme, smooth):
    save_tiny("qwen3_moe", tmp_path / "ref", seed=3)
    ids = calibration_ids(rows=4, seq_len=32)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    states = {}
    for disk in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref"), dtype=torch.float32)
        if disk:
            (tmp_path / "offload").mkdir()
            dispatch_with_map(model, {n: ("cpu", "disk") for n, m in model.named_modules()
                                      if n.startswith("model.layers.") and len(m._parameters)},
                              offload_dir=str(tmp_path / "offload"), show_progress=False)
        recipe = [RouterAlignedRoundingModifier(objective="vsraq", iters=3, batch_size=2, scheme=scheme,
                                                targets="Linear", ignore=["lm_head"])]
        if smooth:
            recipe.insert(0, ExpertAwareSmoothingModifier())
        oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=4, max_seq_length=32)
        if disk:  # the layers stayed on disk through calibration and writing
            kinds = {type(m._parameters).__name__ for n, m in model.named_modules() if n.startswith("model.layers.")}
            assert "DiskCache" in kinds
        states[disk] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert states[False].keys() == states[True].keys()
    assert any(k.endswith("weight_scale") for k in states[True])
    for key in states[False]:
        assert torch.equal(states[False][key], states[True][key]), key
