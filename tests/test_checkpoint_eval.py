"""Faithful reload of compressed-tensors checkpoints and `routealign eval` end to end."""

import json

import pytest
import torch

from routealign.checkpoint import load_model
from routealign_cli import main
from routealign.errors import CheckpointError, InputError, NotMoEError
from routealign.evaluate import evaluate
from routealign.tiny import save_tiny

from .conftest import calibration_ids, quantize_with_llmcompressor

CASES = [
    ("qwen3_moe", "W4A16", "pack-quantized"),
    ("qwen3_moe", "NVFP4", "nvfp4-pack-quantized"),
    ("glm4_moe", "W4A16_ASYM", "pack-quantized"),
    ("glm4_moe", "NVFP4", "nvfp4-pack-quantized"),
    ("mixtral", "NVFP4A16", "nvfp4-pack-quantized"),  # saved keys renamed (block_sparse_moe)
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return {t: save_tiny(t, root / t, seed=11) and root / t for t in {c[0] for c in CASES}}


@pytest.mark.parametrize("model_type,scheme,fmt", CASES)
def test_reload_reproduces_fake_quant_logits_exactly(tmp_path, references, model_type, scheme, fmt):
    ids = calibration_ids(rows=4, seq_len=48)
    expected = quantize_with_llmcompressor(references[model_type], tmp_path / "q", scheme, ids)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    reloaded = load_model(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    # the reference folder is untouched by quantization and by loading
    assert "quantization_config" not in json.loads((references[model_type] / "config.json").read_text())


def test_eval_numbers_against_a_copy_whose_router_swaps_two_experts(references):
    """The quantized side is the reference with the first MoE layer's router rows of experts 0 and 1 swapped: at
    that layer (same inputs in both) every token's expert set is the reference's with 0 and 1 exchanged. The
    report's overlap@k there and both perplexities are checked against values computed here from the models'
    own outputs (a self-comparison would pass with the quantized model ignored)."""
    import copy

    ref = load_model(references["glm4_moe"], dtype=torch.float32)
    swapped = copy.deepcopy(ref)
    gate = swapped.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.weight[[0, 1]] = gate.weight[[1, 0]].clone()
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias[[0, 1]] = gate.e_score_correction_bias[[1, 0]].clone()
    ids = calibration_ids(rows=3, seq_len=32, seed=3)
    chosen = []
    handle = ref.model.layers[1].mlp.gate.register_forward_hook(lambda m, i, out: chosen.append(out[2]))
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        swapped_logits = swapped(input_ids=ids).logits
    handle.remove()
    sets = [set(row) for row in chosen[0].reshape(-1, chosen[0].shape[-1]).tolist()]
    k = chosen[0].shape[-1]
    swap = {0: 1, 1: 0}
    overlap = sum(len(s & {swap.get(e, e) for e in s}) / k for s in sets) / len(sets)
    assert overlap < 1

    def ppl(logits):
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return float(torch.exp(loss))

    report = evaluate(ref, swapped, ids, batch_size=2, progress=False).report
    first = next(l for l in report["routing"]["per_layer"] if l["layer"] == "model.layers.1.mlp")
    assert first["overlap_at_k"] == pytest.approx(overlap, rel=1e-6)
    assert report["perplexity"]["reference"] == pytest.approx(ppl(ref_logits), rel=1e-5)
    assert report["perplexity"]["quantized"] == pytest.approx(ppl(swapped_logits), rel=1e-5)
    assert report["perplexity"]["quantized"] != pytest.approx(report["perplexity"]["reference"], rel=1e-6)
    assert report["predictions"] == 3 * 31
    assert [l["layer_index"] for l in report["layers"]] == [1, 2]
    # the model against itself: every agreement measure perfect
    same = evaluate(ref, copy.deepcopy(ref), ids, batch_size=2, progress=False).report["routing"]["mean"]
    assert all(same[key] == 1.0 for key in ("overlap_at_k", "jaccard", "exact_set", "top1", "match_score"))


def test_perfect_routing_restores_reference_choices(tmp_path, references):
    """Under forced routing the quantized model's routers must pick exactly the reference experts."""
    ids = calibration_ids(rows=2, seq_len=32, seed=5)
    quantize_with_llmcompressor(references["qwen3_moe"], tmp_path / "q", "W4A16", ids)
    ref = load_model(references["qwen3_moe"], dtype=torch.float32)
    quant = load_model(tmp_path / "q", dtype=torch.float32)
    from routealign.routing import RouterTap, find_moe_layers

    # what every quantized router hands its experts in the forced forward, seen by a hook after the tap's
    seen, enter = {}, RouterTap.__enter__

    def spying_enter(self):
        enter(self)
        if self.force is not None:
            for layer in self.layers:
                def spy(module, args, output, name=layer.name):
                    seen[name] = (output[0].detach(), output[1].detach(), output[2].detach())
                self._handles.append(layer.router.register_forward_hook(spy))
        return self

    RouterTap.__enter__ = spying_enter
    try:
        plain = evaluate(ref, quant, ids, perfect_routing=True, progress=False).report
    finally:
        RouterTap.__enter__ = enter
    assert plain["routing"]["mean"]["exact_set"] < 1.0  # W4A16 on this random model changes some routes
    assert plain["perplexity"]["quantized_perfect_routing"] != plain["perplexity"]["quantized"]
    ref_layers, q_layers = find_moe_layers(ref), find_moe_layers(quant)
    assert sorted(seen) == sorted(l.name for l in q_layers)
    with torch.no_grad(), RouterTap(ref_layers) as tap:
        ref(input_ids=ids)
    changed = False
    for r_layer, q_layer in zip(ref_layers, q_layers):
        logits, weights, indices = seen[q_layer.name]
        expected = tap.routing(r_layer).indices
        assert torch.equal(indices.cpu(), expected.cpu())  # exactly the reference experts, in its order
        # combine weights from the quantized router's own logits for those experts, not the reference's
        ours = q_layer.family.weights_for(q_layer.router, logits.reshape(-1, logits.shape[-1]), indices)
        assert torch.allclose(weights, ours)
        changed |= not torch.allclose(weights, tap.routing(r_layer).weights.to(weights.dtype))
    assert changed


def test_cli_eval_writes_report_and_plots(tmp_path, references, sample_text, capsys):
    ids = calibration_ids(rows=2, seq_len=32, seed=9)
    quantize_with_llmcompressor(references["qwen3_moe"], tmp_path / "q", "W4A16", ids)
    out = tmp_path / "report"
    code = main(["eval", "--reference", str(references["qwen3_moe"]), "--quantized", str(tmp_path / "q"),
                 "--text", sample_text, "--rows", "4", "--seq-len", "64", "--dtype", "float32",
                 "--out", str(out), "--no-progress", "--perfect-routing"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 4 and report["seq_len"] == 64
    assert set(report["perplexity"]) == {"reference", "quantized", "quantized_perfect_routing"}
    assert len(report["routing"]["per_layer"]) == 2
    assert 0.0 < report["routing"]["mean"]["overlap_at_k"] <= 1.0
    for name in ("agreement_per_layer.png", "rank_confusion.png", "boundary_margin.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| overlap@k |" in md and "model.layers.1.mlp" in md
    assert "Routing agreement" in capsys.readouterr().out


def _error_line(capsys):
    """The one error line (progress bars and logs may precede it on stderr); it must be the last line."""
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    errors = [line for line in err if line.startswith("routealign: error:")]
    assert len(errors) == 1 and err[-1] == errors[0]
    return errors[0]


def test_cli_bad_paths_one_line_errors(tmp_path, references, sample_text, capsys):
    ref = str(references["qwen3_moe"])
    assert main(["eval", "--reference", str(tmp_path / "nope"), "--quantized", ref, "--text", sample_text]) == 2
    assert _error_line(capsys) == (f"routealign: error: --reference folder does not exist: {tmp_path / 'nope'} "
                                   "(a hub id has the form org/name)")
    assert main(["eval", "--reference", ref, "--quantized", str(tmp_path), "--text", sample_text,
                 "--dtype", "float32"]) == 2
    assert _error_line(capsys) == f"routealign: error: model folder has no config.json: {tmp_path}"
    assert main(["eval", "--reference", ref, "--quantized", ref, "--text", str(tmp_path / "x.txt"),
                 "--dtype", "float32"]) == 2
    assert _error_line(capsys) == f"routealign: error: text file does not exist: {tmp_path / 'x.txt'}"


def test_cli_non_moe_model_error(tmp_path, sample_text, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from routealign.tiny import byte_tokenizer

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=1, num_attention_heads=2))
    dense.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    d = str(tmp_path / "dense")
    assert main(["eval", "--reference", d, "--quantized", d, "--text", sample_text, "--rows", "2",
                 "--seq-len", "32", "--dtype", "float32", "--out", str(tmp_path / "o")]) == 2
    assert _error_line(capsys) == "routealign: error: LlamaForCausalLM has no MoE layer " \
                                  "(no module holds both `experts` and a `gate`/`router`)"


def test_incomplete_checkpoint_is_rejected(tmp_path, references):
    from safetensors.torch import load_file, save_file

    ids = calibration_ids(rows=2, seq_len=32)
    quantize_with_llmcompressor(references["qwen3_moe"], tmp_path / "q", "W4A16", ids)
    state = load_file(tmp_path / "q" / "model.safetensors")
    dropped = "model.layers.1.mlp.experts.3.down_proj.weight_scale"
    del state[dropped]
    save_file(state, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"checkpoint lacks 1 tensors the model needs, e.g. {dropped}"):
        load_model(tmp_path / "q")


def test_eval_input_errors(references):
    from routealign.textdata import eval_rows

    ref = load_model(references["qwen3_moe"], dtype=torch.float32)
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 320\)"):
        evaluate(ref, ref, torch.full((1, 8), 400), progress=False)
    with pytest.raises(InputError, match="fewer than one row of seq_len=512"):
        eval_rows(torch.arange(100), rows=4, seq_len=512, source="t.txt")
    assert eval_rows(torch.arange(100), rows=4, seq_len=30).shape == (3, 30)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        eval_rows(torch.arange(1000), rows=4, seq_len=100, vocab_size=320)


def test_non_moe_evaluate_raises():
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(NotMoEError):
        evaluate(dense, dense, torch.zeros(1, 4, dtype=torch.long), progress=False)


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM"])
def test_load_model_casts_decompressed_weights_to_the_requested_dtype(tmp_path, scheme):
    """A checkpoint quantized from a bf16 model loads in float32 and one from a float32 model loads in bf16 (the
    decompressed weights otherwise keep the scales' dtype: 'expected m1 and m2 to have the same dtype')."""
    ids = calibration_ids(rows=2, seq_len=32)
    logits = {}
    for source in (torch.bfloat16, torch.float32):
        model_dir = tmp_path / f"m-{source}"
        save_tiny("qwen3_moe", model_dir, seed=11, dtype=source)
        expected = quantize_with_llmcompressor(model_dir, tmp_path / f"q-{source}", scheme, ids, dtype=source)
        for dtype in (torch.bfloat16, torch.float32):
            model = load_model(tmp_path / f"q-{source}", dtype=dtype)
            assert {p.dtype for n, p in model.named_parameters() if n.endswith("weight")} == {dtype}
            with torch.no_grad():
                logits[(source, dtype)] = model(input_ids=ids).logits.float()
        # loaded in its own dtype, the checkpoint reproduces the in-memory model exactly
        assert torch.equal(logits[(source, source)], expected.float())
    for source in (torch.bfloat16, torch.float32):
        other = torch.float32 if source is torch.bfloat16 else torch.bfloat16
        assert (logits[(source, other)] - logits[(source, source)]).abs().max() < 0.1
