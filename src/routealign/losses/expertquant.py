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

from .base import Objective, RouterTarget, adjacent_gaps, gather, register

__all__ = ["ExpertQuant", "gap_hinge", "soft_rank_jaccard"]


def gap_hinge(loss, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    if loss.k < 2:
        return sq.new_zeros(())
    idx = tgt.order[:, : loss.k]
    gap = adjacent_gaps(tgt.structure, idx) - adjacent_gaps(sq, idx) + loss.config.gh_gamma
    return gap.clamp_min(0).mean()


def _soft_affinity(loss, s: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Soft ``β^(rank-1)·[rank <= k]`` of each candidate; invalid (group-masked) candidates neither count as being
    above another expert nor get an affinity."""
    v = gather(s, cand)  # [T, n]
    n = v.shape[1]
    above = torch.sigmoid((v.unsqueeze(1) - v.unsqueeze(2)) / tau.view(-1, 1, 1))  # [t, e, e']: e' above e
    above = above * valid.unsqueeze(1) * (1 - torch.eye(n, device=v.device, dtype=v.dtype))
    rank = 1 + above.sum(-1)
    member = torch.sigmoid((loss.k + 0.5 - rank) / loss.config.tau)
    return loss.config.raj_beta ** (rank - 1) * member * valid


def soft_rank_jaccard(loss, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    cand = tgt.order
    fp = gather(tgt.scores, cand)
    valid = torch.isfinite(fp)
    fp_valid = torch.where(valid, fp, fp[:, :1])
    spread = fp_valid[:, 0] - fp_valid.min(-1).values
    tau = (loss.config.tau * spread / max(cand.shape[1] - 1, 1)).clamp_min(1e-6)
    a_fp = _soft_affinity(loss, tgt.scores.nan_to_num(neginf=-1e4), cand, valid, tau)
    a_q = _soft_affinity(loss, sq, cand, valid, tau)
    num = torch.minimum(a_fp, a_q).sum(-1)
    den = torch.maximum(a_fp, a_q).sum(-1).clamp_min(1e-12)
    return (1 - num / den).mean()


@register
class ExpertQuant(Objective):
    name = "expertquant"

    def terms(self, loss, zq, tgt):
        return {"raj": soft_rank_jaccard(loss, loss.selection(zq), tgt),
                "gap_hinge": gap_hinge(loss, loss.structure(zq), tgt)}

    def weights(self, config):
        return {"raj": config.lambda_raj, "gap_hinge": config.lambda_gh}
