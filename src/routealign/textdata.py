"""Evaluation and calibration token ids.

Text files, following the shared protocol: text is split on ``"\\n"``; each line is encoded as ``line + "\\n"``
with the model's own ``tokenizer.json`` and no special tokens; the ids are concatenated. Evaluation takes the first
``rows x seq_len`` ids as ``rows`` rows; calibration takes ``n`` windows of ``seq_len`` ids at offsets drawn with numpy
``default_rng(seed)``.

Datasets, as llm-compressor's examples calibrate (:func:`load_calibration_dataset`, :func:`dataset_rows`): a
``datasets.load_dataset`` name, folder or data file; ``n`` samples after a seeded shuffle; chat data (a ``messages``
column) rendered with the tokenizer's chat template; each sample truncated to ``seq_len`` on its own (no packing), or
the samples' ids concatenated and cut into windows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError

__all__ = ["find_tokenizer", "encode_text", "eval_rows", "calibration_windows", "load_calibration_dataset",
           "dataset_rows"]


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


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


def load_calibration_dataset(spec: str | Path, split: str = "train", config: str | None = None):
    """``datasets.load_dataset`` of ``spec``: a data file (json/jsonl, parquet, csv, txt, arrow: by its suffix), a
    dataset folder, or a hub dataset name (from the local cache when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is
    set). Errors name the dataset, the split and the reason."""
    import datasets

    path = Path(str(spec)).expanduser()
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"dataset {spec}: unknown data file type '{path.suffix}' "
                                 f"(known: {', '.join(sorted(_BUILDERS))})")
            return datasets.load_dataset(builder, data_files=str(path), split=split)
        return datasets.load_dataset(str(path) if path.is_dir() else str(spec), config, split=split)
    except InputError:
        raise
    except ValueError as exc:  # e.g. an unknown split
        raise InputError(f"dataset {spec} (split {split}): {str(exc).splitlines()[0]}") from None
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        raise InputError(f"dataset {spec}: not a data file or folder, and not loadable from the hub or its cache "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    except Exception as exc:  # datasets' own errors (DatasetNotFoundError, ...), named in the message
        raise InputError(f"dataset {spec}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from None


def dataset_rows(dataset, tokenizer, samples: int, seq_len: int, seed: int = 0, column: str | None = None,
                 packing: bool = False, source: str = "dataset") -> list[list[int]] | torch.Tensor:
    """Calibration token ids from ``dataset`` (a ``datasets.Dataset``) with ``tokenizer`` (a transformers tokenizer):
    ``samples`` samples after a shuffle with ``seed``; the ``column`` (default: ``messages`` if present, rendered
    with the tokenizer's chat template, else ``text``) tokenized without special tokens (a chat template writes its
    own). Each sample truncated to ``seq_len`` on its own (a list of rows, empty ones dropped), or with ``packing``
    every sample's ids concatenated and cut into ``samples`` windows of ``seq_len`` (a ``[samples, seq_len]``
    tensor)."""
    columns = list(dataset.column_names)
    if column is None:
        column = "messages" if "messages" in columns else "text" if "text" in columns else None
        if column is None:
            raise InputError(f"{source}: no 'messages' or 'text' column (columns: {', '.join(columns)}); pass "
                             "--column")
    elif column not in columns:
        raise InputError(f"{source}: no column '{column}' (columns: {', '.join(columns)})")
    if samples < 1 or seq_len < 2:
        raise InputError(f"samples must be >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    # packing: enough samples that windows rarely overlap (a few per window)
    picked = dataset.shuffle(seed=seed).select(range(min(samples * (4 if packing else 1), len(dataset))))
    rows: list[list[int]] = []
    for number, value in enumerate(picked[column]):
        if isinstance(value, list):  # chat: a list of {"role", "content"} messages
            if getattr(tokenizer, "chat_template", None) is None:
                raise InputError(f"{source}: column '{column}' holds chat messages but the tokenizer has no chat "
                                 "template (pass --column with a text column, or a tokenizer that has one)")
            value = tokenizer.apply_chat_template(value, tokenize=False)
        if not isinstance(value, str):
            raise InputError(f"{source}: row {number} of column '{column}' is {type(value).__name__}, not text or "
                             "chat messages")
        ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        if ids:
            rows.append(ids if packing else ids[:seq_len])
    if not rows:
        raise InputError(f"{source}: no sample has any token")
    if not packing:
        return rows
    flat = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    return calibration_windows(flat, samples, seq_len, seed)
