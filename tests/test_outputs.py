"""Issue 6.3: checkpoints appear complete or not at all; no silent overwrite; the input folder is never written."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401
from routealign import RouterAlignedRoundingModifier
from routealign.checkpoint import load_model, save_compressed
from routealign.errors import OutputExistsError
from routealign.tiny import save_tiny

from .conftest import calibration_ids

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _quantized(model_dir: Path, iters: int = 0, seed: int = 0, rows: int = 2, scheme: str = "W4A16", **fields):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = calibration_ids(rows=rows, seq_len=16)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, num_calibration_samples=rows, max_seq_length=16,
            recipe=RouterAlignedRoundingModifier(objective="vsraq", iters=iters, batch_size=1, seed=seed, scheme=scheme,
                                                 targets="Linear", ignore=["lm_head"], **fields))
    return model


def test_existing_output_and_input_folder_are_protected(tmp_path):
    src = tmp_path / "input"
    save_tiny("qwen3_moe", src, seed=1)
    before = _digest(src)
    model = _quantized(src)
    with pytest.raises(OutputExistsError, match=f"would write into the input {src.resolve()}"):
        save_compressed(model, src)
    with pytest.raises(OutputExistsError, match=f"would write into the input {src.resolve()}"):
        save_compressed(model, src / "quantized")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match=r"out already exists; pass overwrite=True \(--overwrite\)"):
        save_compressed(model, out)
    # overwrite replaces a checkpoint, never a folder of other files (issue 44, 0b)
    with pytest.raises(OutputExistsError, match="exists and is not a compressed-tensors checkpoint"):
        save_compressed(model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    save_compressed(model, out, overwrite=True)  # an empty folder is replaced
    (out / "stale.txt").write_text("from an earlier save")
    save_compressed(model, out, overwrite=True)  # a checkpoint is replaced
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert load_model(out, dtype=torch.float32) is not None
    assert _digest(src) == before  # the input folder was never written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "out"]  # no staging debris


_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
    from tests.test_outputs import _quantized
    from routealign.checkpoint import save_compressed
    import transformers.modeling_utils as mu
    model = _quantized(__import__("pathlib").Path(src))
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "mid-write":  # killed after the weights file is half written
        real = mu.safe_save_file
        def partial(tensors, filename, metadata=None):
            with open(filename, "wb") as handle:
                handle.write(b"\\0" * 1000)
            die()
        mu.safe_save_file = partial
    elif mode == "before-rename":  # every file written, killed just before the rename into place
        real_rename = os.rename
        os.rename = lambda a, b: die()
    print("SAVING", flush=True)
    save_compressed(model, out, overwrite=True)
    print("SAVED", flush=True)
""")


def _child(tmp_path: Path, mode: str, src: Path, out: Path) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, str(script), mode, str(src), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))


@pytest.mark.parametrize("mode", ["mid-write", "before-rename", "random"])
def test_killed_save_leaves_no_output_or_a_complete_one(tmp_path, mode):
    src = tmp_path / "input"
    save_tiny("qwen3_moe", src, seed=1)
    out = tmp_path / "out"
    proc = _child(tmp_path, mode, src, out)
    if mode == "random":
        for line in proc.stdout:
            if line.startswith("SAVING"):
                break
        # kill at a random moment of the save (it takes tens of milliseconds on the tiny model)
        torch.manual_seed(os.getpid())
        import time
        time.sleep(float(torch.rand(())) * 0.05)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    if mode != "random":
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    if out.exists():  # only possible if the kill came after the rename: then it is complete
        assert mode == "random"
        assert load_model(out, dtype=torch.float32) is not None
    else:
        assert not out.exists()
    # the next save to the same target cleans the killed run's staging folder and succeeds
    model = _quantized(src)
    save_compressed(model, out, overwrite=True)
    assert load_model(out, dtype=torch.float32) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(("child", "__pycache__"))) == [
        "input", "out"]


def test_demo_refuses_a_non_empty_output_folder(tmp_path, capsys):
    from routealign_cli import main

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "demo output folder" in err and "pass --overwrite" in err
    assert (tmp_path / "demo" / "notes.txt").read_text() == "mine"


def test_checkpoint_gets_the_usual_permissions(tmp_path):
    """A vLLM container running as another user must read the checkpoint: 0755 folder, 0644 files (umask 022)."""
    save_tiny("qwen3_moe", tmp_path / "m", seed=1)
    model = _quantized(tmp_path / "m")
    old = os.umask(0o022)
    try:
        out = save_compressed(model, tmp_path / "q")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), {p.name: oct(p.stat().st_mode) for p in files}


def test_demo_names_what_the_gate_did_per_block():
    from routealign.demo import router_decisions

    report = [{"layer": "model.layers.0", "router": "kept"}, {"layer": "model.layers.1", "router": "not_tried"},
              {"layer": "model.layers.2", "router": "kept"}, {"layer": "model.layers.3", "router": "dropped"}]
    assert router_decisions(report) == "kept 2, not tried 1, dropped 1 (of 4 blocks)"
    assert router_decisions([{"layer": "model.layers.0", "router": "none"}]) == "-"  # plain learned rounding
    assert router_decisions(None) == "-"
