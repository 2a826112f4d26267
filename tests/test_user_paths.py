"""Issue 30: used the way llm-compressor and auto-round users work. Hub ids resolve through the local hub cache
(offline here: a cache laid out in the test), datasets load as datasets.load_dataset loads them (chat through the
chat template, samples truncated one by one or packed), recipes come by name from the installed package or by
--scheme, with --iters/--objective overrides."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from routealign import recipes
from routealign.errors import InputError
from routealign.hub import is_hub_id, resolve_model
from routealign.textdata import dataset_rows, load_calibration_dataset
from routealign.tiny import byte_tokenizer, save_tiny
from routealign_cli import main

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache(root: Path, repo: str, source: Path) -> Path:
    """A hub cache entry as huggingface_hub lays it out: refs/main naming a snapshot folder of the files."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(REVISION)
    shutil.copytree(source, entry / "snapshots" / REVISION)
    return entry / "snapshots" / REVISION


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    save_tiny("qwen3_moe", tmp_path / "src", seed=3)
    return tmp_path, _cache(tmp_path / "hub", "acme/tiny-moe", tmp_path / "src")


def test_hub_ids_resolve_from_the_cache_and_errors_name_the_id(hub, tmp_path):
    _, snapshot = hub
    assert is_hub_id("acme/tiny-moe") and is_hub_id("acme/tiny-moe@v1") and not is_hub_id("./acme/x")
    assert resolve_model("acme/tiny-moe") == snapshot
    assert resolve_model(tmp_path / "src") == tmp_path / "src"  # a folder is itself
    with pytest.raises(InputError, match=r"^--reference acme/missing: not in the local Hugging Face cache .* "
                                         r"HF_HUB_OFFLINE is set; download it .*huggingface-cli download acme/missing"):
        resolve_model("acme/missing", "--reference")
    with pytest.raises(InputError, match="model folder does not exist: ./nowhere"):
        resolve_model("./nowhere")


