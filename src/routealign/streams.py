"""The causal stream engine: a decoder layer run exactly as the model's own forward runs it.

llm-compressor 0.14.0.1's sequential pipeline propagates decoder layers with eager attention and
``attention_mask=None``, which is *bidirectional* attention from the second layer on. Every statistic and every
tuning target routealign computes therefore comes from this engine instead:

- :meth:`StreamEngine.capture` runs the model's own forward (its embeddings, its mask functions, its rotary
  embeddings) with every decoder layer replaced by a stub that records the keyword arguments the model passes it
  and returns its input. So each layer gets *the model's* causal mask for *its* attention type (full, sliding,
  linear/mamba), its position embeddings and position ids, for the batch shape and padding at hand, whatever the
  family; nothing about masks is re-implemented here.
- :func:`plain_forwards` runs a layer's submodules with their class forward (no compressed-tensors fake
  quantization, llm-compressor's all-experts calibration off unless asked) under the attention implementation
  :func:`attention_implementation` chooses: SDPA where it computes the model's function (faster, forward and
  backward), eager where it does not (GPT-OSS: SDPA drops the attention sinks).
- :func:`run_block` is one forward of a layer with given (float32) parameters, optionally with router taps,
  batched experts and activation-quantization hooks; both the unquantized and the quantized stream go through it.

A layer run in eager attention without a mask would attend bidirectionally; :func:`run_block` refuses that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.weak
from compressed_tensors.utils import patch_attr
from torch.func import functional_call

from .routing import MoELayer, RouterTap, StopForward

__all__ = ["BlockInputs", "StreamEngine", "plain_forwards", "attention_implementation", "run_block", "to_device",
           "canonical_order", "real_tokens"]


@dataclass
class BlockInputs:
    """The calibration inputs of one block: hidden states ``[N, T, H]`` and the keyword arguments the model's
    forward gives the block for an unpadded batch of length ``T``.

    Sequences of different lengths are stored right-padded to the longest (zeros after the last token) with their
    ``lengths``. A decoder layer is causal: run on a right-padded sequence with the unpadded keyword arguments it
    computes every real token as it computes it on the sequence alone (a token attends to, and a mamba scan carries,
    only earlier positions); the padded positions compute values that nothing real depends on. Losses and errors
    leave them out with :meth:`mask`; statistics taken by hooks inside a layer (activation maxima, smoothing
    statistics) run the sequences cut to their length instead (:meth:`by_length`), with ``kwargs_for(length)``.
    """

    hidden: torch.Tensor
    kwargs: dict
    lengths: torch.Tensor | None = None  # [N] real tokens per sequence; None: all T
    kwargs_for: Callable[[int], dict] | None = None  # the block's keyword arguments for a shorter unpadded length

    @property
    def padded(self) -> bool:
        """Whether any sequence is shorter than ``T``."""
        return self.lengths is not None and bool((self.lengths < self.hidden.shape[1]).any())

    def mask(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor | None:
        """``[n, T]`` bool, True at real tokens, for the sequences ``idx`` (all by default); ``None`` when no
        sequence is padded (callers then take every position, the unpadded code path)."""
        if not self.padded:
            return None
        return real_tokens(self.lengths if idx is None else self.lengths[idx], self.hidden.shape[1])

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        """The same sequences (lengths, keyword arguments) with other hidden states (the other stream)."""
        return BlockInputs(hidden, self.kwargs, self.lengths, self.kwargs_for)

    def by_length(self, per_pass: int = 8):
        """``(indices, hidden [n, L, H], kwargs for L)`` over the sequences, in passes of at most ``per_pass`` sequences
        of one real length ``L``, cut to it (no padded position); in order when nothing is padded."""
        n, seq = self.hidden.shape[:2]
        if not self.padded:
            for start in range(0, n, per_pass):
                idx = torch.arange(start, min(start + per_pass, n))
                yield idx, self.hidden[start : start + per_pass], self.kwargs
            return
        if self.kwargs_for is None:
            raise RuntimeError("padded calibration inputs need kwargs_for (keyword arguments per length)")
        for length in sorted(set(self.lengths.tolist())):
            same = torch.nonzero(self.lengths == length).flatten()
            kwargs = self.kwargs if length == seq else self.kwargs_for(length)
            for start in range(0, same.numel(), per_pass):
                idx = same[start : start + per_pass]
                yield idx, self.hidden[idx, :length], kwargs


def real_tokens(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` bool, True at the first ``lengths[i]`` positions of each right-padded sequence."""
    return torch.arange(seq_len).view(1, -1) < lengths.view(-1, 1)


