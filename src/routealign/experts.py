"""Batched forward of llm-compressor's linearized experts, for the tuning loop.

llm-compressor's ``LinearExperts2D.forward`` loops over the experts in Python: per expert a ``torch.where``, a
gather, three ``Linear`` calls and an ``index_add_`` (forward and backward), i.e. ~10 small kernels per expert per
layer per iteration. :func:`batched_forward` computes the same thing with the experts stacked: tokens sorted by
expert once, one grouped GEMM per projection over the sorted tokens (or, where torch's grouped GEMM would loop, a
batched matmul over tokens padded to ``[E, C, h]``; :func:`layout`), one scatter-add. The stacked ``[E, out, in]``
weights are the tuner's (its fake-quantized stacks, set on the container by :func:`batched_experts`) or the experts'
own; gradients flow back to the stacks. The number of operations does not grow with the number of experts.

Used only where no hook needs to see the per-expert ``Linear`` calls (the tuning iterations, the unquantized
targets, the propagation); statistics that hook expert modules keep llm-compressor's loop. Simulated input-activation
quantization (NVFP4), which the loop applies in hooks on the expert ``Linear`` modules, is applied here to the
stacked tokens in one call, each row under its expert's global scale (:func:`input_quantizers`).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .accelerator import piece_elements, expert_layout

__all__ = ["batched_forward", "batched_experts", "input_quantizers", "input_quantization_plans",
           "StackedInputQuantizer", "supports_batching", "layout", "Stacked", "Parts"]

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def supports_batching(experts: torch.nn.Module) -> bool:
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    return isinstance(experts, LinearExperts2D) and all(
        hasattr(experts[e], "down_proj") and hasattr(experts[e], "up_proj") for e in range(experts.num_experts)
    )


@dataclass(frozen=True)
class StackedInputQuantizer:
    """One projection's input quantization for all experts at once: their common quantization args (the first
    expert's quantizer) and their global scales stacked ``[E]`` (``None``: no global scales)."""

    quantizer: Any
    scales: torch.Tensor | None

    def __call__(self, x: torch.Tensor, experts_of_rows: torch.Tensor, padded: bool) -> torch.Tensor:
        """``x`` (expert-sorted ``[tokens, h]`` or padded ``[E, C, h]``) fake-quantized, each row under the global
        scale of its expert (``experts_of_rows``: the expert of each sorted token)."""
        if self.scales is None:
            return self.quantizer(x)
        scales = self.scales.to(x.device)
        return self.quantizer(x, scales[:, None] if padded else scales[experts_of_rows])


