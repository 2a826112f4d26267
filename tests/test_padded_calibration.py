"""Issue 12: the modifiers calibrate on variable-length and padded data (the data llm-compressor's examples make),
padded positions take part in no loss, statistic, routed-token count or activation maximum, and the text-dataset
flow of llm-compressor's examples runs with every shipped recipe."""


import pytest
import torch
import yaml
from compressed_tensors.quantization import preset_name_to_scheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401
from routealign import ExpertAwareSmoothingModifier, RouterAlignedRoundingModifier
from routealign.calibration import CalibrationTokens, draw_calibration
from routealign.distributed import suspended_offloading
from routealign.errors import InputError
from routealign.modifiers.rounding import BlockTuner, TuningConfig
from routealign.streams import BlockInputs, StreamEngine
from routealign.tiny import byte_tokenizer, save_tiny, tiny_model

from .conftest import FIXTURES

LENGTHS = [16, 11, 7, 16, 13, 9, 16, 12]


def _sequences(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


def _quantize(folder, rows, masks, batch_size, scheme="W4A16", smooth=False, **data_args):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    mod = RouterAlignedRoundingModifier(objective="vsraq", iters=6, batch_size=2, holdout=0.25, scheme=scheme,
                                        targets="Linear", ignore=["lm_head"], gate={"z": 0})
    recipe = [ExpertAwareSmoothingModifier(mode="search", grid=[0.0, 0.5]), mod] if smooth else mod
    columns = {"input_ids": rows} if masks is None else {"input_ids": rows, "attention_mask": masks}
    oneshot(model=model, dataset=Dataset.from_dict(columns), recipe=recipe, num_calibration_samples=len(rows),
            batch_size=batch_size, **data_args)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, mod.report


@pytest.mark.parametrize("scheme,smooth", [("W4A16", False), ("NVFP4", True)])
def test_padded_batches_tune_the_same_weights_as_the_sequences_unpadded(tmp_path, scheme, smooth):
    """Variable lengths at batch_size 1 (llm-compressor's default), right padding, and left padding in batches of 4
    (pad ids that are real tokens elsewhere): bit-identical weights and scales. NVFP4 with smoothing first covers the
    activation maxima and the smoothing statistics."""
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    seqs = _sequences()
    plain, report = _quantize(tmp_path / "m", seqs, None, 1, scheme, smooth)
    right = [s + [7] * (16 - len(s)) for s in seqs]
    right_mask = [[1] * len(s) + [0] * (16 - len(s)) for s in seqs]
    left = [[9] * (16 - len(s)) + s for s in seqs]
    left_mask = [[0] * (16 - len(s)) + [1] * len(s) for s in seqs]
    for rows, masks, batch in ((right, right_mask, 1), (left, left_mask, 4)):
        other, _ = _quantize(tmp_path / "m", rows, masks, batch, scheme, smooth)
        assert sorted(other) == sorted(plain)
        differ = [n for n in plain if not torch.equal(plain[n], other[n])]
        assert differ == []
    assert [row["samples"] for row in report] == [len(seqs)] * 2
    assert any(n.endswith("weight_scale") for n in plain)
    if scheme == "NVFP4":
        assert any(n.endswith("input_global_scale") for n in plain)


def test_batch_size_does_not_cut_sequences(tmp_path):
    """llm-compressor's truncation collator cuts every sample of a batch to the batch's shortest; routealign reads
    the rows whole, so batch_size changes nothing."""
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    seqs = _sequences()
    one, _ = _quantize(tmp_path / "m", seqs, None, 1)
    eight, _ = _quantize(tmp_path / "m", seqs, None, 8)
    assert all(torch.equal(one[n], eight[n]) for n in one)


def _layer0(model_type="qwen3_moe", objective="none"):
    model = tiny_model(model_type, seed=5)
    linearize_moe(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    engine = StreamEngine(model, names)
    block, nxt = model.model.layers[0], model.model.layers[1]
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}

    def tuner(length):
        return BlockTuner(block, targets,
                          TuningConfig(objective=objective, iters=0, rounding={"min_expert_tokens": 0}), [nxt],
                          next_kwargs=[engine.layer_kwargs(length)[names[1]]])

    return model, engine, names, tuner


@torch.no_grad()
def test_padded_positions_take_no_part_in_losses_counts_and_maxima():
    """Each quantity on a right-padded batch equals the same quantity computed on every sequence alone (its own
    length, no padding): routed-token counts, activation maxima, unquantized outputs, held-out block loss, router
    loss and per-sequence downstream errors. Without the lengths (padding treated as tokens) the counts differ."""
    model, engine, names, make = _layer0(objective="vsraq")
    seqs = _sequences()
    tokens = CalibrationTokens.from_batches([{"input_ids": torch.tensor([s])} for s in seqs], "test")
    assert tokens.lengths.tolist() == LENGTHS and tokens.tokens == sum(LENGTHS)
    first = tokens.first_inputs(engine)
    longest = first.shape[1]
    padded = BlockInputs(first, engine.layer_kwargs(longest)[names[0]], tokens.lengths,
                         lambda n: engine.layer_kwargs(n)[names[0]])
    assert padded.padded and bool((first[1, 11:] == 0).all())
    experts = [n for n, _ in model.model.layers[0].named_modules() if n.endswith("experts.3.down_proj")] + [
        "self_attn.o_proj", "mlp.experts.0.gate_proj"]
    block = model.model.layers[0]
    with suspended_offloading(block, model.model.layers[1]):
        tuner = make(longest)
        ref = tuner.reference(padded)
        y = ref.outputs
        counts = tuner.expert_token_counts(padded)
        amax = tuner.runner.routed_input_amax(padded, experts)
        every = torch.arange(len(seqs))
        down = tuner.heldout(padded, ref, every).downstream_errors()
        loss = tuner.heldout(padded, ref, every).loss(use_router=False)
        one = [tuner.heldout(padded, ref, torch.tensor([i])) for i in range(len(seqs))]
        router = [h.loss(use_router=True) - h.loss(use_router=False) for h in one]
        alone_counts, alone_amax, alone_down, alone_loss, alone_router = None, {}, [], 0.0, []
        for i, n in enumerate(LENGTHS):
            single = BlockInputs(first[i : i + 1, :n].clone(), engine.layer_kwargs(n)[names[0]])
            t = make(n)
            ref1 = t.reference(single)
            y1 = ref1.outputs
            alone = t.heldout(single, ref1, torch.tensor([0]))
            assert torch.allclose(y1[0], y[i, :n], atol=1e-5)
            c = t.expert_token_counts(single)
            alone_counts = c if alone_counts is None else {k: alone_counts[k] + c[k] for k in c}
            for k, v in t.runner.routed_input_amax(single, experts).items():
                alone_amax[k] = torch.maximum(alone_amax[k], v) if k in alone_amax else v
            alone_down.append(float(alone.downstream_errors()[0]))
            alone_loss += alone.loss(use_router=False) * n
            alone_router.append(alone.loss(use_router=True) - alone.loss(use_router=False))
        assert bool((y[1, 11:] == 0).all())  # padded positions of the unquantized outputs are zeros
        assert {k: v.tolist() for k, v in counts.items()} == {k: v.tolist() for k, v in alone_counts.items()}
        assert sorted(amax) == sorted(alone_amax)
        for k in amax:
            assert torch.allclose(amax[k], alone_amax[k], rtol=1e-5), k
        assert torch.allclose(down, torch.tensor(alone_down, dtype=down.dtype), rtol=1e-4)
        assert loss == pytest.approx(alone_loss / sum(LENGTHS), rel=1e-4)
        assert router == pytest.approx(alone_router, rel=1e-3, abs=1e-9)
        assert max(alone_router) > 0  # the router term is measured, not zero
        # the negative control: the same padded tensor with every position taken as a token
        unmasked = make(longest).expert_token_counts(BlockInputs(first, padded.kwargs))
        assert {k: v.tolist() for k, v in unmasked.items()} != {k: v.tolist() for k, v in counts.items()}


def test_holes_in_the_attention_mask_are_refused_before_the_model_changes(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    rows = _sequences([8, 8])
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 8, [1, 1, 0, 1, 1, 1, 1, 1]]})
    with pytest.raises(InputError, match=r"calibration dataset: dataset row 1 has padding "
                                         r"between real tokens"):
        oneshot(model=model, dataset=data, num_calibration_samples=2,
                recipe=RouterAlignedRoundingModifier(objective="none", iters=2, scheme="W4A16", targets="Linear",
                                                     ignore=["lm_head"]))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


