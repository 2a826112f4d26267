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
    assert "would write into the input model folder" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "m"), "--recipe", str(tmp_path / "none.yaml"), "--data", str(text),
                 "--out", str(tmp_path / "q")]) == 2
    assert "recipe file does not exist" in capsys.readouterr().err
    assert main(base[:-3] + ["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "q")]) == 2
    assert "text file does not exist" in capsys.readouterr().err
    # an output folder under an existing file
    assert main(base + [str(Path(text) / "sub")]) == 2
    assert f"cannot be created: {Path(text).resolve()} is a file" in capsys.readouterr().err
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
