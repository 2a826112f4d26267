"""Token ids for evaluation and calibration, as the shared protocol defines them."""

import numpy as np
import pytest
import torch

from routealign.errors import InputError
from routealign.textdata import calibration_windows, encode_text, eval_rows
from routealign.tiny import byte_tokenizer


def test_encode_line_by_line_without_special_tokens(tmp_path, sample_text):
    byte_tokenizer().save_pretrained(tmp_path)
    ids = encode_text(sample_text, tmp_path / "tokenizer.json")
    raw = open(sample_text, encoding="utf-8").read()
    expected = [b + 3 for line in raw.split("\n") for b in (line + "\n").encode()]
    assert ids.tolist() == expected


def test_calibration_windows_follow_numpy_default_rng():
    ids = torch.arange(1000)
    windows = calibration_windows(ids, n=5, seq_len=16, seed=3)
    starts = np.random.default_rng(3).integers(0, 1000 - 16, size=5)
    assert windows.tolist() == [list(range(s, s + 16)) for s in starts]
    with pytest.raises(InputError, match="calibration text has 10 tokens, not more than seq_len=16"):
        calibration_windows(torch.arange(10), n=1, seq_len=16)


def test_eval_rows_takes_the_first_ids():
    rows = eval_rows(torch.arange(100), rows=3, seq_len=20)
    assert rows.shape == (3, 20) and rows[2, 0].item() == 40


def test_jsonl_text_is_the_text_field_of_each_record(tmp_path):
    import json

    byte_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "a.txt").write_text("first record\nsecond\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first record"}) + "\n\n" +
                                      json.dumps({"text": "second", "id": 2}) + "\n")
    tok = tmp_path / "tokenizer.json"
    assert encode_text(tmp_path / "a.jsonl", tok).tolist() == encode_text(tmp_path / "a.txt", tok).tolist()[:-1]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: a record needs a string field 'text'"):
        encode_text(tmp_path / "bad.jsonl", tok)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl:1: not JSON"):
        encode_text(tmp_path / "broken.jsonl", tok)


def test_drawing_calibration_rows_leaves_the_global_generators_as_they_were(tmp_path):
    """Windows from a text file and samples from a dataset are drawn with their own seeded generators: Python's,
    numpy's and torch's global generators are not advanced."""
    import random

    from datasets import Dataset

    from routealign.textdata import dataset_rows

    tokenizer = byte_tokenizer()
    dataset = Dataset.from_dict({"text": [f"sample number {i} " * (i % 5 + 1) for i in range(40)]})
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    windows = calibration_windows(torch.arange(1000), n=8, seq_len=16, seed=1)
    rows = dataset_rows(dataset, tokenizer, samples=6, seq_len=12, seed=2)
    packed = dataset_rows(dataset, tokenizer, samples=3, seq_len=12, seed=2, packing=True)
    assert random.getstate() == states[0]
    after = np.random.get_state()
    assert after[0] == states[1][0] and np.array_equal(after[1], states[1][1]) and after[2:] == states[1][2:]
    assert torch.equal(torch.get_rng_state(), states[2])
    # and the draws depend on their seeds only
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert torch.equal(calibration_windows(torch.arange(1000), n=8, seq_len=16, seed=1), windows)
    assert dataset_rows(dataset, tokenizer, samples=6, seq_len=12, seed=2) == rows
    assert torch.equal(dataset_rows(dataset, tokenizer, samples=3, seq_len=12, seed=2, packing=True), packed)
