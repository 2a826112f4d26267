"""The calibration sequences routealign's modifiers calibrate on: drawn once from llm-compressor's calibration
dataloader, each sequence's real tokens only, any length, padding (left or right) removed.

Why the modifiers read the data themselves instead of taking it from llm-compressor's sequential pipeline:

- the pipeline calls decoder layers with ``attention_mask=None`` (and eager attention), so nothing a layer hook
  sees says which positions are padding, and the activations it propagates are bidirectional from the second
  layer on (:mod:`routealign.streams` computes both streams itself);
- llm-compressor's default collator cuts every sample of a batch to the batch's shortest (``batch_size > 1``),
  silently dropping calibration tokens.

So :func:`draw_calibration` takes the rows the dataloader's sampler picks, whole (cut only at ``max_seq_length``
where llm-compressor's collator would cut them), once per ``oneshot`` (every routealign modifier of a recipe shares
the draw; the global RNG is left as it was, so the other modifiers of the recipe see the batches they would see
without routealign), and :class:`CalibrationTokens` keeps them right-padded with their lengths. The first decoder layer's
inputs come from the model's own forward on them (:meth:`CalibrationTokens.first_inputs`); a decoder layer is
causal, so on right-padded sequences it computes every real token as on the sequence alone (see
:class:`routealign.streams.BlockInputs` for how padded positions are kept out of losses and statistics).

A custom ``data_collator`` is run as given (its batches are read once, attention masks honoured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .streams import real_tokens
from .validation import ROW_KEY, CalibrationSummary, batch_input_ids, check_calibration, real_span

__all__ = ["draw_calibration", "calibration_tokens", "CalibrationTokens", "windows_dataset", "oneshot_windows"]

_DRAWN = "_routealign_calibration"  # attribute of the dataloader holding the draw


def _known_collator(collate) -> tuple[bool, int | None]:
    """Whether ``collate`` is one of llm-compressor's collators (rows can be read whole) and the length it cuts at."""
    from transformers.data import DataCollatorWithPadding

    try:
        from llmcompressor.datasets.utils import DataCollatorWithTruncation
    except ImportError:  # pragma: no cover - llm-compressor without the class
        DataCollatorWithTruncation = ()
    if isinstance(collate, DataCollatorWithPadding):
        return True, None  # llm-compressor ignores max_seq_length with padding
    if DataCollatorWithTruncation and isinstance(collate, DataCollatorWithTruncation):
        return True, collate.max_seq_length
    return False, None


def draw_calibration(loader: Any) -> list[dict]:
    """The calibration batches, as ``{"input_ids": [b, T], "attention_mask": [b, T] or absent}``, drawn once from
    ``loader`` (llm-compressor's calibration dataloader: the rows its sampler picks, one per batch, whole; any other
    iterable: its batches) and cached on it, so that every routealign modifier of a recipe calibrates on the same
    sequences."""
    cached = getattr(loader, _DRAWN, None)
    if cached is not None:
        return cached
    # under a forked RNG: a shuffling sampler draws its order from torch's global RNG, and the draw must not change
    # the order llm-compressor's pipeline then draws for the other modifiers of the recipe
    with torch.random.fork_rng(devices=[]):
        batches = _draw(loader)
    try:
        setattr(loader, _DRAWN, batches)
    except (AttributeError, TypeError):  # a list or another container without attributes: drawn per call
        pass
    return batches


def _draw(loader: Any) -> list[dict]:
    dataset, sampler = getattr(loader, "dataset", None), getattr(loader, "sampler", None)
    # llm-compressor 0.14.0.1 under torch.distributed with the same dataset on every rank: its sampler indexes this
    # rank's partition (dataset.select(range(start, end))) while the DataLoader keeps the whole dataset, so the
    # loader yields the first partition's rows on every rank; the rows the sampler means are its own data source's
    source = getattr(sampler, "data_source", None)
    if source is not None and dataset is not None and source is not dataset and len(source) != len(dataset):
        dataset = source
    known, limit = _known_collator(getattr(loader, "collate_fn", None))
    if known and dataset is not None and sampler is not None:
        batches = []
        for index in sampler:
            row = dataset[index]
            if not hasattr(row, "get") or row.get("input_ids") is None:
                raise InputError(f"calibration dataset row {index} has no 'input_ids' "
                                 f"(keys: {sorted(row.keys()) if hasattr(row, 'keys') else type(row).__name__})")
            ids = torch.as_tensor(row["input_ids"]).reshape(-1)[:limit]
            batch = {"input_ids": ids.unsqueeze(0), ROW_KEY: int(index)}
            if row.get("attention_mask") is not None:
                batch["attention_mask"] = torch.as_tensor(row["attention_mask"]).reshape(-1)[:limit].unsqueeze(0)
            batches.append(batch)
    else:
        batches = list(loader)
    return batches