def test_draw_is_shared_and_reads_rows_whole():
    """Both modifiers of a recipe calibrate on one draw; rows are taken whole (cut at max_seq_length only)."""
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import format_calibration_data

    rows = _sequences([12, 5, 9])
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    loader = format_calibration_data(DatasetArguments(batch_size=3, max_seq_length=10,
                                                      shuffle_calibration_samples=False), ds, None)
    drawn = draw_calibration(loader)
    assert draw_calibration(loader) is drawn
    assert sorted(b["input_ids"].shape[1] for b in drawn) == [5, 9, 10]
    assert sorted(b["input_ids"][0].tolist() for b in drawn) == sorted(r[:10] for r in rows)
    assert [b["input_ids"].shape[1] for b in loader] == [5]  # what llm-compressor's collator would have kept


def _text_dataset(tokenizer, rows=8, max_length=128):
    """llm-compressor's examples: text per sample, tokenized with truncation, no padding (variable lengths)."""
    lines = [l for l in open(f"{FIXTURES}/sample.txt").read().split("\n\n") if len(l) > 20][:rows]
    ds = Dataset.from_dict({"text": lines})
    return ds.map(lambda s: tokenizer(s["text"], padding=False, max_length=max_length, truncation=True,
                                      add_special_tokens=False), remove_columns=ds.column_names)