def input_quantizers(experts: torch.nn.Module, quantizers: dict) -> dict[str, StackedInputQuantizer] | None:
    """Per projection, the experts' input-activation quantizers (``quantizers`` maps modules to
    :class:`~routealign.schemes.ActivationQuantizer`), when the batched forward can apply them to stacked tokens
    with the same result as each expert's own: all experts or none of a projection quantized, with per-group
    scales (a group never spans two tokens) and either all or no global scales. ``None``: not batchable."""
    from compressed_tensors.quantization import QuantizationStrategy

    out = {}
    for proj in _PROJECTIONS:
        if not hasattr(experts[0], proj):
            continue
        qs = [quantizers.get(getattr(experts[e], proj)) for e in range(experts.num_experts)]
        if all(q is None for q in qs):
            continue
        if any(q is None for q in qs):
            return None
        if any(q.args != qs[0].args for q in qs) or qs[0].args.strategy not in (
                QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
            return None
        with_scale = [q.global_scale is not None for q in qs]
        if any(with_scale) and not all(with_scale):
            return None
        scales = torch.stack([q.global_scale.reshape(()) for q in qs]) if all(with_scale) else None
        out[proj] = StackedInputQuantizer(qs[0], scales)
    gate, up = out.get("gate_proj"), out.get("up_proj")
    if gate and up and gate.quantizer.args == up.quantizer.args and (
            (gate.scales is None and up.scales is None)
            or (gate.scales is not None and up.scales is not None and torch.equal(gate.scales, up.scales))):
        out["up_proj"] = gate  # the same tokens under the same scales: quantized once for both
    return out


def input_quantization_plans(module: torch.nn.Module, quantizers: dict) -> dict[torch.nn.Module, dict | None]:
    """:func:`input_quantizers` of every batchable experts container under ``module``, computed once (e.g. when
    activation simulation starts) and handed to :func:`batched_experts` on every forward."""
    return {sub: input_quantizers(sub, quantizers) for sub in module.modules() if supports_batching(sub)}


@dataclass
class Stacked:
    """One projection of every expert, as :func:`batched_forward` multiplies it: the weights ``[E, out, in]`` (or,
    with ``weight`` None, the experts' Linear ``modules``, stacked a piece at a time) and biases ``[E, out]`` (or
    None). Subclasses compute the weights inside the product (the tuner's fake-quantized stacks).

    A product that must convert the weights (a bf16 model's experts in a float32 forward) or stack them runs in
    pieces of experts of at most :func:`~routealign.accelerator.piece_elements` elements: never a float32 copy, or a
    stacked copy, of a whole layer's projection (on DeepSeek-V3, 15 GB)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    modules: tuple = ()

    needs_ends: ClassVar[bool] = False  # the grouped layout's product needs the token boundaries on the host (Parts)

    @property
    def experts(self) -> int:
        return self.weight.shape[0] if self.weight is not None else len(self.modules)

    def piece(self, a: int, b: int) -> torch.Tensor:
        """The weights of experts ``[a, b)``, ``[b - a, out, in]``."""
        if self.weight is not None:
            return self.weight[a:b]
        return torch.stack([m.weight for m in self.modules[a:b]])

    def pieces(self, dtype: torch.dtype) -> list[tuple[int, int]]:
        """Expert ranges the product in ``dtype`` runs in: all at once where the weight is one tensor already in
        ``dtype``, else pieces of :func:`~routealign.accelerator.piece_elements`."""
        sample = self.weight if self.weight is not None else self.modules[0].weight
        count = self.experts
        if self.weight is not None and sample.dtype == dtype:
            return [(0, count)]
        per = sample[0].numel() if self.weight is not None else sample.numel()
        step = max(1, piece_elements(sample.device) // max(per, 1))
        return [(a, min(a + step, count)) for a in range(0, count, step)]

    def matmul(self, tokens: torch.Tensor, offsets: torch.Tensor | None, dtype: torch.dtype,
               ends: list[int] | None = None) -> torch.Tensor:
        """Expert-sorted ``tokens`` ``[T, in]`` with jagged ``offsets`` (one grouped GEMM), or with ``offsets`` None
        tokens padded per expert ``[E, C, in]`` (one batched matmul), times each expert's weight, in ``dtype`` (padded:
        the tokens' dtype). ``ends``: ``offsets`` read back once per forward (``[0] + offsets``), where
        :attr:`needs_ends` or a product runs in pieces (read here otherwise). With gradients to the tokens, the
        weights are kept for the backward as they are (a view of the stack, in the model's dtype) and converted
        there piece by piece (:class:`_FrozenMatmul`): no float32 copy of a bf16 model's untuned experts lives until
        the backward."""
        weight = self.weight if self.weight is not None else self.modules[0].weight
        if torch.is_grad_enabled() and tokens.requires_grad and not weight.requires_grad:
            return _FrozenMatmul.apply(tokens, self, offsets, dtype, ends)
        return _frozen_product(tokens, self, offsets, dtype, ends)

    def dense(self) -> torch.Tensor:
        """The stacked weights as one tensor (for llm-compressor's per-expert loop)."""
        return self.weight if self.weight is not None else self.piece(0, self.experts)

    @property
    def out_features(self) -> int:
        return (self.weight if self.weight is not None else self.modules[0].weight).shape[-2]


def _grouped_ranges(stacked: Stacked, offsets: torch.Tensor, ends: list[int] | None, dtype: torch.dtype):
    """Per piece of :meth:`Stacked.pieces`: ``(first expert, end, first token, end token)``; one piece needs no token
    boundaries (one grouped GEMM over all the tokens)."""
    pieces = stacked.pieces(dtype)
    if len(pieces) == 1:
        return [(0, stacked.experts, None, None)]
    ends = [0] + offsets.tolist() if ends is None else ends
    return [(a, b, ends[a], ends[b]) for a, b in pieces]


def _frozen_product(tokens: torch.Tensor, stacked: Stacked, offsets: torch.Tensor | None, dtype: torch.dtype,
                    ends: list[int] | None) -> torch.Tensor:
    """:meth:`Stacked.matmul`'s product: padded tokens in their dtype (batched matmuls), or expert-sorted tokens in
    ``dtype`` (grouped GEMMs), a piece of experts at a time (:meth:`Stacked.pieces`)."""
    if offsets is None:
        return torch.cat([torch.bmm(tokens[a:b], stacked.piece(a, b).transpose(1, 2).to(tokens.dtype))
                          for a, b in stacked.pieces(tokens.dtype)])
    outs = []
    for a, b, t0, t1 in _grouped_ranges(stacked, offsets, ends, dtype):
        w = stacked.piece(a, b).transpose(1, 2).to(dtype)
        if t0 is None:
            outs.append(torch._grouped_mm(tokens.to(dtype), w, offs=offsets))
        elif t1 > t0:
            outs.append(torch._grouped_mm(tokens[t0:t1].to(dtype), w, offs=offsets[a:b] - t0))
        else:
            outs.append(tokens.new_zeros(0, w.shape[-1], dtype=dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _FrozenMatmul(torch.autograd.Function):
    """:func:`_frozen_product` with a gradient to the tokens only, the weights kept as they are (in the model's
    dtype, a view) and converted inside the backward piece by piece. Autograd would save the converted float32
    weight: for a bf16 model's experts tuned in chunks, a float32 copy of every untuned expert alive until the
    backward. Values and gradients are autograd's (the same GEMM calls)."""

    @staticmethod
    def forward(ctx, tokens, stacked, offsets, dtype, ends):
        ctx.save_for_backward(offsets)
        ctx.stacked, ctx.dtype, ctx.tokens_dtype, ctx.ends = stacked, dtype, tokens.dtype, ends
        return _frozen_product(tokens, stacked, offsets, dtype, ends)

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        stacked = ctx.stacked
        if offsets is None:
            grad_tokens = torch.cat([torch.bmm(grad[a:b], stacked.piece(a, b).to(ctx.tokens_dtype))
                                     for a, b in stacked.pieces(ctx.tokens_dtype)])
        else:
            outs = []
            for a, b, t0, t1 in _grouped_ranges(stacked, offsets, ctx.ends, ctx.dtype):
                w = stacked.piece(a, b).to(ctx.dtype)
                if t0 is None:
                    outs.append(torch._grouped_mm(grad.to(ctx.dtype), w, offs=offsets))
                elif t1 > t0:
                    outs.append(torch._grouped_mm(grad[t0:t1].to(ctx.dtype), w, offs=offsets[a:b] - t0))
                else:
                    outs.append(grad.new_zeros(0, w.shape[-1], dtype=ctx.dtype))
            grad_tokens = outs[0] if len(outs) == 1 else torch.cat(outs)
        return grad_tokens.to(ctx.tokens_dtype), None, None, None, None


@dataclass
class Parts(Stacked):
    """A projection of every expert in consecutive parts ``(first expert, end, Stacked)`` (expert-chunked tuning:
    the experts tuned before, the chunk being tuned, the experts still unquantized), multiplied part by part. The
    grouped layout needs the token boundaries on the host: :func:`batched_forward` reads them once per forward for
    all projections (``ends``)."""

    parts: tuple = ()
    needs_ends: ClassVar[bool] = True

    def matmul(self, tokens: torch.Tensor, offsets: torch.Tensor | None, dtype: torch.dtype,
               ends: list[int] | None = None) -> torch.Tensor:
        if offsets is None:  # padded [E, C, in]: the parts are slices of the experts' dimension
            return torch.cat([part.matmul(tokens[a:b], None, dtype) for a, b, part in self.parts])
        ends = [0] + offsets.tolist() if ends is None else ends
        outs = []
        for a, b, part in self.parts:
            start, end = ends[a], ends[b]
            if start == end:  # no token for these experts in this batch (and no gradient to give them)
                outs.append(tokens.new_zeros(0, part.out_features, dtype=dtype))
            else:
                outs.append(part.matmul(tokens[start:end], offsets[a:b] - start, dtype,
                                        [e - start for e in ends[a:b + 1]]))
        return torch.cat([o.to(dtype) for o in outs])

    def dense(self) -> torch.Tensor:
        return torch.cat([part.dense() for _, _, part in self.parts])


def _stack(experts, proj: str) -> Stacked:
    """The experts' own weights of ``proj``, stacked by the product a piece at a time (:meth:`Stacked.piece`)."""
    mods = tuple(getattr(experts[e], proj) for e in range(experts.num_experts))
    bias = torch.stack([m.bias for m in mods]) if mods[0].bias is not None else None
    return Stacked(None, bias, mods)


def layout(x: torch.Tensor, dtype: torch.dtype) -> str:
    """How the experts' matmuls run for tokens ``x`` computed in ``dtype``: ``grouped`` (one grouped GEMM per
    projection over the expert-sorted tokens, jagged offsets on the device: no padding, no host synchronisation) or
    ``padded`` (tokens padded to the busiest expert's count, ``[E, C, h]``, one batched matmul; C is read once per
    forward). The choice by device is :func:`routealign.accelerator.expert_layout`'s."""
    return expert_layout(x.device, dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (``amp``), else the tokens'."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def batched_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``LinearExperts2D.forward`` (routed tokens only). Tokens are gathered once in expert order and each
    projection runs as one grouped or padded batched matmul (:func:`layout`) against the stacked ``[E, out, in]``
    weights: those set on the container (``_routealign_weights``: the tuner's fake-quantized stacks, no re-stacking),
    else the experts' own. No operation here runs per expert, and in the grouped layout nothing waits for the
    device (expert counts by ``scatter_add``, offsets by ``cumsum``)."""
    num_experts = self.num_experts
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros_like(hidden_states)
    with torch.no_grad():
        order = torch.argsort(flat, stable=True)
        sorted_experts = flat[order]
        counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
    token = order // k
    slot = order % k
    x = hidden_states[token]
    dtype = _compute_dtype(x)
    padded = layout(x, dtype) == "padded"
    given = getattr(self, "_routealign_weights", None) or {}
    if padded:
        with torch.no_grad():
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(flat.numel(), device=flat.device) - starts[sorted_experts]
            capacity = -(-int(counts.max()) // 16) * 16  # the one host read; rounded up for the allocator's reuse
        xp = x.new_zeros(num_experts, capacity, x.shape[-1]).index_put((sorted_experts, position), x)
    else:
        with torch.no_grad():
            offsets = torch.cumsum(counts, 0).to(torch.int32)
        xp = x
    # the host's token boundaries, read once for every projection that needs them (experts tuned in chunks)
    ends = [0] + offsets.tolist() if not padded and any(s.needs_ends for s in given.values()) else None

    def project(inp, proj):
        stacked = given[proj] if proj in given else _stack(self, proj)
        out, b = stacked.matmul(inp, None if padded else offsets, dtype, ends), stacked.bias
        if b is None:
            return out
        return out + (b[:, None, :] if padded else b[sorted_experts]).to(out.dtype)

    quant = getattr(self, "_routealign_input_quantizers", None) or {}

    def quantized(inp, proj):
        return quant[proj](inp, sorted_experts, padded) if proj in quant else inp

    if self.has_gate:  # the container's own gating (SwiGLU, GPT-OSS's clamped SwiGLU) on [..., 2I]
        gate_in = quantized(xp, "gate_proj")
        up_in = gate_in if quant.get("up_proj") is quant.get("gate_proj") else quantized(xp, "up_proj")
        inner = self._apply_gate(torch.cat([project(gate_in, "gate_proj"), project(up_in, "up_proj")], dim=-1))
    else:
        inner = self.act_fn(project(quantized(xp, "up_proj"), "up_proj"))
    y = project(quantized(inner, "down_proj"), "down_proj")
    if padded:
        y = y[sorted_experts, position]
    out = y * top_k_weights[token, slot, None]
    return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))


@contextlib.contextmanager
def batched_experts(module: torch.nn.Module, plans: dict | None = None, weights: dict | None = None):
    """Inside, every batchable linearized experts container under ``module`` uses :func:`batched_forward`.
    ``plans`` (:func:`input_quantization_plans`) are the input-activation quantizers the batched forward applies;
    a container whose quantizers it cannot apply exactly (plan ``None``) keeps llm-compressor's loop. ``weights`` maps
    containers to ``{projection: Stacked}`` used instead of the experts' own weights."""
    patched = []
    for sub in module.modules():
        if supports_batching(sub) and "forward" not in sub.__dict__:
            quant = plans.get(sub, {}) if plans else {}
            if quant is None:
                continue
            sub.forward = types.MethodType(batched_forward, sub)
            sub._routealign_input_quantizers = quant
            sub._routealign_weights = (weights or {}).get(sub)
            patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.forward
            del sub._routealign_input_quantizers
            del sub._routealign_weights
