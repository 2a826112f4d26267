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
from ..errors import InputError
from ..streams import BlockInputs, StreamEngine, canonical_order

__all__ = ["decoder_layer_order", "final_norm", "CausalCalibration"]


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
    """

    def __init__(self, model: torch.nn.Module, layers: list[str], tokens: CalibrationTokens | None, where: str):
        self.model = model
        self.layers = layers
        self.tokens = tokens
        self.where = where
        self._engine: StreamEngine | None = None

    @classmethod
    def draw(cls, state, layers: list[str], where: str) -> tuple["CausalCalibration", object | None]:
        """The calibration of ``state`` (llm-compressor's ``State``) and its summary (``None`` without data)."""
        model = state.model
        if state.data.calib is None:
            return cls(model, layers, None, where), None
        vocab = model.get_input_embeddings().num_embeddings
        summary, tokens = calibration_tokens(state.data.calib, vocab, f"{where}: calibration dataset")
        return cls(model, layers, tokens, where), summary

    @property
    def engine(self) -> StreamEngine:
        if self._engine is None:
            self._engine = StreamEngine(self.model, self.layers)
        return self._engine

    @property
    def lengths(self) -> torch.Tensor | None:
        return None if self.tokens is None else self.tokens.lengths

    def first_inputs(self, canonical: bool = False) -> torch.Tensor:
        """The hidden states entering the first decoder layer (``[N, T, H]``, CPU). With ``canonical`` the
        sequences are put in :func:`routealign.streams.canonical_order` first (llm-compressor's dataloader shuffles
        them with the global RNG; in a canonical order anything drawn from a seed depends only on the set)."""
        if self.tokens is None:
            raise InputError(f"{self.where}: no calibration data was given (pass dataset= to oneshot)")
        first = self.tokens.first_inputs(self.engine)
        if canonical:
            order = canonical_order(first)
            first = first[order]
            lengths = self.tokens.lengths
            self.tokens = CalibrationTokens(self.tokens.ids[order], None if lengths is None else lengths[order])
        logger.info(f"{self.where}: {self.tokens.describe()}")
        return first

    def inputs(self, layer: str, hidden: torch.Tensor) -> BlockInputs:
        """Layer ``layer``'s inputs: ``hidden`` with its padding lengths and keyword arguments."""
        return self.engine.block_inputs(layer, hidden, self.lengths)

    def layer_kwargs(self, seq_len: int) -> dict[str, dict]:
        return self.engine.layer_kwargs(seq_len)

    def release(self) -> None:
        self.tokens = None
        self._engine = None