from routealign import recipes as shipped_recipes

RECIPE_DIR = shipped_recipes.path("vsraq_w4a16").parent
RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_text_dataset_flow_of_llmcompressor_examples_runs_with_every_shipped_recipe(tmp_path, recipe):
    """``oneshot(model, dataset=<tokenized text>, recipe=recipes/X.yaml, max_seq_length, num_calibration_samples)``
    (iterations cut to 2 to keep the test short): every decoder layer tuned on all 8 variable-length samples, the
    checkpoint saved and reloaded by routealign."""
    from routealign.checkpoint import load_model, save_compressed

    assert len(RECIPES) >= 6  # the glob found the shipped recipes
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    tokenizer = byte_tokenizer()
    ds = _text_dataset(tokenizer)
    lengths = sorted(len(r) for r in ds["input_ids"])
    assert lengths[0] < lengths[-1]  # variable lengths, as the examples produce
    text = (RECIPE_DIR / f"{recipe}.yaml").read_text()
    config = yaml.safe_load(text)
    for stage in config.values():
        for group in stage.values():
            for name, fields in group.items():
                if "iters" in fields:
                    fields["iters"] = 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(config))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    oneshot(model=model, dataset=ds, recipe=str(tmp_path / "r.yaml"), max_seq_length=128,
            num_calibration_samples=8, processor=tokenizer)
    from llmcompressor.core import active_session

    mods = [m for m in active_session().lifecycle.recipe.modifiers if isinstance(m, RouterAlignedRoundingModifier)]
    assert len(mods) == 1 and [row["samples"] for row in mods[0].report] == [8, 8]
    save_compressed(model, tmp_path / "q")
    reloaded = load_model(tmp_path / "q", dtype=torch.float32)
    ids = torch.tensor([ds["input_ids"][0]])
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    assert bool(torch.isfinite(logits).all())


def test_raw_text_dataset_and_padding_collator(tmp_path):
    """A raw ``text`` dataset that llm-compressor tokenizes itself, and ``data_collator='padding'`` with batches of 4
    (padded batches): same weights as the same sequences pre-tokenized and unpadded."""
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    tokenizer = byte_tokenizer()
    tokenized = _text_dataset(tokenizer, rows=6)
    lines = [l for l in open(f"{FIXTURES}/sample.txt").read().split("\n\n") if len(l) > 20][:6]
    raw = Dataset.from_dict({"text": lines})
    results = []
    for data, extra in ((tokenized, {}), (tokenized, {"data_collator": "padding", "batch_size": 4}), (raw, {})):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
        oneshot(model=model, dataset=data, processor=tokenizer, num_calibration_samples=6, max_seq_length=128,
                recipe=RouterAlignedRoundingModifier(objective="none", iters=3, batch_size=2, scheme="W4A16",
                                                     targets="Linear", ignore=["lm_head"]), **extra)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for other in results[1:]:
        assert all(torch.equal(results[0][n], other[n]) for n in results[0])
