"""``routealign quantize``: a recipe and a text file in, a checked vLLM checkpoint out; bad input refused before any
work, nothing written."""

import json
from pathlib import Path

import pytest

from routealign_cli import main
from routealign.tiny import save_tiny

RECIPE = """quant_stage:
  quant_modifiers:
    RouterAlignedRoundingModifier:
      objective: vsraq
      iters: 2
      batch_size: 4
      scheme: W4A16
      targets: [Linear]
      ignore: [lm_head]
"""


@pytest.fixture
def setup(tmp_path, sample_text):
    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path, sample_text


def test_quantize_writes_a_checked_checkpoint(setup, capsys):
    tmp_path, text = setup
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    code = main(["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "r.yaml"), "--data", str(text),
                 "--out", str(tmp_path / "q"), "--samples", "8", "--seq-len", "32", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and f"routealign eval --reference {tmp_path / 'm'} --quantized" in out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert (tmp_path / "q" / "tokenizer.json").is_file() and (tmp_path / "q" / "recipe.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before  # the input folder is never written


def test_quantize_refuses_bad_input_before_loading(setup, capsys, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    tmp_path, text = setup
    base = ["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "r.yaml"), "--data", str(text), "--out"]
    (tmp_path / "exists").mkdir()
    assert main(base + [str(tmp_path / "exists")]) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "m" / "q")]) == 2
    assert f"would write into the input {(tmp_path / 'm').resolve()}" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "none.yaml"), "--data", str(text),
                 "--out", str(tmp_path / "q")]) == 2
    assert "recipe file does not exist" in capsys.readouterr().err
    assert main(base[:-3] + ["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q")]) == 2
    assert "text file does not exist" in capsys.readouterr().err
    # an output folder under an existing file (an input, or another file)
    assert main(base + [str(Path(text) / "sub")]) == 2
    assert f"would write into the input {Path(text).resolve()}" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(base + [str(tmp_path / "a_file" / "sub")]) == 2
    assert f"cannot be created: {(tmp_path / 'a_file').resolve()} is a file" in capsys.readouterr().err
    # a mistyped recipe field: one line naming the field and the recipe file
    (tmp_path / "typo.yaml").write_text(RECIPE.replace("iters: 2", "itres: 2"))
    assert main(["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "typo.yaml"), "--data", str(text),
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"routealign: error: recipe {tmp_path / 'typo.yaml'}: RouterAlignedRoundingModifier: itres: "
                          "Extra inputs are not permitted") and err.count("\n") == 1
    # windows longer than the model's positions
    longest = json.loads((tmp_path / "m" / "config.json").read_text())["max_position_embeddings"]
    assert main(base[:-3] + ["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q"),
                             "--seq-len", str(longest + 1)]) == 2
    err = capsys.readouterr().err
    assert f"warning: --seq-len {longest + 1} exceeds the model's max_position_embeddings {longest}" in err
    assert main(base[:-3] + ["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q"),
                             "--seq-len", str(longest)]) == 2
    assert "max_position_embeddings" not in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def _no_load(monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)


def test_overwrite_never_deletes_an_input_or_a_folder_that_is_not_a_checkpoint(setup, capsys, monkeypatch):
    """Issue 44, 0b: ``--out`` that contains the model (or the data, or the recipe) is refused even with
    ``--overwrite``; an existing folder is replaced only when it is a checkpoint (or empty). Nothing is deleted."""
    _no_load(monkeypatch)
    tmp_path, text = setup
    (tmp_path / "unrelated.txt").write_text("keep me")
    data = tmp_path / "data" / "calib.txt"
    data.parent.mkdir()
    data.write_text(Path(text).read_text())
    base = ["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "r.yaml"), "--overwrite"]
    assert main(base + ["--data", str(data), "--out", str(tmp_path)]) == 2
    assert f"contains the input {(tmp_path / 'm').resolve()}" in capsys.readouterr().err
    assert main(base + ["--data", str(data), "--out", str(data.parent)]) == 2
    assert f"contains the input {data.resolve()}" in capsys.readouterr().err
    assert main(base + ["--data", str(text), "--out", str(tmp_path / "r.yaml")]) == 2
    assert f"would write into the input {(tmp_path / 'r.yaml').resolve()}" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(base + ["--data", str(text), "--out", str(tmp_path / "notes")]) == 2
    assert "is not a compressed-tensors checkpoint" in capsys.readouterr().err
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "unrelated.txt").read_text() == "keep me"
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and data.is_file()


def test_overwrite_replaces_a_checkpoint(setup, capsys):
    tmp_path, text = setup
    args = ["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "r.yaml"), "--data", str(text), "--out",
            str(tmp_path / "q"), "--samples", "4", "--seq-len", "16", "--iters", "0"]
    assert main(args) == 0
    (tmp_path / "q" / "stale.txt").write_text("from the earlier run")
    assert main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "q" / "stale.txt").exists() and (tmp_path / "q" / "config.json").is_file()
    capsys.readouterr()


def test_bad_weights_unknown_modifiers_and_group_sizes_are_refused_before_loading(setup, capsys, monkeypatch):
    """Issue 44, 0b: exit 2 with one line naming the file, the modifier type or the config field, before the model
    loads (before: a traceback and exit 1, the status that means 'written, check failed')."""
    import shutil

    tmp_path, text = setup
    save_tiny("qwen3_moe", tmp_path / "h72", seed=3, hidden_size=72, head_dim=36)
    capsys.readouterr()
    _no_load(monkeypatch)
    for name, damage in (("missing", lambda f: f.unlink()), ("truncated", lambda f: f.write_bytes(f.read_bytes()[:-64]))):
        shutil.copytree(tmp_path / "m", tmp_path / name)
        damage(tmp_path / name / "model.safetensors")
        assert main(["quantize", str(tmp_path / name), "--data", str(text), "--out", str(tmp_path / "q")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("routealign: error:") and err.count("\n") == 1
        assert (f"has no *.safetensors weights: {tmp_path / name}" in err if name == "missing"
                else f"{tmp_path / name / 'model.safetensors'}: not a readable safetensors file" in err), err
    (tmp_path / "misspelt.yaml").write_text(RECIPE.replace("RouterAlignedRoundingModifier", "RouterAlignedRoundingModifer"))
    assert main(["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "misspelt.yaml"), "--iters", "5",
                 "--data", str(text), "--out", str(tmp_path / "q")]) == 2
    assert "No modifier of type 'RouterAlignedRoundingModifer'" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "h72"), "--scheme", "NVFP4", "--data", str(text),
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'h72' / 'config.json'}: hidden_size 72 is not a multiple of the group size 16" in err
    assert not (tmp_path / "q").exists()