@torch.no_grad()
def canonical_order(hidden: torch.Tensor) -> torch.Tensor:
    """An order of the sequences ``hidden`` (``[N, T, H]``) that depends on their contents only, not on the order
    they came in: by a fixed random projection of each sequence (ties, i.e. identical sequences, are harmless)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(hidden.shape[1], hidden.shape[2], generator=generator, dtype=torch.float64)
    keys = (hidden.detach().to("cpu", torch.float64) * weights).sum(dim=(1, 2))
    return torch.argsort(keys, stable=True)


# float32 values of keyword-argument tensors a lower-precision model rounds (its rotary position embeddings: computed
# in float32, returned in the model's dtype); the float32 forwards take these (to_device), the model's own the rounded
_EXACT = torch.utils.weak.WeakIdKeyDictionary()


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "RotaryEmbedding" in type(m).__name__]


def _keep_exact(module: torch.nn.Module):
    """``module.forward`` that also computes its outputs from a float32 input and keeps them (:data:`_EXACT`)."""
    original = module.forward

    def forward(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
            exact = original(x.float(), *args, **kwargs)
            for low, high in zip(out, exact):
                if isinstance(low, torch.Tensor) and isinstance(high, torch.Tensor):
                    _EXACT[low] = high
        return out

    return forward


def _detached(value):
    """``value`` detached (inside tuples too), keeping any float32 value it has (:data:`_EXACT`)."""
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    out = value.detach()
    if value in _EXACT:
        _EXACT[out] = _EXACT[value]
    return out


def to_device(value, dtype=None, device=None):
    """``value`` (tensors inside tuples, lists and dicts too) with floating tensors in ``dtype``, on ``device``. In
    float32, a rotary embedding a bf16 model rounded is its float32 value (the float32 forwards of the tuning emulate
    the model without the rounding of its keyword arguments: measured on tiny-qwen3_moe W4A16, bf16 rotary
    embeddings cost 0.2 perplexity after learned rounding)."""
    if isinstance(value, torch.Tensor):
        if dtype == torch.float32 and value in _EXACT:
            value = _EXACT[value]
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.to(device) if device is not None else value
    if isinstance(value, tuple):
        return tuple(to_device(v, dtype, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, dtype, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, dtype, device) for k, v in value.items()}
    return value


def attention_implementation(module: torch.nn.Module) -> str:
    """``eager`` where SDPA would compute another function than the model (attention sinks, GPT-OSS), else
    ``sdpa`` (the same attention as eager with the same mask, several times faster forward and backward)."""
    for sub in module.modules():
        if isinstance(getattr(sub, "sinks", None), torch.Tensor):
            return "eager"
    return "sdpa"


def _configs(module: torch.nn.Module) -> list:
    seen: dict[int, object] = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen[id(config)] = config
    return list(seen.values())


@contextlib.contextmanager
def _attention(module: torch.nn.Module, implementation: str):
    with contextlib.ExitStack() as stack:
        for config in _configs(module):
            stack.enter_context(patch_attr(config, "_attn_implementation", implementation))
        yield


@contextlib.contextmanager
def plain_forwards(module: torch.nn.Module, all_experts: bool = False, attn_implementation: str | None = None):
    """Run ``module``'s submodules with their class forward (no compressed-tensors fake quantization, no
    activation quantization), without llm-compressor's all-experts calibration (unless ``all_experts``: every
    expert runs on every token, the block output still combines only the routed ones), under
    ``attn_implementation`` (default :func:`attention_implementation`)."""
    from .compat import calibrate_all_experts

    saved = {}
    for sub in module.modules():
        if "forward" in sub.__dict__:
            saved[sub] = sub.__dict__.pop("forward")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(calibrate_all_experts(all_experts))
            stack.enter_context(_attention(module, attn_implementation or attention_implementation(module)))
            yield
    finally:
        for sub, fwd in saved.items():
            sub.forward = fwd


def run_block(module: torch.nn.Module, params: dict, hidden: torch.Tensor, kwargs: dict,
              layers: list[MoELayer] = (), stop_after: bool = False, all_experts: bool = False,
              extra: contextlib.AbstractContextManager | None = None, force: dict | None = None):
    """One forward of ``module`` with ``params`` (``functional_call``; ``None``: its own parameters, a plain call,
    which also works on offloaded modules) on ``hidden`` with ``kwargs``; returns
    ``(output or None when stopped after the last of layers' routers, {layer name: router logits with grad})``.
    ``extra`` is entered around the call (batched experts, activation-quantization hooks); ``force`` maps layer names
    to ``[T, k]`` expert indices their routers return instead of their own."""
    implementation = attention_implementation(module)
    if implementation == "eager" and kwargs.get("attention_mask") is None and hidden.shape[1] > 1:
        raise ValueError(
            f"{type(module).__name__}: eager attention without an attention mask would attend bidirectionally; "
            "take the layer's keyword arguments from routealign.streams.StreamEngine"
        )
    out = None
    with RouterTap(list(layers), force=force, detach=False, stop_after=stop_after) as tap:
        try:
            with plain_forwards(module, all_experts, implementation), (extra or contextlib.nullcontext()):
                if params is None:
                    out = module(hidden, **kwargs)
                else:
                    out = functional_call(module, params, (hidden,), kwargs, strict=False)
            out = out[0] if isinstance(out, tuple) else out
        except StopForward:
            pass
    return out, tap.logits


class _Captured(Exception):
    pass


class StreamEngine:
    """The keyword arguments the model's own forward gives each decoder layer, and the first layer's input.

    ``layer_names`` are the decoder layers in order (module paths). ``capture(ids, attention_mask)`` runs the model's
    forward with the layers stubbed out (cheap: embeddings, masks and rotary embeddings only), under the attention
    implementation each layer is run in, and returns ``(first layer input, {layer name: kwargs})``. Keyword
    arguments depend only on the batch shape and padding, so :meth:`layer_kwargs` caches them by shape for unpadded
    batches.
    """

    cached_shapes = 4

    def __init__(self, model: torch.nn.Module, layer_names: list[str]):
        self.model = model
        self.layer_names = list(layer_names)
        self._cache: dict[tuple, dict[str, dict]] = {}

    def implementation(self) -> str:
        return attention_implementation(self.model.get_submodule(self.layer_names[0]))

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, dict]]:
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        layers = {name: self.model.get_submodule(name) for name in self.layer_names}
        found: dict[str, dict] = {}
        first: list[torch.Tensor] = []
        last = self.layer_names[-1]

        def stub(name):
            def forward(hidden_states, *args, **kwargs):
                if args:
                    raise RuntimeError(f"{name}: the model passes positional arguments {len(args)} to its layers; "
                                       "routealign expects keyword arguments after the hidden states")
                if not first:
                    first.append(hidden_states)
                found[name] = {k: v for k, v in kwargs.items()}
                if name == last:
                    raise _Captured
                return hidden_states

            return forward

        base = getattr(self.model, getattr(self.model, "base_model_prefix", "model"), self.model)
        with contextlib.ExitStack() as stack:
            stack.enter_context(HooksMixin.disable_hooks())
            stack.enter_context(_attention(self.model, self.implementation()))
            for name, layer in layers.items():
                stack.enter_context(patch_attr(layer, "forward", stub(name)))
            for rotary in _rotary_modules(self.model):
                stack.enter_context(patch_attr(rotary, "forward", _keep_exact(rotary)))
            device = next(p.device for p in self.model.get_input_embeddings().parameters())
            try:
                base(input_ids=input_ids.to(device), attention_mask=None if attention_mask is None
                     else attention_mask.to(device), use_cache=False)
            except _Captured:
                pass
        missing = [n for n in self.layer_names if n not in found]
        if missing:
            raise RuntimeError(f"the model's forward did not call decoder layers {missing}")
        return first[0], found

    def block_inputs(self, name: str, hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> BlockInputs:
        """Calibration inputs of decoder layer ``name``: ``hidden`` (right-padded to ``T``, real ``lengths``) with the
        layer's keyword arguments for ``T`` and, for sequences cut to a shorter length, for that length."""
        return BlockInputs(hidden, self.layer_kwargs(hidden.shape[1])[name], lengths,
                           lambda length: self.layer_kwargs(length)[name])

    def layer_kwargs(self, seq_len: int, batch: int = 1) -> dict[str, dict]:
        """Per decoder layer, the keyword arguments for an unpadded batch of ``batch`` sequences of ``seq_len``."""
        key = (seq_len, batch)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # most recently used last
        else:
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            _, found = self.capture(ids)
            self._cache[key] = {n: {k: _detached(v) for k, v in kw.items()} for n, kw in found.items()}
            while len(self._cache) > self.cached_shapes:  # variable-length data: masks of many lengths
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]
