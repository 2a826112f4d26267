"""Issue 21: a full llm-compressor ``oneshot`` under torchrun (gloo, 2 CPU processes, 1 thread each) writes the
same checkpoint as one process (1 thread) on the same calibration set, for the recipes users run: the default W4A16
recipe, NVFP4 with smoothing first, and GPTQ on attention with ours on the experts. Both runs go through
``routealign quantize`` (the 2-process one started by torchrun) or ``examples/quantize_ddp.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from routealign.recipes import path as recipe_path
from routealign.tiny import save_tiny

RECIPE_DIR = recipe_path("vsraq_w4a16").parent

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, SEQ_LEN = 16, 32
ITERS = 4


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _quantize(nproc: int, model: Path, recipe: Path, text: str, out: Path, example: bool = False) -> None:
    """One run: ``routealign quantize`` (or the example), in one process or under torchrun with ``nproc`` ranks."""
    common = ["--recipe", str(recipe), "--data", text, "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
              "--dtype", "float32", "--out", str(out)]
    if example:
        program = [str(ROOT / "examples" / "quantize_ddp.py"), "--model", str(model), *common, "--threads", "1"]
    else:
        program = ["-m", "routealign_cli", "quantize", str(model), *common]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        command = launcher + (program if example else ["-m", "routealign_cli", *program[2:]])
    else:
        command = [sys.executable, *program]
    run = subprocess.run(command, env=_env(), cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert "PASS" in run.stdout and "FAIL" not in run.stdout, run.stdout[-3000:]  # routealign check on rank 0


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _recipe(tmp_path: Path, shipped: str | None, name: str, text: str | None = None) -> Path:
    """A shipped recipe (or ``text``) with every RouterAlignedRoundingModifier's ``iters`` cut to :data:`ITERS`."""
    recipe = yaml.safe_load((RECIPE_DIR / shipped).read_text() if shipped else text)
    for stage in recipe.values():
        for modifiers in stage.values():
            if "RouterAlignedRoundingModifier" in modifiers:
                modifiers["RouterAlignedRoundingModifier"]["iters"] = ITERS
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


MIXED = """quant_stage:
  quant_modifiers:
    GPTQModifier:
      scheme: W4A16
      targets: ["re:.*self_attn\\\\.(q|k|v|o)_proj$"]
    RouterAlignedRoundingModifier:
      objective: vsraq
      router_scope: next
      router_weight: 0.1
      scheme: W4A16
      targets: ["re:.*mlp\\\\.experts.*"]
      ignore: [lm_head]
"""

CASES = {
    # recipe (shipped file or text), model family, what the checkpoint's format must be, launched through
    "w4a16_default": ("vsraq_w4a16.yaml", None, "qwen3_moe", "pack-quantized", False),
    "nvfp4_smoothing_first": ("smooth_vsraq_nvfp4.yaml", None, "glm4_moe", "nvfp4-pack-quantized", False),
    "gptq_attention_ours_experts": (None, MIXED, "qwen3_moe", "pack-quantized", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_write_the_single_process_checkpoint(case, tmp_path, sample_text):
    shipped, text, family, fmt, example = CASES[case]
    model = tmp_path / "model"
    save_tiny(family, model, seed=5)
    recipe = _recipe(tmp_path, shipped, case, text)
    _quantize(1, model, recipe, sample_text, tmp_path / "one", example)
    _quantize(2, model, recipe, sample_text, tmp_path / "two", example)

    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    config = json.loads((tmp_path / "two" / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    assert config == json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]
    packed = [k for k in one if k.endswith("weight_packed")]
    assert packed, "no packed weights: nothing was quantized"
    if case == "nvfp4_smoothing_first":
        assert any(k.endswith("input_global_scale") for k in one)  # the activation scales the ranks must agree on
    # byte-identical: every rank's share of every loss, gradient, held-out error, count and maximum sums to what
    # one process computes, and these few iterations do not amplify the summation order's last bits
    different = [k for k in one if not torch.equal(one[k], two[k])]
    assert not different, f"{len(different)} of {len(one)} tensors differ, e.g. {different[:5]}"
    # the checkpoints compared are quantized models: every packed weight decompresses to values near the input
    # model's and not equal to them
    from routealign.checkpoint import load_model

    from llmcompressor.modeling.moe.linearize import linearize_moe

    unquantized = load_model(model, dtype=torch.float32)
    linearize_moe(unquantized)  # per-expert 2-D weights under the checkpoint's names
    source = dict(unquantized.named_parameters())
    quantized = load_model(tmp_path / "two", dtype=torch.float32)
    reloaded = dict(quantized.named_parameters())
    names = [k.replace("weight_packed", "weight") for k in packed]
    assert names and all(n in source and n in reloaded for n in names)
    for n in names:
        error = (reloaded[n] - source[n]).norm() / source[n].norm()
        assert 0 < float(error), n
        # smoothing folds its scales into the weights, so a weight alone need not stay near the input's: the
        # model's function must
        if case != "nvfp4_smoothing_first":
            assert float(error) < 0.5, (n, float(error))
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = unquantized(input_ids=ids).logits, quantized(input_ids=ids).logits
    error = float((got - want).norm() / want.norm())
    assert 0 < error < 0.5, error


def _disk_offloaded_rank(rank: int, init: str, folder: str) -> None:
    import torch.distributed as dist
    from compressed_tensors.offload.dispatch import dispatch_with_map
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from routealign import ExpertAwareSmoothingModifier, RouterAlignedRoundingModifier

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    ids = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    messages = []
    for modifier in (ExpertAwareSmoothingModifier(),
                     RouterAlignedRoundingModifier(iters=2, scheme="W4A16", targets="Linear", ignore=["lm_head"])):
        model = AutoModelForCausalLM.from_pretrained(f"{folder}/model", dtype=torch.float32)
        offload = Path(folder) / f"offload-{type(modifier).__name__}"
        offload.mkdir(exist_ok=True)
        dispatch_with_map(model, {n: ("cpu", "disk") for n, m in model.named_modules()
                                  if n.startswith("model.layers.") and len(m._parameters)},
                          offload_dir=str(offload), show_progress=False)
        try:
            oneshot(model=model, dataset=data, recipe=[modifier], num_calibration_samples=4, max_seq_length=16)
            messages.append(None)
        except Exception as exc:  # what the user sees
            messages.append(f"{type(exc).__name__}: {exc}")
    torch.save(messages, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_disk_offload_under_two_ranks_is_refused_with_a_clear_message(tmp_path):
    import torch.multiprocessing as mp

    save_tiny("qwen3_moe", tmp_path / "model", seed=5)
    ctx = mp.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_disk_offloaded_rank, args=(r, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in range(2):
        smoothing, rounding = torch.load(tmp_path / f"rank{rank}.pt")
        for message, where in ((smoothing, "ExpertAwareSmoothingModifier"), (rounding, "RouterAlignedRoundingModifier")):
            assert message is not None, f"rank {rank}: {where} ran on a disk-offloaded model under 2 ranks"
            assert message.startswith(f"InputError: {where}: ") and "offloaded to disk" in message, message
            assert "2 ranks" in message and "model.layers." in message, message
