"""Per-site statistics and fold sites of the expert-aware smoothing.

A *site* is one place a scale is folded: one expert's up/down pair, one MoE block's input norm, one attention v/o
pair, one dense MLP, one attention input norm. :class:`SiteStats` accumulates what a site's scale is computed from
(per-channel maxima, per expert for MoE blocks, and a bounded token sample for the search); :func:`observe_routed`
fills it from a MoE block's input, routed with the model's own router. The builders (``*_site``) turn statistics
into a :class:`Site`: the scale for a migration strength, the quantized reconstruction error under a scale, and the
fold (the algebra of :mod:`.folds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ...routing import MoELayer
from ...schemes import WeightQuantizer
from .folds import (
    aggregate_scales,
    column_absmax,
    expand_kv,
    expert_hidden,
    fold_norm_into_consumers,
    fold_up_down,
    fold_v_o,
    reconstruction_error,
    reduce_to_kv,
    smooth_scales,
)

__all__ = [
    "SiteStats",
    "Site",
    "SiteContext",
    "moe_experts",
    "observe_routed",
    "expert_down_sites",
    "moe_input_site",
    "attention_vo_site",
    "attention_input_site",
    "mlp_down_site",
]

Quantizers = tuple[WeightQuantizer | None, WeightQuantizer | None]
Rescaled = list[tuple[torch.nn.Module, torch.Tensor]]


def moe_experts(layer: MoELayer) -> list[torch.nn.Module]:
    """The expert modules of a linearized MoE block (the container also holds its activation after them)."""
    return [c for c in layer.experts.children() if hasattr(c, "down_proj")][: layer.num_experts]


class SiteStats:
    """Running statistics of one site: per-channel absolute maxima (per expert for MoE blocks), routed token
    counts, and a bounded sample of input tokens for the search."""

    def __init__(self, budget: int):
        self.budget = budget
        self.max: torch.Tensor | None = None
        self.extra_max: torch.Tensor | None = None  # MoE blocks: over all tokens (shared experts)
        self.hmax: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.sample: list[torch.Tensor] = []
        self.sample_idx: list[torch.Tensor] = []
        self.kept = 0
        self.checked = False

    def observe(self, x: torch.Tensor) -> None:
        """Per-channel maximum and sample of ``x`` (``[tokens, channels]``, float32)."""
        self.max = _update_max(self.max, x.abs().amax(0).cpu())
        self.keep(x)

    def keep(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        room = self.budget - self.kept
        if room <= 0:
            return
        self.sample.append(x[:room].detach().float().cpu())
        if idx is not None:
            self.sample_idx.append(idx[:room].cpu())
        self.kept += min(room, x.shape[0])

    def tokens(self, channels: int) -> torch.Tensor:
        """The kept token sample, ``[n, channels]``."""
        return torch.cat(self.sample) if self.sample else torch.zeros(0, channels)

    def token_experts(self, k: int = 1) -> torch.Tensor:
        """The experts each kept token was routed to, ``[n, k]`` (MoE blocks)."""
        return torch.cat(self.sample_idx) if self.sample_idx else torch.zeros(0, k, dtype=torch.long)


@torch.no_grad()
def observe_routed(stats: SiteStats, layer: MoELayer, hidden: torch.Tensor, powers: list[int | None] | None) -> None:
    """Statistics of a MoE block's input ``hidden``, routed with the model's own router (in the model's dtype):
    per expert, the maximum of the tokens routed to it, its routed-token count and (where its up/down pair folds,
    ``powers[e]`` not ``None``) the maximum of its intermediate activations on those tokens; over all tokens, the
    maximum the shared experts see; and a token sample with each token's experts."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    routing = layer.route(flat)
    x = flat.float()
    num = layer.num_experts
    if stats.max is None:
        stats.max = torch.zeros(num, x.shape[-1])
        stats.counts = torch.zeros(num, dtype=torch.long)
        stats.extra_max = torch.zeros(x.shape[-1])
    stats.extra_max = torch.maximum(stats.extra_max, x.abs().amax(0).cpu())
    experts = moe_experts(layer)
    for e in range(num):
        rows = (routing.indices == e).any(-1)
        count = int(rows.sum())
        if count == 0:
            continue
        xe = x[rows]
        stats.counts[e] += count
        stats.max[e] = torch.maximum(stats.max[e], xe.abs().amax(0).cpu())
        if powers is not None and powers[e] is not None:
            h = expert_hidden(experts[e], xe).abs().amax(0).cpu()
            if stats.hmax is None:
                stats.hmax = torch.zeros(num, h.shape[-1])
            stats.hmax[e] = torch.maximum(stats.hmax[e], h)
    stats.keep(x, routing.indices)


@dataclass
class Site:
    """One fold site: its name and mapping, the scale for a migration strength ``a`` (``candidate``), the quantized
    reconstruction error under a scale or none (``error``), and the fold itself (``apply``: folds the scale, returns
    ``(module, input scale)`` for every module whose input it rescaled)."""

    where: str
    mapping: str
    candidate: Callable[[float], torch.Tensor]
    error: Callable[[torch.Tensor | None], float]
    apply: Callable[[torch.Tensor], Rescaled]
    extra: dict = field(default_factory=dict)


@dataclass
class SiteContext:
    """What every builder needs from the modifier: the scale clip and the quantizers a module will get."""

    s_min: float
    s_max: float
    quantizers: Callable[[torch.nn.Module], Quantizers]

    def scales(self, xmax: torch.Tensor, wmax: torch.Tensor, a: float) -> torch.Tensor:
        return smooth_scales(xmax, wmax, a, self.s_min, self.s_max)


def _update_max(current: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if current is None else torch.maximum(current, value)


def _fold_up_down(up, down, scale, power) -> Rescaled:
    fold_up_down(up, down, scale, power)
    return [(down, scale)]


def _fold_norm(norm: torch.nn.Module, consumers: list[torch.nn.Module], scale: torch.Tensor) -> Rescaled:
    fold_norm_into_consumers(norm, consumers, scale)
    return [(m, scale) for m in consumers]


def expert_down_sites(layer: MoELayer, stats: SiteStats, powers: list[int | None],
                      ctx: SiteContext) -> Iterator[Site | str]:
    """One site per expert whose up/down pair folds (``powers[e]`` not ``None``), built as it is asked for (fold
    each before the next is built: only one expert's intermediate activations are held); an expert no calibration
    token was routed to gives the string ``where`` instead (not smoothed)."""
    x_all = stats.tokens(stats.max.shape[-1])
    idx_all = stats.token_experts()
    for e, (expert, power) in enumerate(zip(moe_experts(layer), powers)):
        if power is None:
            continue
        where = f"{layer.experts_name}.{e}"
        if int(stats.counts[e]) == 0:
            yield where
            continue
        down = expert.down_proj
        wmax = column_absmax(down.weight)
        wq, aq = ctx.quantizers(down)
        rows = (idx_all == e).any(-1)
        with torch.no_grad():
            h = expert_hidden(expert, x_all[rows].to(down.weight.device)) if rows.any() else x_all[:0]
        yield Site(
            where, "expert_down",
            candidate=lambda a, hmax=stats.hmax[e], wmax=wmax: ctx.scales(hmax, wmax, a),
            error=lambda s, down=down, h=h, wq=wq, aq=aq: reconstruction_error(down.weight, h, s, wq, aq),
            apply=lambda s, up=expert.up_proj, down=down, power=power: _fold_up_down(up, down, s, power))


def moe_input_site(model: torch.nn.Module, layer: MoELayer, norm: str, stats: SiteStats, ctx: SiteContext) -> Site:
    """The MoE block's input norm folded into the router, every expert's gate/up and the shared experts: one scale,
    the routed-token-weighted geometric mean of the per-expert scales; its error sums each expert's on its routed
    tokens and the shared experts' on all."""
    experts = moe_experts(layer)
    expert_weights = [[getattr(e, p) for p in ("gate_proj", "up_proj") if hasattr(e, p)] for e in experts]
    # the shared experts' modules that read the block input: gate/up projections and shared_expert_gate
    shared_named = [(f"{n}.{sub}" if sub else n, m) for n in layer.shared_expert_names
                    for sub, m in model.get_submodule(n).named_modules()
                    if isinstance(m, torch.nn.Linear)
                    and (f"{n}.{sub}" if sub else n).endswith(("gate_proj", "up_proj", "shared_expert_gate"))]
    shared = [m for _, m in shared_named]
    # shared_expert_gate stays unquantized: folded, but not part of the quantized error
    shared_quantized = [m for n, m in shared_named if not n.endswith("shared_expert_gate")]
    x_all = stats.tokens(stats.max.shape[-1])
    idx_all = stats.token_experts()
    wmax = [column_absmax(*(m.weight for m in ws)) for ws in expert_weights]
    counts = stats.counts.clone()
    total = int(counts.sum()) // max(layer.top_k, 1)
    shared_wmax = column_absmax(*(m.weight for m in shared_quantized)) if shared_quantized else None

    def candidate(a: float) -> torch.Tensor:
        per = [ctx.scales(stats.max[e], wmax[e], a) for e in range(len(experts))]
        weights = counts.tolist()
        if shared_wmax is not None:
            per.append(ctx.scales(stats.extra_max, shared_wmax, a))
            weights.append(total)
        return aggregate_scales(torch.stack(per), torch.tensor(weights)).clamp(ctx.s_min, ctx.s_max)

    quant = [ctx.quantizers(ws[0]) for ws in expert_weights]

    def error(s: torch.Tensor | None) -> float:
        total_error = 0.0
        for e, ws in enumerate(expert_weights):
            rows = (idx_all == e).any(-1)
            if not rows.any():
                continue
            weight = torch.cat([m.weight for m in ws])
            total_error += reconstruction_error(weight, x_all[rows], s, *quant[e])
        for m in shared_quantized:
            total_error += reconstruction_error(m.weight, x_all, s, *ctx.quantizers(m))
        return total_error

    consumers = [layer.router] + [m for ws in expert_weights for m in ws] + shared
    norm_module = model.get_submodule(norm)
    return Site(layer.name, "moe_input", candidate, error, apply=lambda s: _fold_norm(norm_module, consumers, s),
                extra={"norm": norm, "routed_tokens": stats.counts.tolist()})


def attention_vo_site(model: torch.nn.Module, v_name: str, o_name: str, head_dim: int, stats: SiteStats,
                      ctx: SiteContext) -> Site:
    """``v_proj`` rows / ``s``, ``o_proj`` columns * ``s``, one scale per key/value channel (GQA)."""
    v, o = model.get_submodule(v_name), model.get_submodule(o_name)
    kv = v.out_features
    xmax = reduce_to_kv(stats.max, kv, head_dim)
    wmax = reduce_to_kv(o.weight.detach().float().abs().amax(0), kv, head_dim)
    x = stats.tokens(o.in_features)
    wq, aq = ctx.quantizers(o)

    def apply(s: torch.Tensor) -> Rescaled:
        fold_v_o(v, o, s, head_dim)
        return [(o, expand_kv(s, o.in_features, head_dim))]

    return Site(
        o_name.rsplit(".", 1)[0], "attention_vo",
        candidate=lambda a: ctx.scales(xmax, wmax, a),
        error=lambda s: reconstruction_error(o.weight, x, None if s is None else expand_kv(s, o.in_features,
                                                                                           head_dim), wq, aq),
        apply=apply)


def attention_input_site(model: torch.nn.Module, attn: str, norm: str, consumer_names: list[str], stats: SiteStats,
                         ctx: SiteContext) -> Site:
    """The attention's input norm folded into its input projections (q/k/v, or MLA's q_a/kv_a)."""
    consumers = [model.get_submodule(n) for n in consumer_names]
    wmax = column_absmax(*(m.weight for m in consumers))
    x = stats.tokens(stats.max.shape[-1])
    quant = [ctx.quantizers(m) for m in consumers]
    norm_module = model.get_submodule(norm)
    return Site(
        attn, "attention_input",
        candidate=lambda a: ctx.scales(stats.max, wmax, a),
        error=lambda s: sum(reconstruction_error(m.weight, x, s, *q) for m, q in zip(consumers, quant)),
        apply=lambda s: _fold_norm(norm_module, consumers, s), extra={"norm": norm})


def mlp_down_site(model: torch.nn.Module, mlp: str, up_name: str, down_name: str, power: int, stats: SiteStats,
                  ctx: SiteContext) -> Site:
    """A dense or shared-expert MLP: ``up_proj`` rows / ``s``, ``down_proj`` columns * ``s``."""
    up, down = model.get_submodule(up_name), model.get_submodule(down_name)
    wmax = column_absmax(down.weight)
    x = stats.tokens(down.in_features)
    wq, aq = ctx.quantizers(down)
    return Site(
        mlp, "mlp_down",
        candidate=lambda a: ctx.scales(stats.max, wmax, a),
        error=lambda s: reconstruction_error(down.weight, x, s, wq, aq),
        apply=lambda s: _fold_up_down(up, down, s, power))
