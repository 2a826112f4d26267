"""Router objectives for learned rounding.

Every objective compares the quantized router's logits ``z_q`` (``[T, E]``, with gradient) with the full-precision
router's logits ``z_fp`` on the same tokens, in float32, in the router family's own spaces (see
:mod:`routealign.routing`):

- *value space* is the raw logits ``z``;
- *selection space* ``s(z)`` is what the model ranks by: logits for softmax and GPT-OSS routers,
  ``sigmoid(z) + e_score_correction_bias`` for sigmoid routers. The full-precision order ``π`` is taken with the
  model's own group-limited masking; the quantized side is read at ``π``'s experts without masking (masking is
  discrete and carries no gradient).
- *structure space* (``structure_space``) is where the structure terms (VSRAQ's rank and margin, ExpertQuant's
  gap hinge) measure gaps between experts taken in the full-precision order: ``logits`` (default; both papers write
  these terms on logits, VSRAQ eqs. 13-15 and ExpertQuant eqs. 6-8) or ``scores`` (selection space). The two are
  the same for softmax and GPT-OSS routers; for sigmoid routers score gaps scale the gradient by
  ``sigmoid'(z) <= 0.25``, so the structure terms act about four times more weakly there.

Objectives (``objective`` field):

``none``
    0: plain learned rounding, the AutoRound baseline.
``topk_mse`` (EAC-MoE)
    mean over the k full-precision experts of ``(z_q - z_fp)^2``.
``kl`` (EAQuant)
    KL(p_fp || p_q) of the top-k combine-weight distributions at the full-precision experts, with the family's own
    weighting (softmax over the k logits, or normalised sigmoids), normalised to sum to one.
``vsraq`` (VSRAQ, eqs. 7-17)
    ``(1-α)·TopK-MSE + α·L_sig + β_rank·L_rank + β_margin·L_margin`` with
    ``L_sig = mean w·(σ(z_q) - σ(z_fp))^2``, ``w = (p_fp(1-p_fp))^γ + ε``; ``L_rank`` over adjacent full-precision
    top-k experts; ``L_margin = mean_j (Δ_j^q - Δ_j^fp)^2`` with ``Δ_j = z_π(k) - z_π(k+j)``, j = 1..b (in
    structure space).
    The paper's ``L_rank = mean softplus(m - (s^q_π(i) - s^q_π(i+1)))`` is not zero when quantized equals full
    precision and keeps widening every gap past the full-precision one. With ``rank_anchor=True`` (default) we
    subtract the full-precision level and clamp at zero:
    ``max(0, softplus(m - Δ^q_i) - softplus(m - Δ^fp_i))``: the same gradient as the paper's wherever a quantized
    gap is smaller than the full-precision gap, none where it is not. ``rank_anchor=False`` is the paper's formula.
``expertquant`` (ExpertQuant eqs. 5-9)
    ``λ_RAJ·(1 - J_W) + λ_GH·L_GH`` with ``L_GH = mean_r max(0, Δ^fp_r - Δ^q_r + γ_GH)`` over adjacent
    full-precision top-k experts. The rank-aware Jaccard ``J_W`` of index sets has no gradient; we use a soft
    version: each candidate expert's quantized rank is ``1 + Σ_e' sigmoid((s_e' - s_e)/τ)`` and its membership in the
    top-k ``sigmoid((k + ½ - rank)/τ_rank)``, giving soft affinities ``β^(rank-1)·membership``; the same soft
    affinities are computed for the full-precision scores, so the surrogate is exactly zero when the two routers
    agree and tends to ``1 - J_W`` as τ → 0. Candidates are the full-precision top ``k + c`` experts; ``τ`` is
    ``tau`` times the token's mean adjacent full-precision gap among them. The exact ``J_W`` (no gradient) is
    :func:`routealign.metrics.rank_weighted_jaccard`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

import torch
import torch.nn.functional as F

from .routing import RouterFamily

__all__ = ["Objective", "StructureSpace", "RouterLossConfig", "RouterTarget", "RouterLoss", "OBJECTIVES"]

Objective = Literal["none", "topk_mse", "kl", "vsraq", "expertquant"]
OBJECTIVES: tuple[str, ...] = ("none", "topk_mse", "kl", "vsraq", "expertquant")


StructureSpace = Literal["logits", "scores"]


class RouterLossConfig(BaseModel):
    """Hyperparameters of the router objectives; defaults are the papers'. The one declaration of these fields:
    :class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective = "vsraq"
    # where the structure terms (VSRAQ rank and margin, ExpertQuant gap hinge) measure gaps: the raw logits, as
    # both papers write them (VSRAQ eqs. 13-15, ExpertQuant eqs. 6-8), or the selection scores
    structure_space: StructureSpace = "logits"
    # VSRAQ (Table 1)
    alpha: float = Field(0.3, ge=0, le=1)
    gamma: float = Field(1.0, ge=0)
    eps: float = Field(1e-3, ge=0)
    rank_margin: float = 0.0
    beta_rank: float = Field(0.01, ge=0)
    beta_margin: float = Field(0.05, ge=0)
    boundary: int = Field(1, ge=1)
    rank_anchor: bool = True
    # ExpertQuant (Sec. 3.3-3.4, App. B)
    raj_beta: float = Field(0.95, gt=0, le=1)
    lambda_raj: float = Field(1.0, ge=0)
    lambda_gh: float = Field(1.0, ge=0)
    gh_gamma: float = Field(0.0, ge=0)
    tau: float = Field(0.5, gt=0)
    candidates: int | None = Field(None, ge=1)  # extra candidates beyond k for the soft Jaccard (default k)

    @classmethod
    def of(cls, settings) -> "RouterLossConfig":
        """The config carried by ``settings`` (an object with these fields, e.g. the modifier)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})


@dataclass
class RouterTarget:
    """Full-precision routing of a set of tokens, precomputed once (no gradient)."""

    logits: torch.Tensor  # [T, E] float32
    scores: torch.Tensor  # [T, E] float32 selection scores (masked entries -inf)
    order: torch.Tensor  # [T, n] experts in full-precision order, n = k + extra (masked ones cut)
    structure: torch.Tensor  # [T, E] float32 full-precision values in structure space (group-masked: -inf)

    def __getitem__(self, index) -> "RouterTarget":
        return RouterTarget(self.logits[index], self.scores[index], self.order[index], self.structure[index])


class RouterLoss:
    """One router's objective: ``target(z_fp)`` once, then ``loss(z_q, target)`` per step."""

    def __init__(self, config: RouterLossConfig, family: RouterFamily, router: torch.nn.Module):
        self.config = config
        self.family = family
        self.router = router
        self.k = int(router.top_k)
        self.num_experts = int(router.num_experts)
        self.extra = max(config.boundary, config.candidates if config.candidates is not None else self.k)
        self.extra = min(self.extra, self.num_experts - self.k)

    def selection(self, logits: torch.Tensor) -> torch.Tensor:
        """Selection-space scores without group masking (differentiable)."""
        z = logits.float()
        if self.family.selection == "sigmoid_bias":
            return z.sigmoid() + self.router.e_score_correction_bias.float()
        return z

    def structure(self, logits: torch.Tensor) -> torch.Tensor:
        """Where the structure terms measure gaps (``structure_space``): logits, or selection scores."""
        return logits.float() if self.config.structure_space == "logits" else self.selection(logits)

    @torch.no_grad()
    def target(self, logits_fp: torch.Tensor) -> RouterTarget:
        z = logits_fp.reshape(-1, logits_fp.shape[-1]).float()
        scores = self.family.rank_scores(self.router, z)
        order = torch.topk(scores, self.k + self.extra, dim=-1).indices
        structure = scores if self.config.structure_space == "scores" else z.masked_fill(scores.isneginf(), -math.inf)
        return RouterTarget(logits=z, scores=scores, order=order, structure=structure)

    # -- terms --------------------------------------------------------------------------------------------
    def _gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.gather(1, idx)

    def topk_mse(self, zq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        idx = tgt.order[:, : self.k]
        return (self._gather(zq, idx) - self._gather(tgt.logits, idx)).pow(2).mean()

    def sigmoid_mse(self, zq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        idx = tgt.order[:, : self.k]
        p_fp = self._gather(tgt.logits, idx).sigmoid()
        weight = (p_fp * (1 - p_fp)).pow(self.config.gamma) + self.config.eps
        return (weight * (self._gather(zq, idx).sigmoid() - p_fp).pow(2)).mean()

    def _adjacent_gaps(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        v = self._gather(s, idx)
        return v[:, :-1] - v[:, 1:]

    def rank_loss(self, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        if self.k < 2:
            return sq.new_zeros(())
        idx = tgt.order[:, : self.k]
        m = self.config.rank_margin
        loss = F.softplus(m - self._adjacent_gaps(sq, idx))
        if self.config.rank_anchor:
            loss = (loss - F.softplus(m - self._adjacent_gaps(tgt.structure, idx))).clamp_min(0)
        return loss.mean()

    def margin_loss(self, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        b = min(self.config.boundary, tgt.order.shape[1] - self.k)
        if b < 1:
            return sq.new_zeros(())
        kth = tgt.order[:, self.k - 1 : self.k]
        after = tgt.order[:, self.k : self.k + b]
        d_q = self._gather(sq, kth) - self._gather(sq, after)
        d_fp = self._gather(tgt.structure, kth) - self._gather(tgt.structure, after)
        valid = torch.isfinite(d_fp)
        return torch.where(valid, d_q - d_fp.nan_to_num(0.0, posinf=0.0), torch.zeros_like(d_q)).pow(2).sum() \
            / valid.sum().clamp_min(1)

    def kl(self, zq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        idx = tgt.order[:, : self.k]

        def dist(z):
            w = self.family.weights_for(self.router, z, idx).float()
            return w / w.sum(-1, keepdim=True).clamp_min(1e-20)

        p, q = dist(tgt.logits), dist(zq.float())
        return (p * (p.clamp_min(1e-20).log() - q.clamp_min(1e-20).log())).sum(-1).mean()

    def gap_hinge(self, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        if self.k < 2:
            return sq.new_zeros(())
        idx = tgt.order[:, : self.k]
        gap = self._adjacent_gaps(tgt.structure, idx) - self._adjacent_gaps(sq, idx) + self.config.gh_gamma
        return gap.clamp_min(0).mean()

    def _soft_affinity(self, s: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor,
                       tau: torch.Tensor) -> torch.Tensor:
        """Soft ``β^(rank-1)·[rank <= k]`` of each candidate; invalid (group-masked) candidates neither count as
        being above another expert nor get an affinity."""
        v = self._gather(s, cand)  # [T, n]
        n = v.shape[1]
        above = torch.sigmoid((v.unsqueeze(1) - v.unsqueeze(2)) / tau.view(-1, 1, 1))  # [t, e, e']: e' above e
        above = above * valid.unsqueeze(1) * (1 - torch.eye(n, device=v.device, dtype=v.dtype))
        rank = 1 + above.sum(-1)
        member = torch.sigmoid((self.k + 0.5 - rank) / self.config.tau)
        return self.config.raj_beta ** (rank - 1) * member * valid

    def soft_rank_jaccard(self, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        cand = tgt.order
        fp = self._gather(tgt.scores, cand)
        valid = torch.isfinite(fp)
        fp_valid = torch.where(valid, fp, fp[:, :1])
        spread = fp_valid[:, 0] - fp_valid.min(-1).values
        tau = (self.config.tau * spread / max(cand.shape[1] - 1, 1)).clamp_min(1e-6)
        a_fp = self._soft_affinity(tgt.scores.nan_to_num(neginf=-1e4), cand, valid, tau)
        a_q = self._soft_affinity(sq, cand, valid, tau)
        num = torch.minimum(a_fp, a_q).sum(-1)
        den = torch.maximum(a_fp, a_q).sum(-1).clamp_min(1e-12)
        return (1 - num / den).mean()

    # -- objectives ---------------------------------------------------------------------------------------
    def terms(self, logits_q: torch.Tensor, tgt: RouterTarget) -> dict[str, torch.Tensor]:
        """The named terms of the configured objective (unweighted)."""
        zq = logits_q.reshape(-1, logits_q.shape[-1]).float()
        obj = self.config.objective
        if obj == "none":
            return {}
        if obj == "topk_mse":
            return {"topk_mse": self.topk_mse(zq, tgt)}
        if obj == "kl":
            return {"kl": self.kl(zq, tgt)}
        st = self.structure(zq)
        if obj == "vsraq":
            return {"topk_mse": self.topk_mse(zq, tgt), "sigmoid_mse": self.sigmoid_mse(zq, tgt),
                    "rank": self.rank_loss(st, tgt), "margin": self.margin_loss(st, tgt)}
        if obj == "expertquant":
            return {"raj": self.soft_rank_jaccard(self.selection(zq), tgt), "gap_hinge": self.gap_hinge(st, tgt)}
        raise ValueError(f"unknown router objective '{obj}'; known: {', '.join(OBJECTIVES)}")

    def weights(self) -> dict[str, float]:
        c = self.config
        return {"topk_mse": (1 - c.alpha) if c.objective == "vsraq" else 1.0, "sigmoid_mse": c.alpha,
                "rank": c.beta_rank, "margin": c.beta_margin, "kl": 1.0, "raj": c.lambda_raj, "gap_hinge": c.lambda_gh}

    def __call__(self, logits_q: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        terms = self.terms(logits_q, tgt)
        weights = self.weights()
        total = logits_q.new_zeros((), dtype=torch.float32)
        for name, value in terms.items():
            total = total + weights[name] * value
        return total
