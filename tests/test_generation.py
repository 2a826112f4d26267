"""Greedy generation agreement (`routealign eval --generate N`)."""

import json

import pytest
import torch

from routealign.checkpoint import load_model
from routealign_cli import main
from routealign.errors import InputError
from routealign.generation import GenerationAgreement, generation_agreement, greedy_continuations
from routealign.tiny import save_tiny

from .conftest import calibration_ids, quantize_with_llmcompressor


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    save_tiny("qwen3_moe", root / "ref", seed=11)
    return root / "ref"


@pytest.fixture(scope="module")
def quantized_dir(reference_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("genq") / "q"
    quantize_with_llmcompressor(reference_dir, out, "W2A16", calibration_ids(rows=2, seq_len=32, seed=9))
    return out


def test_agreement_numbers_on_hand_made_continuations():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    quant = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8], [0, 9, 9, 9]])
    forced = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 0], [9, 9, 9, 9]])
    agreement = GenerationAgreement(ref, quant, forced)
    assert agreement.first_divergence() == [2, None, 0]
    assert agreement.matched() == [2, 4, 0]
    assert agreement.survival() == pytest.approx([1.0, 2 / 3, 2 / 3, 1 / 3, 1 / 3])
    summary = agreement.summary()
    assert summary["mean_matched"] == pytest.approx(2.0)
    assert summary["fully_matched"] == pytest.approx(1 / 3)
    assert summary["positional_agreement"] == pytest.approx(10 / 12)
    assert summary["teacher_forced_top1"] == pytest.approx(10 / 12)
    assert summary["per_prompt"][1] == {"matched": 4, "first_divergence": None}


def test_cached_greedy_decoding_equals_full_recomputation(reference_dir):
    """The KV-cache loop gives the tokens a full forward over the growing sequence gives at every step."""
    model = load_model(reference_dir, dtype=torch.float32)
    prompts = calibration_ids(rows=3, seq_len=12, seed=4)
    got = greedy_continuations(model, prompts, 6)
    ids = prompts.clone()
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert torch.equal(got, ids[:, prompts.shape[1]:])


def test_summary_numbers_are_those_of_the_continuations(reference_dir, quantized_dir):
    """The summary against the continuations themselves (checked against greedy decoding in the next test), counted
    here by hand: tokens matched before the first difference, prompts matched throughout, positions equal, the
    teacher-forced tokens equal to the reference's. A copy of the model loaded again agrees everywhere."""
    ref = load_model(reference_dir, dtype=torch.float32)
    quant = load_model(quantized_dir, dtype=torch.float32)
    prompts = calibration_ids(rows=6, seq_len=12, seed=6)
    new = 16  # long enough that continuing the reference's tokens and continuing its own differ somewhere
    result = generation_agreement(ref, quant, prompts, new, batch_size=4, progress=False)
    summary = result.summary()
    matched = []
    for r, q in zip(result.reference.tolist(), result.quantized.tolist()):
        n = next((i for i, (a, b) in enumerate(zip(r, q)) if a != b), len(r))
        matched.append(n)
    assert summary["per_prompt"] == [{"matched": m, "first_divergence": None if m == new else m} for m in matched]
    assert summary["mean_matched"] == pytest.approx(sum(matched) / 6)
    assert summary["fully_matched"] == pytest.approx(sum(m == new for m in matched) / 6)
    assert min(matched) < new  # W2A16 diverges somewhere: the counts are not all trivial
    same = sum(a == b for r, q in zip(result.reference.tolist(), result.quantized.tolist()) for a, b in zip(r, q))
    assert summary["positional_agreement"] == pytest.approx(same / (6 * new))
    forced = sum(a == b for r, t in zip(result.reference.tolist(), result.teacher_forced.tolist())
                 for a, b in zip(r, t))
    assert summary["teacher_forced_top1"] == pytest.approx(forced / (6 * new))
    assert forced != same  # so the two measures cannot be confused with each other
    again = generation_agreement(ref, load_model(reference_dir, dtype=torch.float32), prompts, new, batch_size=4,
                                 progress=False).summary()
    assert again["fully_matched"] == 1.0 and again["teacher_forced_top1"] == 1.0


def test_quantized_divergence_is_where_the_tokens_first_differ(reference_dir, quantized_dir):
    ref = load_model(reference_dir, dtype=torch.float32)
    quant = load_model(quantized_dir, dtype=torch.float32)
    prompts = calibration_ids(rows=8, seq_len=16, seed=6)
    result = generation_agreement(ref, quant, prompts, 12, batch_size=3, progress=False)
    assert torch.equal(result.reference, greedy_continuations(ref, prompts, 12))
    assert torch.equal(result.quantized, greedy_continuations(quant, prompts, 12))
    diverged = 0
    for row, d in enumerate(result.first_divergence()):
        if d is None:
            assert torch.equal(result.reference[row], result.quantized[row])
            continue
        diverged += 1
        assert torch.equal(result.reference[row, :d], result.quantized[row, :d])
        assert result.reference[row, d] != result.quantized[row, d]
    assert diverged > 0  # W2A16 of this random model changes some greedy tokens: the test can see a divergence
    # teacher forcing: the quantized model's argmax after the prompt and the reference's earlier tokens
    with torch.no_grad():
        ids = torch.cat([prompts, result.reference[:, :-1]], dim=1)
        expected = quant(input_ids=ids).logits[:, prompts.shape[1] - 1:].argmax(-1)
    assert torch.equal(result.teacher_forced, expected)
    # before the first divergence the teacher-forced tokens are the quantized model's own
    for row, d in enumerate(result.matched()):
        assert torch.equal(result.teacher_forced[row, :d], result.quantized[row, :d])


def test_generation_input_errors(reference_dir):
    model = load_model(reference_dir, dtype=torch.float32)
    with pytest.raises(InputError, match="new_tokens must be at least 1"):
        generation_agreement(model, model, calibration_ids(rows=2, seq_len=8), 0)
    with pytest.raises(InputError, match="prompts must be"):
        generation_agreement(model, model, torch.zeros(8, dtype=torch.long), 3)


def test_cli_eval_generate_writes_report_table_and_plot(tmp_path, reference_dir, quantized_dir, sample_text,
                                                         capsys):
    out = tmp_path / "report"
    code = main(["eval", "--reference", str(reference_dir), "--quantized", str(quantized_dir), "--text",
                 sample_text, "--rows", "2", "--seq-len", "32", "--dtype", "float32", "--out", str(out),
                 "--no-progress", "--generate", "6", "--prompts", "3", "--prompt-len", "16"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    gen = report["generation"]
    assert gen["prompts"] == 3 and gen["new_tokens"] == 6 and gen["prompt_len"] == 16
    assert len(gen["per_prompt"]) == 3 and len(gen["survival"]) == 7 and gen["survival"][0] == 1.0
    assert "generation_agreement.png" in report["plots"]
    assert (out / "generation_agreement.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Greedy generation agreement" in md and "first divergence per prompt" in md
    assert "Greedy generation agreement" in capsys.readouterr().out
    assert main(["eval", "--reference", str(reference_dir), "--quantized", str(quantized_dir), "--text",
                 sample_text, "--rows", "2", "--seq-len", "32", "--out", str(out), "--no-progress",
                 "--generate", "4", "--prompt-len", "1"]) == 2
    assert "--prompt-len >= 2" in capsys.readouterr().err
