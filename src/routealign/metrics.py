"""Routing-consistency metrics between a reference and a quantized model.

Per-token functions take ordered top-k index tensors ``ref``/``quant`` of shape ``[T, k]`` (best first) and return
``[T]`` float tensors; :class:`RoutingAgreement` accumulates them per MoE layer over a whole evaluation and reports
per-layer values and their mean over layers (positions first, then layers, as the shared protocol does).

Definitions (``I`` = reference top-k, ``J`` = quantized top-k, ``o = |I ∩ J|``):

- overlap@k = o / k; Jaccard = o / |I ∪ J| = o / (2k - o); exact set = [I == J as sets]; top-1 = [i_1 == j_1].
- Match Score (ExpertQuant eq. 10): mean over r = 1..k of 1 / (1 + |r - ρ_q(i_r)|), where ρ_q is the rank in J
  and an expert missing from J gets 0.
- Rank-weighted Jaccard (ExpertQuant eq. 5): affinity vectors with geometric weights w_r = β^(r-1) (β = 0.95);
  Σ min / Σ max. With W = Σ_r w_r and S = Σ over shared experts of min(w_rank_in_I, w_rank_in_J), it equals
  S / (2W - S).
- Routing KL(ref || quant): softmax routers over the full expert softmax; sigmoid routers the mean over experts
  of the per-expert Bernoulli KL.
- Combine-weight L1: Σ_e |π_ref(e) - π_q(e)| with π zero for unchosen experts.
- Expert-load drift: total-variation distance ½ Σ_e |load_ref(e) - load_q(e)| of the assignment frequencies.
- Boundary margin: reference k-th minus (k+1)-th ranking score (logits for softmax/GPT-OSS routers, corrected
  sigmoid score for sigmoid routers); its histogram tells how many tokens are one small perturbation from a flip.

Worked example (k = 4, one adjacent swap, I = (a, b, c, d), J = (a, b, d, c)): overlap = Jaccard = exact = top-1 = 1,
Match Score = (1 + 1 + ½ + ½) / 4 = 0.75, rank-weighted Jaccard = 3.664750 / 3.755000 = 0.975966.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .routing import RouterFamily, Routing

__all__ = [
    "overlap_at_k",
    "jaccard",
    "exact_set",
    "top1_agreement",
    "quantized_ranks",
    "match_score",
    "rank_weighted_jaccard",
    "routing_kl",
    "weights_l1",
    "expert_load",
    "load_drift",
    "RoutingAgreement",
    "METRIC_NAMES",
]

METRIC_NAMES = (
    "overlap_at_k",
    "jaccard",
    "exact_set",
    "top1",
    "match_score",
    "rank_weighted_jaccard",
    "routing_kl",
    "weights_l1",
)


def _membership(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """``[T, k, k]`` bool: ``[t, r, s]`` is true when reference rank r and quantized rank s are the same expert."""
    return ref.unsqueeze(-1) == quant.unsqueeze(-2)


def _shared(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    return _membership(ref, quant).any(-1).sum(-1).float()


def overlap_at_k(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    return _shared(ref, quant) / ref.shape[-1]


def jaccard(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    shared = _shared(ref, quant)
    return shared / (2 * ref.shape[-1] - shared)


def exact_set(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    return (_shared(ref, quant) == ref.shape[-1]).float()


def top1_agreement(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    return (ref[:, 0] == quant[:, 0]).float()


def quantized_ranks(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` long: 0-based rank in ``quant`` of each reference expert, ``k`` when it left the top-k."""
    member = _membership(ref, quant)
    k = ref.shape[-1]
    return torch.where(member.any(-1), member.float().argmax(-1), torch.full_like(ref, k))