def test_quantize_check_and_eval_take_hub_ids(hub, tmp_path, capsys, sample_text):
    out = tmp_path / "q"
    code = main(["quantize", "acme/tiny-moe", "--recipe", "vsraq_w4a16", "--iters", "2", "--data", sample_text,
                 "--out", str(out), "--samples", "4", "--seq-len", "32", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "routealign eval --reference acme/tiny-moe --quantized" in printed
    recipe = (out / "recipe.yaml").read_text()
    assert "iters: 2" in recipe and "objective: vsraq" in recipe  # the shipped recipe, with the override
    _cache(tmp_path / "hub", "acme/tiny-moe-w4a16", out)
    assert main(["check", "acme/tiny-moe-w4a16"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["eval", "--reference", "acme/tiny-moe", "--quantized", "acme/absent", "--text", sample_text]) == 2
    assert "--quantized acme/absent: not in the local Hugging Face cache" in capsys.readouterr().err


def test_scheme_picks_the_recommended_recipe_and_overrides_apply(hub, tmp_path, capsys, sample_text):
    code = main(["quantize", "acme/tiny-moe", "--scheme", "NVFP4", "--iters", "1", "--objective", "none",
                 "--data", sample_text, "--out", str(tmp_path / "q"), "--samples", "4", "--seq-len", "32",
                 "--dtype", "float32"])
    assert code == 0, capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized"
    recipe = (tmp_path / "q" / "recipe.yaml").read_text()
    assert "objective: none" in recipe and "iters: 1" in recipe
    assert main(["quantize", "acme/tiny-moe", "--scheme", "W8A8", "--data", sample_text, "--out",
                 str(tmp_path / "r")]) == 2
    assert "--scheme W8A8: routealign ships recipes for W4A16, NVFP4" in capsys.readouterr().err
    assert main(["quantize", "acme/tiny-moe", "--recipe", "no_such_recipe", "--data", sample_text, "--out",
                 str(tmp_path / "r")]) == 2
    assert "no recipe named 'no_such_recipe'; shipped recipes: autoround_w4a16" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_recipes_by_name_from_the_package(tmp_path, monkeypatch, capsys):
    names = recipes.names()
    assert {"vsraq_w4a16", "autoround_w4a16", "vsraq_nvfp4"} <= set(names)
    assert all(recipes.path(n).is_file() and recipes.path(n).parent.name == "recipes" for n in names)
    assert recipes.for_scheme("w4a16") == "autoround_w4a16" and recipes.for_scheme("NVFP4") == "vsraq_nvfp4"
    described = recipes.describe()
    assert set(described) == set(names) and all(described.values())
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in names) and "[--scheme W4A16]" in listed
    # a file of that name in the working folder wins over the shipped recipe
    monkeypatch.chdir(tmp_path)
    Path("vsraq_w4a16").write_text(recipes.path("autoround_w4a16").read_text())
    assert recipes.resolve("vsraq_w4a16") == Path("vsraq_w4a16")
    with pytest.raises(InputError, match="recipe file does not exist: missing.yaml"):
        recipes.resolve("missing.yaml")
    with pytest.raises(InputError, match="no RouterAlignedRoundingModifier to apply --iters"):
        (tmp_path / "gptq.yaml").write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n")
        recipes.text(tmp_path / "gptq.yaml", iters=3)


def _datasets(tmp_path):
    chat = [{"messages": [{"role": "user", "content": f"question {i} " * (i + 1)},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    import datasets

    datasets.Dataset.from_dict({"text": [f"plain text number {i} " * (3 * i + 1) for i in range(6)]}).to_parquet(
        str(tmp_path / "plain.parquet"))
    return tmp_path / "chat.jsonl", tmp_path / "plain.parquet"


def test_datasets_load_like_load_dataset_and_chat_goes_through_the_template(tmp_path):
    chat, plain = _datasets(tmp_path)
    tokenizer = byte_tokenizer()
    rows = dataset_rows(load_calibration_dataset(chat), tokenizer, samples=4, seq_len=90, seed=1, source="chat")
    assert len(rows) == 4 and max(len(r) for r in rows) <= 90 and len({len(r) for r in rows}) > 1
    shuffled = load_calibration_dataset(chat).shuffle(seed=1)
    first = tokenizer.apply_chat_template(shuffled[0]["messages"], tokenize=False)
    assert first.startswith("<|user|>\nquestion") and rows[0] == tokenizer(first, add_special_tokens=False)[
        "input_ids"][:90]
    texts = dataset_rows(load_calibration_dataset(plain), tokenizer, samples=3, seq_len=16, seed=0)
    assert len(texts) == 3 and all(len(r) <= 16 for r in texts)
    packed = dataset_rows(load_calibration_dataset(plain), tokenizer, samples=3, seq_len=16, seed=0, packing=True)
    assert isinstance(packed, torch.Tensor) and packed.shape == (3, 16)
    with pytest.raises(InputError, match=r"no column 'body' \(columns: text\)"):
        dataset_rows(load_calibration_dataset(plain), tokenizer, 3, 16, column="body")
    with pytest.raises(InputError, match="dataset .*missing.parquet: not a data file or folder"):
        load_calibration_dataset(tmp_path / "missing.parquet")


def test_quantize_calibrates_on_a_chat_dataset(tmp_path, capsys):
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    chat, plain = _datasets(tmp_path)
    for data, extra in ((chat, []), (plain, ["--packing"])):
        out = tmp_path / f"q-{data.stem}"
        code = main(["quantize", str(tmp_path / "m"), "--recipe", "autoround_w4a16", "--iters", "1", "--dataset",
                     str(data), "--samples", "4", "--seq-len", "32", "--out", str(out), "--dtype", "float32", *extra])
        printed = capsys.readouterr()
        assert code == 0, printed.err[-2000:]
        assert "--text HELD_OUT_TEXT" in printed.out
    assert main(["quantize", str(tmp_path / "m"), "--dataset", str(chat), "--column", "nope", "--out",
                 str(tmp_path / "x")]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
