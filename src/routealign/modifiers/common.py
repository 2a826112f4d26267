"""What both routealign modifiers share: the decoder-layer order, one calibration draw, the causal stream engine and
the first layer's inputs, and cleanup.

Both modifiers compute every statistic and every target from their own causal stream (:mod:`routealign.streams`),
never from llm-compressor's sequential pipeline, which in 0.14.0.1 runs decoder layers with eager attention and
``attention_mask=None`` (bidirectional from the second layer on). :class:`CausalCalibration` is that stream's
starting point: the calibration sequences (:mod:`routealign.calibration`, drawn once per ``oneshot`` and shared by
every routealign modifier of a recipe), the model's own forward up to the first decoder layer, and the keyword
arguments (causal mask, position embeddings) each decoder layer gets.
"""

from __future__ import annotations

import torch
from loguru import logger

from llmcompressor.utils.pytorch import infer_sequential_targets

from ..calibration import CalibrationTokens, calibration_tokens
from ..distributed import shard_bounds, world_size
from ..errors import InputError
from ..streams import BlockInputs, StreamEngine, canonical_order

__all__ = ["decoder_layer_order", "final_norm", "CausalCalibration", "gather_tokens"]


def decoder_layer_order(model: torch.nn.Module, sequential_targets=None) -> list[str]:
    """Names of the decoder layers llm-compressor's sequential pipeline runs one by one, in model order."""
    classes = set(infer_sequential_targets(model, sequential_targets=sequential_targets))
    return [n for n, m in model.named_modules() if type(m).__name__ in classes]


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm between the last decoder layer and the LM head, where transformers models keep it."""
    base = getattr(model, "model", model)
    for attr in ("norm", "norm_f", "final_layernorm"):
        module = getattr(base, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


class CausalCalibration:
    """The calibration sequences of one ``oneshot`` and the model's own causal stream over them.

    ``CausalCalibration.draw(state, layers, where)`` in ``on_initialize`` draws and checks the data (``None`` when
    ``oneshot`` got none: the error comes when a layer needs inputs, as llm-compressor's own modifiers do);
    :meth:`first_inputs` in the first sequential epoch runs the model up to its first decoder layer;
    :meth:`inputs` gives a layer its inputs with that layer's keyword arguments; :meth:`release` drops the engine
    and the tokens at the end of calibration.

    Under torch.distributed (llm-compressor's data-parallel ``oneshot``: each rank's dataloader holds its part of the
    calibration set) :meth:`draw` gathers every rank's sequences, so each rank knows the whole set; in its canonical
    order (:func:`routealign.streams.canonical_order`, independent of how the ranks split it) a modifier either
    keeps all of it (``first_inputs(shard=False)``) or only this rank's contiguous part (``shard=True``:
    :attr:`offset` is the global index of its first sequence, :attr:`total` the size of the whole set).
    """

    def __init__(self, model: torch.nn.Module, layers: list[str], tokens: CalibrationTokens | None, where: str):
        self.model = model
        self.layers = layers
        self.tokens = tokens
        self.where = where
        self._engine: StreamEngine | None = None
        self.offset = 0
        self.total = 0 if tokens is None else tokens.ids.shape[0]

    @classmethod
    def draw(cls, state, layers: list[str], where: str) -> tuple["CausalCalibration", object | None]:
        """The calibration of ``state`` (llm-compressor's ``State``) and its summary (``None`` without data)."""
        model = state.model
        if state.data.calib is None:
            return cls(model, layers, None, where), None
        vocab = model.get_input_embeddings().num_embeddings
        summary, tokens = calibration_tokens(state.data.calib, vocab, f"{where}: calibration dataset")
        if world_size() > 1:
            tokens = gather_tokens(tokens)
        return cls(model, layers, tokens, where), summary

    @property
    def engine(self) -> StreamEngine:
        if self._engine is None:
            self._engine = StreamEngine(self.model, self.layers)
        return self._engine

    @property
    def lengths(self) -> torch.Tensor | None:
        return None if self.tokens is None else self.tokens.lengths

    def first_inputs(self, canonical: bool = False, shard: bool = False) -> torch.Tensor:
        """The hidden states entering the first decoder layer (``[N, T, H]``, CPU). With ``canonical`` the
        sequences are put in :func:`routealign.streams.canonical_order` first (llm-compressor's dataloader shuffles
        them with the global RNG; in a canonical order anything drawn from a seed depends only on the set). With
        ``shard`` under torch.distributed only this rank's part of that order is kept (needs ``canonical``)."""
        if self.tokens is None:
            raise InputError(f"{self.where}: no calibration data was given (pass dataset= to oneshot)")
        if shard and not canonical:
            raise ValueError("first_inputs: shard needs canonical (a rank's part is a part of the canonical order)")
        first = self.tokens.first_inputs(self.engine)
        if canonical:
            order = canonical_order(first)
            if shard and world_size() > 1:
                start, end = shard_bounds(order.numel())
                order, self.offset = order[start:end], start
            first = first[order]
            lengths = self.tokens.lengths
            self.tokens = CalibrationTokens(self.tokens.ids[order], None if lengths is None else lengths[order])
        rank_part = (f" (this rank: {first.shape[0]} of them, from {self.offset})"
                     if world_size() > 1 and first.shape[0] < self.total else "")
        logger.info(f"{self.where}: {self.tokens.describe()}{rank_part}")
        return first

    def inputs(self, layer: str, hidden: torch.Tensor) -> BlockInputs:
        """Layer ``layer``'s inputs: ``hidden`` with its padding lengths and keyword arguments."""
        return self.engine.block_inputs(layer, hidden, self.lengths)

    def layer_kwargs(self, seq_len: int) -> dict[str, dict]:
        return self.engine.layer_kwargs(seq_len)

    def release(self) -> None:
        self.tokens = None
        self._engine = None


def gather_tokens(tokens: CalibrationTokens) -> CalibrationTokens:
    """Every rank's calibration sequences, in rank order, on every rank (right-padded to the longest)."""
    import torch.distributed as dist

    parts: list = [None] * world_size()
    dist.all_gather_object(parts, (tokens.ids, tokens.lengths))
    rows = []
    for ids, lengths in parts:
        for r in range(ids.shape[0]):
            rows.append(ids[r] if lengths is None else ids[r, : int(lengths[r])])
    lengths = torch.tensor([row.numel() for row in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : row.numel()] = row
    return CalibrationTokens(ids, None if bool((lengths == lengths.max()).all()) else lengths)