def match_score(ref: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
    """ExpertQuant eq. 10 per token."""
    k = ref.shape[-1]
    ranks = quantized_ranks(ref, quant)
    r = torch.arange(k, device=ref.device).expand_as(ranks)
    credit = 1.0 / (1.0 + (r - ranks).abs().float())
    return torch.where(ranks < k, credit, torch.zeros_like(credit)).mean(-1)


def rank_weighted_jaccard(ref: torch.Tensor, quant: torch.Tensor, beta: float = 0.95) -> torch.Tensor:
    """ExpertQuant eq. 5 (``J_W``) per token, geometric rank weights ``beta**(r-1)``."""
    k = ref.shape[-1]
    w = beta ** torch.arange(k, device=ref.device, dtype=torch.float64)
    member = _membership(ref, quant)
    pair_min = torch.minimum(w.view(k, 1), w.view(1, k))  # [r, s]
    s_min = (member.double() * pair_min).sum(dim=(-1, -2))
    return (s_min / (2 * w.sum() - s_min)).float()


def routing_kl(family: RouterFamily, ref: Routing, quant: Routing) -> torch.Tensor:
    """KL(ref || quant) of the routing distributions per token (see module docstring)."""
    if family.bernoulli:
        lp, lq = F.logsigmoid(ref.logits), F.logsigmoid(quant.logits)
        ln, lnq = F.logsigmoid(-ref.logits), F.logsigmoid(-quant.logits)
        kl = lp.exp() * (lp - lq) + ln.exp() * (ln - lnq)
        return kl.mean(-1)
    lp, lq = F.log_softmax(ref.logits, -1), F.log_softmax(quant.logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def weights_l1(ref: Routing, quant: Routing) -> torch.Tensor:
    return (ref.dense_weights() - quant.dense_weights()).abs().sum(-1)


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` float64 count of token-to-expert assignments."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts).double()


def load_drift(load_ref: torch.Tensor, load_quant: torch.Tensor) -> float:
    """Total-variation distance between two assignment-frequency vectors."""
    p = load_ref / load_ref.sum().clamp_min(1)
    q = load_quant / load_quant.sum().clamp_min(1)
    return float(0.5 * (p - q).abs().sum())


@dataclass
class _LayerStats:
    family: str
    top_k: int
    num_experts: int
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {n: 0.0 for n in METRIC_NAMES})
    confusion: torch.Tensor | None = None  # [k, k+1] counts: reference rank x quantized rank (k = left top-k)
    load_ref: torch.Tensor | None = None
    load_quant: torch.Tensor | None = None
    margins: list[torch.Tensor] = field(default_factory=list)
    flipped: list[torch.Tensor] = field(default_factory=list)


class RoutingAgreement:
    """Accumulates routing agreement per MoE layer over batches.

    ``add(layer, family, ref, quant)`` for each layer and batch; ``summary()`` returns per-layer values, the mean
    over layers, confusion matrices and load vectors; ``margins(layer)`` the reference boundary margins and whether
    each token's top-k set changed.
    """

    def __init__(self, beta: float = 0.95):
        self.beta = beta
        self.layers: dict[str, _LayerStats] = {}

    @torch.no_grad()
    def add(self, layer: str, family: RouterFamily, ref: Routing, quant: Routing) -> None:
        k, num_experts = ref.top_k, ref.num_experts
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = _LayerStats(family=family.name, top_k=k, num_experts=num_experts)
            stats.confusion = torch.zeros(k, k + 1, dtype=torch.float64)
            stats.load_ref = torch.zeros(num_experts, dtype=torch.float64)
            stats.load_quant = torch.zeros(num_experts, dtype=torch.float64)
        I, J = ref.indices.cpu(), quant.indices.cpu()
        values = {
            "overlap_at_k": overlap_at_k(I, J),
            "jaccard": jaccard(I, J),
            "exact_set": exact_set(I, J),
            "top1": top1_agreement(I, J),
            "match_score": match_score(I, J),
            "rank_weighted_jaccard": rank_weighted_jaccard(I, J, self.beta),
            "routing_kl": routing_kl(family, ref, quant).cpu(),
            "weights_l1": weights_l1(ref, quant).cpu(),
        }
        for name, value in values.items():
            stats.sums[name] += float(value.double().sum())
        stats.tokens += I.shape[0]
        ranks = quantized_ranks(I, J)
        flat = (torch.arange(k).expand_as(ranks) * (k + 1) + ranks).reshape(-1)
        stats.confusion += torch.bincount(flat, minlength=k * (k + 1)).double().view(k, k + 1)
        stats.load_ref += expert_load(I, num_experts)
        stats.load_quant += expert_load(J, num_experts)
        stats.margins.append(ref.boundary_margin().cpu())
        stats.flipped.append(values["exact_set"] < 1)

    def margins(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.layers[layer]
        return torch.cat(stats.margins), torch.cat(stats.flipped)

    def summary(self) -> dict:
        per_layer = []
        for name, stats in self.layers.items():
            row = {"layer": name, "family": stats.family, "tokens": stats.tokens}
            row.update({m: stats.sums[m] / max(stats.tokens, 1) for m in METRIC_NAMES})
            row["load_drift"] = load_drift(stats.load_ref, stats.load_quant)
            per_layer.append(row)
        names = list(METRIC_NAMES) + ["load_drift"]
        mean = {m: sum(r[m] for r in per_layer) / len(per_layer) for m in names} if per_layer else {}
        return {
            "mean": mean,
            "per_layer": per_layer,
            "confusion": {n: s.confusion.tolist() for n, s in self.layers.items()},
            "load": {n: {"reference": s.load_ref.tolist(), "quantized": s.load_quant.tolist()}
                     for n, s in self.layers.items()},
        }
