"""One block-forward engine per decoder layer: :class:`BlockRunner` runs a block (and what follows it: the layers up
to the next router, or the rest of the model to the LM head) with float32 parameters on the calibration streams.

Everything that forwards a block goes through it: the tuning iterations, the held-out evaluations, the unquantized
targets, the routed-token counts and activation maxima, and the propagation of the quantized stream. It converts
parameters and keyword arguments to float32 once, applies the batched experts, and simulates input-activation
quantization (NVFP4) inside the block when asked (:meth:`BlockRunner.simulating`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from compressed_tensors.quantization import QuantizationStrategy
from torch.func import functional_call

from .distributed import all_reduce, world_size
from .experts import batched_experts, input_quantization_plans
from .routing import find_moe_layers
from .schemes import ActivationQuantizer, input_global_scale
from .streams import BlockInputs, run_block, to_device
from .validation import check_finite

__all__ = ["BlockRunner", "LMTail", "float_params"]


@dataclass
class LMTail:
    """The rest of the model after a block, run unquantized for decisions at the LM head (``holdout.decide_on:
    lm_head``): the later decoder layers with their keyword arguments, the final norm and the LM head. They are run
    one module at a time, each inside ``onload(module)`` (the modifier's: compressed-tensors' onloading with the
    offloading taken off; default: nothing), so a model larger than the accelerator is never on it whole."""

    layers: list[torch.nn.Module]
    kwargs: list[dict]
    norm: torch.nn.Module | None
    head: torch.nn.Module
    onload: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None

    def onloaded(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        return self.onload(module) if self.onload is not None else contextlib.nullcontext()


def float_params(module: torch.nn.Module, skip_experts: bool = False, exclude=()) -> dict[str, torch.Tensor]:
    """float32 copies of ``module``'s floating parameters and buffers, quantization parameters and the names in
    ``exclude`` left out; with ``skip_experts`` not those of its linearized experts containers (the batched experts
    read their weights in their own dtype and convert one projection at a time: no float32 copy of every expert)."""
    skipped = ()
    if skip_experts:
        from .experts import supports_batching

        skipped = tuple(f"{n}." for n, m in module.named_modules() if n and supports_batching(m))
    out = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if (skipped and name.startswith(skipped)) or name in exclude:
            continue
        if tensor.is_floating_point() and not leaf.startswith(("weight_", "input_", "output_")):
            out[name] = tensor.detach().float()
    return out


class BlockRunner:
    """Forwards of ``block`` and of what follows it, in float32.

    ``downstream``: the following decoder layers up to and including the first one that routes (its routers are the
    "next routers"), with ``downstream_kwargs`` their keyword arguments (default: the block's own, given per call).
    ``output_norm``: the model's final norm, for the last block (its output is read only through it). ``lm_tail``:
    the rest of the model, for next-token distributions (:meth:`tail_logprobs`). ``activations``: input-activation
    quantization args of the targets whose inputs are quantized (NVFP4).
    """

    def __init__(self, block: torch.nn.Module, downstream: list[torch.nn.Module] = (),
                 downstream_kwargs: list[dict] | None = None, output_norm: torch.nn.Module | None = None,
                 lm_tail: LMTail | None = None, activations: dict | None = None, batched: bool = True,
                 name: str = "block"):
        self.block = block
        self.name = name
        self.device = next(block.parameters()).device
        self.batched = batched
        self.activations = dict(activations or {})
        self.chain = list(downstream)
        self.next_block = self.chain[-1] if self.chain else None
        if downstream_kwargs is not None and len(downstream_kwargs) != len(self.chain):
            raise ValueError(f"{name}: {len(downstream_kwargs)} keyword sets for {len(self.chain)} downstream layers")
        self.own_layers = find_moe_layers(block, require=False)
        self.next_layers = find_moe_layers(self.next_block, require=False) if self.chain else []
        self.output_norm = output_norm
        self.lm_tail = lm_tail
        self._quantizers: dict[str, ActivationQuantizer] = {}  # inputs fake-quantized while simulating
        self._plans: dict = {}  # experts.input_quantization_plans of _quantizers
        self._kwargs: tuple[dict, dict] | None = None  # (kwargs, their float32 copy on the device)
        # float32 on the block's device once, not on every forward
        self._next_kw32 = (None if downstream_kwargs is None
                           else [to_device(kw, torch.float32, self.device) for kw in downstream_kwargs])
        self._next32 = [float_params(b, skip_experts=batched) for b in self.chain]
        self._norm32 = float_params(output_norm) if output_norm is not None else {}
        if lm_tail is not None:
            self._tail_kw32 = [to_device(kw, torch.float32, self.device) for kw in lm_tail.kwargs]

    def kwargs32(self, kwargs: dict) -> dict:
        """``kwargs`` with floating tensors in float32 on the block's device (converted once per keyword set)."""
        if self._kwargs is None or self._kwargs[0] is not kwargs:
            self._kwargs = (kwargs, to_device(kwargs, torch.float32, self.device))
        return self._kwargs[1]

    # -- forwards -----------------------------------------------------------------------------------------
    def run(self, module, params, hidden, kwargs, layers, stop_after: bool = False, all_experts: bool = False,
            batched: bool | None = None, force: dict[str, torch.Tensor] | None = None, stacked: dict | None = None):
        """Forward ``module`` with ``params`` (:func:`routealign.streams.run_block`); returns (output, or None when
        stopped after the last of ``layers``' routers, and their logits by layer name, with gradients). ``stacked``
        maps experts containers to ``{projection:`` :class:`~routealign.experts.Stacked` ``}``: the batched experts
        use them as they are; a container that runs llm-compressor's per-expert loop gets per-expert views."""
        batched = self.batched if batched is None else batched
        acting = module is self.block and bool(self._quantizers)
        if stacked:
            looped = [c for c in stacked if not (batched and not all_experts
                                                  and (not acting or self._plans.get(c, {}) is not None))]
            if looped:
                params = dict(params)
                names = {id(m): n for n, m in module.named_modules()}
                for container in looped:
                    prefix = names[id(container)]
                    for proj, projection in stacked[container].items():
                        weight = projection.dense()
                        weight = weight if weight.dtype == hidden.dtype or torch.is_autocast_enabled(
                            hidden.device.type) else weight.to(hidden.dtype)
                        for e, view in enumerate(weight.unbind(0)):
                            params[f"{prefix}.{e}.{proj}.weight" if prefix else f"{e}.{proj}.weight"] = view

        @contextlib.contextmanager
        def extra():
            with contextlib.ExitStack() as stack:
                if batched and not all_experts:
                    # the batched experts bypass the expert Linear modules where the activation hooks sit, so they
                    # apply those quantizers themselves
                    stack.enter_context(batched_experts(module, self._plans if acting else None, stacked))
                if acting:
                    stack.enter_context(self._activation_hooks())
                yield

        # entered inside run_block, after plain_forwards (which removes instance forwards: entered before it, the
        # batched experts' forward would be removed and llm-compressor's per-expert loop would run instead)
        return run_block(module, params, hidden, kwargs, layers, stop_after=stop_after, all_experts=all_experts,
                         extra=extra(), force=force)

    def run_next(self, y: torch.Tensor, kwargs: dict, stop_after: bool,
                 force: dict[str, torch.Tensor] | None = None):
        """The downstream layers (unquantized) on ``y``: (output of the last, or None when stopped after its
        routers, and its routers' logits). ``force``: expert indices the next routers return instead of their own."""
        h, logits = y, {}
        for i, (module, params) in enumerate(zip(self.chain, self._next32)):
            kw = kwargs if self._next_kw32 is None else self._next_kw32[i]
            last = i == len(self.chain) - 1
            h, logits = self.run(module, params, h, kw, self.next_layers if last else [],
                                 stop_after=stop_after and last, force=force if last else None)
        return h, logits

    def next_choices(self, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next routers' own expert indices from their ``logits``."""
        return {l.name: l.family.route(l.router, logits[l.name]).indices for l in self.next_layers if l.name in logits}

    def tail_logprobs(self, ys: list[torch.Tensor], force: list[dict[str, torch.Tensor]] | None = None,
                      route: bool = False) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Log-probabilities of the next token after each of ``ys`` (this block's outputs, one per pass of
        sequences) through the rest of the model, unquantized; ``force``: per pass, expert indices the next
        routers return instead of their own; with ``route`` also the next routers' own choices per pass. The rest
        of the model runs one module at a time (:class:`LMTail`: onloaded, converted to float32 and dropped again),
        each on every pass."""
        tail = self.lm_tail
        hs, chosen = list(ys), [{} for _ in ys]
        for module, kw in zip(tail.layers, self._tail_kw32):
            routing = module is self.next_block
            layers = self.next_layers if routing else []
            with tail.onloaded(module):
                params = self._next32[-1] if routing else float_params(module, skip_experts=self.batched)
                for i, h in enumerate(hs):
                    hs[i], logits = self.run(module, params, h, kw, layers,
                                             force=force[i] if routing and force is not None else None)
                    if routing and route:
                        chosen[i] = self.next_choices(logits)
        for module in (tail.norm, tail.head):
            if module is None:
                continue
            with tail.onloaded(module):
                params = float_params(module)
                hs = [functional_call(module, params, (h,)) for h in hs]
        return [torch.log_softmax(h.float(), dim=-1) for h in hs], chosen

    def normed(self, y: torch.Tensor) -> torch.Tensor:
        """The last block's output is read only through the model's final norm: measure its error there."""
        if self.output_norm is None:
            return y
        return functional_call(self.output_norm, self._norm32, (y,))

    def passes(self, inputs: BlockInputs, per_pass: int = 8):
        """``(float32 hidden of a pass, float32 kwargs, real-token mask or None)`` over the calibration sequences in
        order, on the block's device (padded sequences stay padded: for values, not for statistics taken by hooks,
        see :meth:`BlockInputs.by_length`)."""
        kwargs = self.kwargs32(inputs.kwargs)
        mask = inputs.mask()
        for start in range(0, inputs.hidden.shape[0], per_pass):
            yield (inputs.hidden[start : start + per_pass].to(self.device, torch.float32), kwargs,
                   None if mask is None else mask[start : start + per_pass].to(self.device))

    # -- input activations (NVFP4) ------------------------------------------------------------------------
    @contextlib.contextmanager
    def simulating(self, quantizers: dict[str, ActivationQuantizer]):
        """Inside, the block's forwards fake-quantize the inputs of the targets in ``quantizers``."""
        modules = dict(self.block.named_modules())
        self._quantizers = quantizers
        # what the batched experts apply, worked out once rather than on every forward
        self._plans = input_quantization_plans(self.block, {modules[n]: q for n, q in quantizers.items()})
        try:
            yield
        finally:
            self._quantizers, self._plans = {}, {}

    @contextlib.contextmanager
    def _activation_hooks(self):
        modules = dict(self.block.named_modules())
        handles = [modules[n].register_forward_pre_hook(lambda mod, args, quant=quant: (quant(args[0]), *args[1:]))
                   for n, quant in self._quantizers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def activation_quantizers(self, q: BlockInputs, scales: dict | None = None,
                              all_tokens: bool = True) -> dict[str, ActivationQuantizer]:
        """Straight-through activation fake quantizers of the targets with quantized inputs, with the global scales
        ``scales`` (default: :meth:`input_global_scales` on ``q`` with the block's current weights)."""
        if scales is None:
            scales = self.input_global_scales(q, list(self.activations), all_tokens)
        return {n: ActivationQuantizer(args, scales.get(n)) for n, args in self.activations.items()
                if args.strategy != QuantizationStrategy.TENSOR_GROUP or n in scales}

    @torch.no_grad()
    def input_global_scales(self, q: BlockInputs, names: list[str], all_tokens: bool) -> dict[str, torch.Tensor]:
        """NVFP4 input global scales (float32 ``[1]``, compressed-tensors' ``generate_gparam``) of ``names`` from
        the largest input each sees on the quantized stream: every token (``all_tokens``) or only the routed ones. An
        expert that saw no routed token takes the largest value among the same projection of the other experts. A
        non-finite scale is refused (:func:`routealign.schemes.input_global_scale`)."""
        if not names:
            return {}
        amax = self.routed_input_amax(q, names, all_tokens=all_tokens)
        by_leaf: dict[str, torch.Tensor] = {}
        for n, value in amax.items():
            leaf = n.rsplit(".", 1)[-1]
            by_leaf[leaf] = torch.maximum(by_leaf[leaf], value) if leaf in by_leaf else value
        scales = {}
        for n in names:
            value = amax.get(n, by_leaf.get(n.rsplit(".", 1)[-1]))
            if value is not None:
                scales[n] = input_global_scale(value, f"{self.name}.{n}")
        return scales

    @torch.no_grad()
    def routed_input_amax(self, q: BlockInputs, names: list[str], per_pass: int = 8,
                          all_tokens: bool = False) -> dict[str, torch.Tensor]:
        """Largest absolute input each named module sees when the block (with its current weights) runs on the
        quantized stream; experts see only their routed tokens (``all_tokens``: every token, as under
        llm-compressor's all-experts calibration). Modules that see no token are absent."""
        modules = dict(self.block.named_modules())
        params = float_params(self.block)
        amax: dict[str, torch.Tensor] = {}

        def hook(mod, args, n):
            value = args[0].detach().abs().amax() if args[0].numel() else None
            if value is not None:
                amax[n] = torch.maximum(amax[n], value) if n in amax else value

        handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n in names]
        try:
            # every sequence cut to its real length: a hook inside the block cannot tell a padded token from a real one
            for _, h, kwargs in q.by_length(per_pass):
                kwargs = self.kwargs32(kwargs)
                h = h.to(self.device, torch.float32)
                self.run(self.block, params, h, kwargs, [], all_experts=all_tokens, batched=False)  # hooks
        finally:
            for h in handles:
                h.remove()
        if world_size() > 1:  # the largest input on any rank: every rank writes the same activation global scales
            values = [amax[n].float() if n in amax else torch.zeros((), device=self.device) for n in names]
            amax = {n: v for n, v in zip(names, all_reduce(values, op="max")) if float(v) > 0}
        return amax

    # -- the quantized stream -----------------------------------------------------------------------------
    @torch.no_grad()
    def propagate(self, q: BlockInputs, quantizers: dict[str, ActivationQuantizer] | None = None,
                  per_pass: int = 8) -> torch.Tensor:
        """The block's output with its current (written) weights and, with ``quantizers``, its quantized input
        activations, on the quantized stream: the next block's quantized-stream input (in the input dtype)."""
        params = float_params(self.block)
        outs = []
        with self.simulating(quantizers or {}):
            for h, kwargs, valid in self.passes(q, per_pass):
                y, _ = self.run(self.block, params, h, kwargs, [])
                y = y if valid is None else y.masked_fill(~valid.unsqueeze(-1), 0)  # padded positions: zeros
                outs.append(y.to(q.hidden.dtype).to(q.hidden.device))
        out = torch.cat(outs)
        check_finite(out, f"{self.name}: the quantized layer's output")
        return out
