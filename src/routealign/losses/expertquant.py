"""``expertquant`` (ExpertQuant eqs. 5-9): ``λ_RAJ·(1 - J_W) + λ_GH·L_GH`` with
``L_GH = mean_r max(0, Δ^fp_r - Δ^q_r + γ_GH)`` over adjacent full-precision top-k experts.

The rank-aware Jaccard ``J_W`` of index sets has no gradient; we use a soft version: each candidate expert's
quantized rank is ``1 + Σ_e' sigmoid((s_e' - s_e)/τ)`` and its membership in the top-k ``sigmoid((k + ½ -
rank)/τ_rank)``, giving soft affinities ``β^(rank-1)·membership``; the same soft affinities are computed for the
full-precision scores, so the surrogate is exactly zero when the two routers agree and tends to ``1 - J_W`` as τ →
0. Candidates are the full-precision top ``k + c`` experts; ``τ`` is ``tau`` times the token's mean adjacent
full-precision gap among them. The exact ``J_W`` (no gradient) is :func:`routealign.metrics.rank_weighted_jaccard`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import Objective, RouterTarget, adjacent_gaps, gather, register

__all__ = ["ExpertQuant", "ExpertQuantSettings", "gap_hinge", "soft_rank_jaccard"]


class ExpertQuantSettings(BaseModel):
    """ExpertQuant's terms (defaults: the paper's Sec. 3.3-3.4, App. B)."""

    model_config = ConfigDict(extra="forbid")

    raj_beta: float = Field(0.95, gt=0, le=1, description="β: rank discount of the rank-aware Jaccard.")
    lambda_raj: float = Field(1.0, ge=0, description="λ_RAJ: weight of the soft rank-aware Jaccard term.")
    lambda_gh: float = Field(1.0, ge=0, description="λ_GH: weight of the gap-hinge term.")
    gh_gamma: float = Field(0.0, ge=0, description="γ_GH: margin of the gap hinge.")
    tau: float = Field(0.5, gt=0, description=(
        "temperature of the soft ranks, in units of the token's mean adjacent full-precision gap."))
    candidates: int | None = Field(None, ge=1, description=(
        "candidates beyond the top-k for the soft Jaccard (none: k)."))


def gap_hinge(loss, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    if loss.k < 2:
        return sq.new_zeros(())
    idx = tgt.order[:, : loss.k]
    gap = adjacent_gaps(tgt.structure, idx) - adjacent_gaps(sq, idx) + loss.params.gh_gamma
    return gap.clamp_min(0).mean()


def _soft_affinity(loss, s: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Soft ``β^(rank-1)·[rank <= k]`` of each candidate; invalid (group-masked) candidates neither count as being
    above another expert nor get an affinity."""
    v = gather(s, cand)  # [T, n]
    n = v.shape[1]
    above = torch.sigmoid((v.unsqueeze(1) - v.unsqueeze(2)) / tau.view(-1, 1, 1))  # [t, e, e']: e' above e
    above = above * valid.unsqueeze(1) * (1 - torch.eye(n, device=v.device, dtype=v.dtype))
    rank = 1 + above.sum(-1)
    member = torch.sigmoid((loss.k + 0.5 - rank) / loss.params.tau)
    return loss.params.raj_beta ** (rank - 1) * member * valid


def soft_rank_jaccard(loss, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    cand = tgt.order
    fp = gather(tgt.scores, cand)
    valid = torch.isfinite(fp)
    fp_valid = torch.where(valid, fp, fp[:, :1])
    spread = fp_valid[:, 0] - fp_valid.min(-1).values
    tau = (loss.params.tau * spread / max(cand.shape[1] - 1, 1)).clamp_min(1e-6)
    a_fp = _soft_affinity(loss, tgt.scores.nan_to_num(neginf=-1e4), cand, valid, tau)
    a_q = _soft_affinity(loss, sq, cand, valid, tau)
    num = torch.minimum(a_fp, a_q).sum(-1)
    den = torch.maximum(a_fp, a_q).sum(-1).clamp_min(1e-12)
    return (1 - num / den).mean()


@register
class ExpertQuant(Objective):
    name = "expertquant"
    Settings = ExpertQuantSettings

    def terms(self, loss, zq, tgt):
        return {"raj": soft_rank_jaccard(loss, loss.selection(zq), tgt),
                "gap_hinge": gap_hinge(loss, loss.structure(zq), tgt)}

    def weights(self, params):
        return {"raj": params.lambda_raj, "gap_hinge": params.lambda_gh}

    def extra(self, params, k):
        return params.candidates if params.candidates is not None else k
