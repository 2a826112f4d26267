"""Evaluation and calibration token ids, following the shared protocol.

Text is split on ``"\\n"``; each line is encoded as ``line + "\\n"`` with the model's own ``tokenizer.json`` and no
special tokens; the ids are concatenated. Evaluation takes the first ``rows x seq_len`` ids as ``rows`` rows;
calibration takes ``n`` windows of ``seq_len`` ids at offsets drawn with numpy ``default_rng(seed)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError

__all__ = ["find_tokenizer", "encode_text", "eval_rows", "calibration_windows"]


def find_tokenizer(model_dir: str | Path | None, tokenizer: str | Path | None = None) -> Path:
    """The ``tokenizer.json`` to use: ``tokenizer`` if given (a file or a folder holding one), else the model's."""
    for candidate in (tokenizer, model_dir):
        if candidate is None:
            continue
        path = Path(candidate)
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            return path
        if candidate is tokenizer:
            raise InputError(f"tokenizer not found: {path}")
    raise InputError(f"no tokenizer.json in {model_dir}; pass --tokenizer FILE")


def encode_text(text_file: str | Path, tokenizer_file: str | Path) -> torch.Tensor:
    """All ids of ``text_file`` encoded line by line (1-D long tensor). A ``.jsonl`` file is read as JSON Lines:
    the ``text`` field of each record, records joined by newlines."""
    from tokenizers import Tokenizer

    path = Path(text_file)
    if not path.is_file():
        raise InputError(f"text file does not exist: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"text file is empty: {path}")
    if path.suffix == ".jsonl":
        text = "\n".join(_jsonl_texts(text, path))
    tok = Tokenizer.from_file(str(tokenizer_file))
    lines = [line + "\n" for line in text.split("\n")]
    ids: list[int] = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def _jsonl_texts(content: str, path: Path) -> list[str]:
    """The ``text`` field of every record of a JSON Lines file (blank lines skipped)."""
    import json

    texts = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}: a record needs a string field 'text'")
        texts.append(record["text"])
    return texts


def eval_rows(ids: torch.Tensor, rows: int, seq_len: int, vocab_size: int | None = None,
              source: str = "text") -> torch.Tensor:
    """The first ``rows x seq_len`` ids as a ``[rows, seq_len]`` tensor (fewer rows if the text is short)."""
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
    if rows < 1:
        raise InputError(f"rows must be at least 1, got {rows}")
    available = ids.numel() // seq_len
    if available == 0:
        raise InputError(f"{source} has {ids.numel()} tokens, fewer than one row of seq_len={seq_len}")
    rows = min(rows, available)
    out = ids[: rows * seq_len].view(rows, seq_len)
    if vocab_size is not None and int(out.max()) >= vocab_size:
        raise InputError(f"{source} has token id {int(out.max())} outside the model's vocabulary ({vocab_size})")
    return out


def calibration_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` windows of ``ids`` at random offsets (numpy ``default_rng(seed).integers``)."""
    import numpy as np

    if ids.numel() <= seq_len:
        raise InputError(f"calibration text has {ids.numel()} tokens, not more than seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, ids.numel() - seq_len, size=n)
    return torch.stack([ids[int(s) : int(s) + seq_len] for s in starts])