def calibration_tokens(loader: Any, vocab_size: int, where: str) -> tuple[CalibrationSummary, "CalibrationTokens"]:
    """What both modifiers do with the calibration data in ``on_initialize``: draw it (:func:`draw_calibration`),
    check it (:func:`routealign.validation.check_calibration`) and keep each row's real tokens."""
    batches = draw_calibration(loader)
    return check_calibration(batches, vocab_size, where=where), CalibrationTokens.from_batches(batches, where)


@dataclass
class CalibrationTokens:
    """Calibration sequences right-padded to the longest (``ids`` ``[N, T]``, pad id 0) and their real
    ``lengths`` (``None`` when all have ``T`` tokens)."""

    ids: torch.Tensor
    lengths: torch.Tensor | None

    @classmethod
    def from_batches(cls, batches: list, where: str) -> "CalibrationTokens":
        """Each row's real tokens (positions where its attention mask is 1; left padding moved to the end)."""
        rows: list[torch.Tensor] = []
        for i, batch in enumerate(batches):
            ids, mask = batch_input_ids(batch, i)
            for r in range(ids.shape[0]):
                if mask is None or bool(mask[r].bool().all()):
                    rows.append(ids[r])
                    continue
                span = real_span(mask[r])
                if span is None or span[0] == span[1]:
                    raise InputError(f"{where}: calibration batch {i} row {r} has no real token or padding between "
                                     "real tokens; only left or right padding is supported (split such a row into one "
                                     "row per run of real tokens). The model has not been modified")
                rows.append(ids[r, span[0] : span[1]])
        if not rows:
            raise InputError(f"{where}: the calibration set is empty")
        lengths = torch.tensor([row.numel() for row in rows])
        longest = int(lengths.max())
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : row.numel()] = row.long()
        return cls(ids, None if bool((lengths == longest).all()) else lengths)

    @property
    def tokens(self) -> int:
        return int(self.ids.numel() if self.lengths is None else self.lengths.sum())

    @torch.no_grad()
    def first_inputs(self, engine, per_pass: int = 8) -> torch.Tensor:
        """The hidden states entering the first decoder layer (``[N, T, H]`` on the CPU, zeros at padded positions),
        from the model's own forward (:meth:`routealign.streams.StreamEngine.capture`)."""
        outs = []
        for start in range(0, self.ids.shape[0], per_pass):
            hidden, _ = engine.capture(self.ids[start : start + per_pass])
            outs.append(hidden.detach().cpu())
        hidden = torch.cat(outs)
        if self.lengths is not None:
            hidden = hidden.masked_fill(~real_tokens(self.lengths, hidden.shape[1]).unsqueeze(-1), 0)
        return hidden

    def describe(self) -> str:
        if self.lengths is None:
            return f"{self.ids.shape[0]} calibration sequences of {self.ids.shape[1]} tokens"
        return (f"{self.ids.shape[0]} calibration sequences of {int(self.lengths.min())}-{int(self.lengths.max())} "
                f"tokens ({self.tokens} in all; padded positions take part in no loss or statistic)")


def windows_dataset(windows: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None = None):
    """A ``datasets.Dataset`` of token windows (``[n, seq_len]``, or rows of any lengths), the form
    ``oneshot(dataset=...)`` takes: ``input_ids`` and ``attention_mask`` columns (all ones unless ``attention_mask``
    is given)."""
    from datasets import Dataset

    if isinstance(windows, list):
        return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(row) for row in windows]})
    mask = torch.ones_like(windows) if attention_mask is None else attention_mask
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": mask.tolist()})


def oneshot_windows(model, recipe, windows: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None = None,
                    **kwargs):
    """llm-compressor's ``oneshot`` of ``model`` with ``recipe`` (a YAML path, a modifier or a list) calibrated on
    every one of ``windows`` (a ``[n, seq_len]`` tensor, or a list of token-id rows of any lengths, e.g. samples
    truncated one by one; ``num_calibration_samples`` = the rows, ``max_seq_length`` = the longest); further keyword
    arguments go to ``oneshot``. Under torch.distributed every rank passes the same ``windows`` and calibrates on its
    part of them. Returns what ``oneshot`` returns."""
    from llmcompressor import oneshot

    from .distributed import shard_bounds, world_size

    rows = len(windows)
    longest = max(len(row) for row in windows) if isinstance(windows, list) else windows.shape[1]
    if world_size() > 1:
        # under torch.distributed each rank passes its own part (llm-compressor's partition of the windows):
        # llm-compressor 0.14.0.1 partitions a dataset every rank shares with a sampler over the part but a loader
        # over the whole, so every rank would calibrate on the first part (its own modifiers too)
        start, end = shard_bounds(rows)
        windows = windows[start:end]
        attention_mask = None if attention_mask is None else attention_mask[start:end]
    return oneshot(model=model, dataset=windows_dataset(windows, attention_mask), recipe=recipe,
                   num_calibration_samples=len(windows), max_seq_length=longest, **kwargs)
