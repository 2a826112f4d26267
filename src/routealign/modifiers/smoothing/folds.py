"""Expert-aware smoothing (ExpertQuant's Expert-Aware Scale) folded exactly into ordinary weights.

ExpertQuant gives each expert ``i`` its own channel scale ``s_j^i = max|x_j^(i)|^a / max|W_j^i|^(1-a)`` and applies
it at run time. A stock vLLM checkpoint has no place for run-time scales, so every scale here is folded into
weights, where the algebra is exact in full precision:

``expert_down``
    per expert, over its intermediate channels: ``up_proj`` rows / ``s`` and ``down_proj`` columns * ``s`` (SwiGLU
    ``act(g) * u`` is linear in the up branch). Here the scale really is per expert, as in the paper, and computed
    from that expert's routed tokens. Non-gated experts with ``relu^2`` (Nemotron-H) are positively homogeneous of
    degree 2: ``up_proj`` rows / ``sqrt(s)``. GPT-OSS's clamped SwiGLU (``(clamp(u) + 1) * ...``) is not linear in
    the up branch: skipped, and reported.
``moe_input``
    the input norm before the MoE block -> {router, every expert's gate/up, shared experts, shared_expert_gate}: one
    vector, since all of them read the same normed activations. It is chosen expert-aware: the routed-token-weighted
    geometric mean of the per-expert optimal scales. The router's weight is multiplied by the same vector, so its
    logits, and thus the full-precision routing, are unchanged.
``attention_vo``
    ``v_proj`` rows / ``s`` and ``o_proj`` columns * ``s`` (attention output is linear in V), with one scale per
    key/value channel repeated over the query heads that share it (GQA). Skipped where there is no ``v_proj``
    (DeepSeek-V3's MLA).
``mlp_down``
    dense and shared-expert MLPs: ``up_proj`` rows / ``s``, ``down_proj`` columns * ``s``.
``attention_input``
    the input norm before attention -> {q, k, v} (DeepSeek-V3 MLA: {q_a_proj, kv_a_proj_with_mqa}), as AWQ and
    SmoothQuant do for dense models; matters when activations are quantized (NVFP4).

Modes: ``expertquant`` (the formula with a fixed ``a``) and ``search`` (AWQ-style: per mapping, the ``a`` on a grid,
or no smoothing, that minimises the reconstruction error of the *quantized* consumers on routed calibration tokens,
with the target scheme's weight and, when it has one, activation quantization).

All arithmetic is float32; folded weights are cast back to their dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from ...distributed import write_parameters
from ...schemes import WeightQuantizer

__all__ = [
    "Mapping",
    "MAPPINGS",
    "FoldPlan",
    "smooth_scales",
    "aggregate_scales",
    "fold_norm_into_consumers",
    "fold_up_down",
    "fold_v_o",
    "expert_fold_power",
    "input_norm_of",
    "attention_pairs",
    "attention_inputs",
    "mlp_pairs",
    "reconstruction_error",
    "search_alpha",
    "expert_hidden",
    "column_absmax",
    "expand_kv",
    "reduce_to_kv",
]

Mapping = Literal["moe_input", "expert_down", "attention_vo", "mlp_down", "attention_input"]
MAPPINGS: tuple[str, ...] = ("moe_input", "expert_down", "attention_vo", "mlp_down", "attention_input")
_NORM_NAMES = ("post_attention_layernorm", "norm", "pre_feedforward_layernorm")
_ATTN_NORM_NAMES = ("input_layernorm", "norm")
_ATTN_INPUTS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")


def smooth_scales(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float, s_min: float, s_max: float) -> torch.Tensor:
    """ExpertQuant eq. 4 (SmoothQuant's form): ``xmax^a / wmax^(1-a)``, clipped to ``[s_min, s_max]``. Channels
    with no activation or no weight get 1."""
    xmax, wmax = xmax.float(), wmax.float()
    scale = xmax.clamp(min=1e-8).pow(alpha) / wmax.clamp(min=1e-8).pow(1 - alpha)
    scale = torch.where((xmax > 0) & (wmax > 0), scale, torch.ones_like(scale))
    return scale.clamp(s_min, s_max)


def aggregate_scales(scales: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Routed-token-weighted geometric mean over experts of per-expert scales ``[E, d]``; experts with no token
    do not count. All-zero counts give ones."""
    weights = counts.float().clamp(min=0)
    if float(weights.sum()) == 0:
        return torch.ones(scales.shape[-1])
    weights = weights / weights.sum()
    return torch.exp((weights[:, None] * scales.float().log()).sum(0))


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Write a folded tensor (``value`` computed from the current one): through
    :func:`routealign.distributed.write_parameters`, so that under torch.distributed, where every rank folds the
    same scales, a tensor the ranks share is read by all of them before one rank writes it (not folded twice)."""
    current = getattr(module, name)
    write_parameters([(module, name, value.to(current.dtype))])


@torch.no_grad()
def fold_norm_into_consumers(norm: torch.nn.Module, consumers: list[torch.nn.Module], scale: torch.Tensor) -> None:
    """``norm`` output / ``scale``; every consumer's weight columns * ``scale`` (consumer input is the norm
    output, so ``W x = (W diag(s)) (x / s)``)."""
    s = scale.float().to(norm.weight.device)
    _set(norm, "weight", norm.weight.float() / s)
    if getattr(norm, "bias", None) is not None:
        _set(norm, "bias", norm.bias.float() / s)
    for module in consumers:
        _set(module, "weight", module.weight.float() * s.to(module.weight.device))


@torch.no_grad()
def fold_up_down(up: torch.nn.Linear, down: torch.nn.Linear, scale: torch.Tensor, power: int = 1) -> None:
    """``up`` rows / ``scale^(1/power)`` (and bias), ``down`` columns * ``scale``: exact when the activation between
    them is linear (power 1) or positively homogeneous of degree ``power`` in the up branch."""
    s = scale.float().to(up.weight.device)
    root = s if power == 1 else s.pow(1.0 / power)
    _set(up, "weight", up.weight.float() / root[:, None])
    if up.bias is not None:
        _set(up, "bias", up.bias.float() / root)
    _set(down, "weight", down.weight.float() * s.to(down.weight.device))


@torch.no_grad()
def fold_v_o(v: torch.nn.Linear, o: torch.nn.Linear, scale_kv: torch.Tensor, head_dim: int) -> None:
    """``v_proj`` rows / ``scale_kv`` (``[kv_heads * head_dim]``) and ``o_proj`` columns * the scale of the kv
    channel each attention-output channel reads (query heads sharing a kv head share its scale)."""
    s = scale_kv.float().to(v.weight.device)
    _set(v, "weight", v.weight.float() / s[:, None])
    if v.bias is not None:
        _set(v, "bias", v.bias.float() / s)
    _set(o, "weight", o.weight.float() * expand_kv(s, o.in_features, head_dim).to(o.weight.device))


def expand_kv(scale_kv: torch.Tensor, out_channels: int, head_dim: int) -> torch.Tensor:
    kv_heads = scale_kv.numel() // head_dim
    groups = out_channels // (kv_heads * head_dim)
    return scale_kv.view(kv_heads, 1, head_dim).expand(kv_heads, groups, head_dim).reshape(-1)


def reduce_to_kv(values: torch.Tensor, kv_channels: int, head_dim: int) -> torch.Tensor:
    """Per attention-output channel statistics (``[..., heads * head_dim]``) -> per kv channel (max over the query
    heads of a group)."""
    kv_heads = kv_channels // head_dim
    heads = values.shape[-1] // head_dim
    return values.reshape(*values.shape[:-1], kv_heads, heads // kv_heads, head_dim).amax(-2).flatten(-2)


# -- structure -------------------------------------------------------------------------------------------------------
def _act_name(act) -> str:
    """Class name of an activation module, also when stored as its bound ``forward``."""
    return type(getattr(act, "__self__", act)).__name__


def expert_fold_power(expert: torch.nn.Module) -> tuple[int | None, str]:
    """How an up->down fold is exact for one linearized expert: ``(power, "")`` or ``(None, reason)``."""
    from llmcompressor.modeling.moe.linear_experts import ExpertMLPWithGate, ExpertMLPWithoutGate

    from ...compat import default_gating

    if isinstance(expert, ExpertMLPWithGate):
        if default_gating(expert):
            return 1, ""
        return None, f"{type(expert).__name__}: its gating is not act(gate) * up (not linear in the up branch)"
    if isinstance(expert, ExpertMLPWithoutGate):
        act = _act_name(getattr(expert, "act_fn", None))
        if act == "ReLUSquaredActivation":
            return 2, ""
        if act == "ReLU":
            return 1, ""
        return None, f"{type(expert).__name__} with {act}: not positively homogeneous"
    return None, f"{type(expert).__name__}: not a linearized expert (run llm-compressor's linearize_moe)"


def input_norm_of(model: torch.nn.Module, block_name: str, names: tuple[str, ...] = _NORM_NAMES) -> str | None:
    """The norm in the same decoder layer whose output is the block's input (verified on data by the modifier
    before anything is folded)."""
    parent_name = block_name.rsplit(".", 1)[0] if "." in block_name else ""
    parent = model.get_submodule(parent_name)
    for attr in names:
        norm = getattr(parent, attr, None)
        if isinstance(norm, torch.nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor):
            return f"{parent_name}.{attr}" if parent_name else attr
    return None


def attention_pairs(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, str, int]]:
    """``(v_proj, o_proj, head_dim)`` names of every attention module under ``module``."""
    pairs = []
    for name, sub in module.named_modules():
        v, o = getattr(sub, "v_proj", None), getattr(sub, "o_proj", None)
        if isinstance(v, torch.nn.Linear) and isinstance(o, torch.nn.Linear):
            head_dim = int(getattr(sub, "head_dim", 0) or 0)
            if not head_dim or v.out_features % head_dim or o.in_features % v.out_features:
                continue
            base = f"{prefix}{name}." if name else prefix
            pairs.append((f"{base}v_proj", f"{base}o_proj", head_dim))
    return pairs


def attention_inputs(model: torch.nn.Module, decoder_layer: str) -> list[tuple[str, str, list[str]]]:
    """``(attention module, its input norm, the projections reading the normed input)`` in one decoder layer."""
    found = []
    for name, sub in model.get_submodule(decoder_layer).named_modules():
        consumers = [a for a in _ATTN_INPUTS if isinstance(getattr(sub, a, None), torch.nn.Linear)]
        if not consumers or ("q_a_proj" in consumers) != ("kv_a_proj_with_mqa" in consumers):
            continue
        if "q_a_proj" in consumers:  # MLA: q_proj does not exist; keep only what reads the normed input
            consumers = ["q_a_proj", "kv_a_proj_with_mqa"]
        full = f"{decoder_layer}.{name}" if name else decoder_layer
        norm = input_norm_of(model, full, _ATTN_NORM_NAMES)
        if norm is not None:
            found.append((full, norm, [f"{full}.{c}" for c in consumers]))
    return found


def mlp_pairs(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, str, str, int]]:
    """``(mlp, up_proj, down_proj, power)`` of dense and shared-expert MLPs (not routed experts) under ``module``,
    where the fold is exact: gated ``down(act(gate x) * up x)`` or ``relu^2`` without gate."""
    found = []
    for name, sub in module.named_modules():
        if ".experts." in f".{name}." or not name.rsplit(".", 1)[-1]:
            continue
        up, down = getattr(sub, "up_proj", None), getattr(sub, "down_proj", None)
        if not (isinstance(up, torch.nn.Linear) and isinstance(down, torch.nn.Linear)):
            continue
        if not type(sub).__name__.endswith("MLP"):
            continue
        gate = getattr(sub, "gate_proj", None)
        act = _act_name(getattr(sub, "act_fn", None))
        if isinstance(gate, torch.nn.Linear):
            power = 1
        elif act == "ReLUSquaredActivation":
            power = 2
        else:
            continue
        base = f"{prefix}{name}."
        found.append((f"{prefix}{name}", f"{base}up_proj", f"{base}down_proj", power))
    return found


# -- search ----------------------------------------------------------------------------------------------------------
@dataclass
class FoldPlan:
    """One mapping of one layer: its chosen scale and how it was chosen."""

    mapping: str
    where: str
    scale: torch.Tensor | None
    alpha: float | None
    error_before: float | None = None
    error_after: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _fake_quant(quantizer: WeightQuantizer | None, w: torch.Tensor) -> torch.Tensor:
    if quantizer is None:
        return w
    return quantizer.fake_quant(w, quantizer.rtn_qparams(w, quantizer.global_scale(w)))


@torch.no_grad()
def reconstruction_error(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None,
                         wq: WeightQuantizer | None, aq: WeightQuantizer | None) -> float:
    """``||Q(W diag(s)) Qa(x / s) - W x||^2`` summed over the tokens ``x`` (``[n, in]``), float32."""
    if x.numel() == 0:
        return 0.0
    w = weight.float()
    x = x.float()
    ref = x @ w.T
    if scale is not None:
        w = w * scale[None, :]
        x = x / scale[None, :]
    out = _fake_quant(aq, x) @ _fake_quant(wq, w).T
    return float((out - ref).pow(2).sum())


def search_alpha(candidate: Callable[[float], torch.Tensor], error: Callable[[torch.Tensor | None], float],
                 grid: tuple[float, ...]) -> tuple[float | None, torch.Tensor | None, float, float]:
    """Best ``a`` on ``grid`` (or ``None``: no smoothing) by ``error``; returns ``(a, scale, error_none, best)``."""
    base = error(None)
    best_a, best_s, best = None, None, base
    for a in grid:
        s = candidate(a)
        value = error(s)
        if math.isfinite(value) and value < best:
            best_a, best_s, best = a, s, value
    return best_a, best_s, base, best


def expert_hidden(expert: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a linearized expert's ``down_proj`` for tokens ``x``, computed with ``F.linear`` on the raw
    weights (no module hooks fire: other modifiers' calibration hooks do not see these extra tokens)."""
    F = torch.nn.functional
    up = expert.up_proj
    u = F.linear(x, up.weight.to(x.dtype), None if up.bias is None else up.bias.to(x.dtype))
    gate = getattr(expert, "gate_proj", None)
    if gate is None:
        return expert.act_fn(u)
    g = F.linear(x, gate.weight.to(x.dtype), None if gate.bias is None else gate.bias.to(x.dtype))
    return expert._apply_gate(torch.cat([g, u], dim=-1))


def column_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """Per input channel ``max |W|`` over the rows of all ``weights`` (``[out, in]`` each)."""
    return torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
