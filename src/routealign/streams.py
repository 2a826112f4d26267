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

import torch
from compressed_tensors.utils import patch_attr
from torch.func import functional_call

from .routing import MoELayer, RouterTap, StopForward

__all__ = ["BlockInputs", "StreamEngine", "plain_forwards", "attention_implementation", "run_block", "to_device",
           "canonical_order"]


@dataclass
class BlockInputs:
    """The calibration inputs of one block: hidden states ``[N, T, H]`` and the keyword arguments shared by all
    sequences (position embeddings, the causal mask)."""

    hidden: torch.Tensor
    kwargs: dict

    @staticmethod
    def from_captured(captured: list[tuple[tuple, dict]], where: str) -> "BlockInputs":
        """Stack what a forward-pre hook captured per calibration batch (the keyword arguments of the first batch;
        callers that run the layer take them from :class:`StreamEngine` instead)."""
        if not captured:
            raise RuntimeError(f"no calibration inputs were captured for {where}")
        hidden = torch.cat([args[0] if args else kw["hidden_states"] for args, kw in captured])
        first = {k: v for k, v in captured[0][1].items() if k != "hidden_states"}
        for args, kw in captured[1:]:
            for key, value in first.items():
                if not _same(value, kw.get(key)):
                    raise ValueError(
                        f"{where}: calibration batches differ in '{key}' (variable-length or padded batches); "
                        "use equal-length calibration sequences (e.g. max_seq_length with packing/truncation)"
                    )
        for key, value in first.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] not in (1,):
                raise ValueError(f"{where}: keyword '{key}' has batch dimension {value.shape[0]}; use batch_size=1")
        return BlockInputs(hidden=hidden, kwargs=first)


@torch.no_grad()
def canonical_order(hidden: torch.Tensor) -> torch.Tensor:
    """An order of the sequences ``hidden`` (``[N, T, H]``) that depends on their contents only, not on the order
    they came in: by a fixed random projection of each sequence (ties, i.e. identical sequences, are harmless)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(hidden.shape[1], hidden.shape[2], generator=generator, dtype=torch.float64)
    keys = (hidden.detach().to("cpu", torch.float64) * weights).sum(dim=(1, 2))
    return torch.argsort(keys, stable=True)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def to_device(value, dtype=None, device=None):
    """``value`` (tensors inside tuples, lists and dicts too) with floating tensors in ``dtype``, on ``device``."""
    if isinstance(value, torch.Tensor):
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
    from llmcompressor.modeling.moe import context as moe_context

    saved = {}
    for sub in module.modules():
        if "forward" in sub.__dict__:
            saved[sub] = sub.__dict__.pop("forward")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(patch_attr(moe_context, "_CALIBRATE_ALL_EXPERTS", all_experts))
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

    def layer_kwargs(self, seq_len: int, batch: int = 1) -> dict[str, dict]:
        """Per decoder layer, the keyword arguments for an unpadded batch of ``batch`` sequences of ``seq_len``."""
        key = (seq_len, batch)
        if key not in self._cache:
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            _, found = self.capture(ids)
            self._cache[key] = {n: {k: (v.detach() if isinstance(v, torch.Tensor) else v)
                                    for k, v in kw.items()} for n, kw in found.items()}
        return self._cache[key]
