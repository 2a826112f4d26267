"""``vsraq`` (VSRAQ, eqs. 7-17): ``(1-α)·TopK-MSE + α·L_sig + β_rank·L_rank + β_margin·L_margin`` with
``L_sig = mean w·(σ(z_q) - σ(z_fp))^2``, ``w = (p_fp(1-p_fp))^γ + ε``; ``L_rank`` over adjacent full-precision
top-k experts; ``L_margin = mean_j (Δ_j^q - Δ_j^fp)^2`` with ``Δ_j = z_π(k) - z_π(k+j)``, j = 1..b (in structure
space).

The paper's ``L_rank = mean softplus(m - (s^q_π(i) - s^q_π(i+1)))`` is not zero when quantized equals full precision
and keeps widening every gap past the full-precision one. With ``rank_anchor=True`` (default) we subtract the
full-precision level and clamp at zero: ``max(0, softplus(m - Δ^q_i) - softplus(m - Δ^fp_i))``: the same gradient
as the paper's wherever a quantized gap is smaller than the full-precision gap, none where it is not.
``rank_anchor=False`` is the paper's formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import Objective, RouterTarget, adjacent_gaps, gather, register
from .topk_mse import topk_mse

__all__ = ["VSRAQ", "VSRAQSettings", "sigmoid_mse", "rank_loss", "margin_loss"]


class VSRAQSettings(BaseModel):
    """VSRAQ's terms (defaults: the paper's Table 1)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.3, ge=0, le=1, description="α: the mix of the sigmoid value term against TopK-MSE.")
    gamma: float = Field(1.0, ge=0, description="γ: exponent of the sigmoid term's weight `(p(1-p))^γ + ε`.")
    eps: float = Field(1e-3, ge=0, description="ε: floor of the sigmoid term's weight.")
    rank_margin: float = Field(0.0, description="m: margin of the adjacent-rank softplus.")
    beta_rank: float = Field(0.01, ge=0, description="β_rank: weight of the adjacent-rank term.")
    beta_margin: float = Field(0.05, ge=0, description="β_margin: weight of the top-k boundary margin term.")
    boundary: int = Field(1, ge=1, description="b: margins `z_k - z_{k+j}`, j = 1..b, beyond the top-k.")
    rank_anchor: bool = Field(True, description=(
        "subtract the full-precision level from the rank term (zero when quantized equals full precision); "
        "false is the paper's formula."))


def sigmoid_mse(loss, zq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    idx = tgt.order[:, : loss.k]
    p_fp = gather(tgt.logits, idx).sigmoid()
    weight = (p_fp * (1 - p_fp)).pow(loss.params.gamma) + loss.params.eps
    return (weight * (gather(zq, idx).sigmoid() - p_fp).pow(2)).mean()


def rank_loss(loss, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    if loss.k < 2:
        return sq.new_zeros(())
    idx = tgt.order[:, : loss.k]
    m = loss.params.rank_margin
    value = F.softplus(m - adjacent_gaps(sq, idx))
    if loss.params.rank_anchor:
        value = (value - F.softplus(m - adjacent_gaps(tgt.structure, idx))).clamp_min(0)
    return value.mean()


def margin_loss(loss, sq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    b = min(loss.params.boundary, tgt.order.shape[1] - loss.k)
    if b < 1:
        return sq.new_zeros(())
    kth = tgt.order[:, loss.k - 1 : loss.k]
    after = tgt.order[:, loss.k : loss.k + b]
    d_q = gather(sq, kth) - gather(sq, after)
    d_fp = gather(tgt.structure, kth) - gather(tgt.structure, after)
    valid = torch.isfinite(d_fp)
    return torch.where(valid, d_q - d_fp.nan_to_num(0.0, posinf=0.0), torch.zeros_like(d_q)).pow(2).sum() \
        / valid.sum().clamp_min(1)


@register
class VSRAQ(Objective):
    name = "vsraq"
    Settings = VSRAQSettings

    def terms(self, loss, zq, tgt):
        st = loss.structure(zq)
        return {"topk_mse": topk_mse(loss, zq, tgt), "sigmoid_mse": sigmoid_mse(loss, zq, tgt),
                "rank": rank_loss(loss, st, tgt), "margin": margin_loss(loss, st, tgt)}

    def weights(self, params):
        return {"topk_mse": 1 - params.alpha, "sigmoid_mse": params.alpha, "rank": params.beta_rank,
                "margin": params.beta_margin}

    def extra(self, params, k):
        return max(params.boundary, k)

    def check(self, params, layers, where):
        from ..validation import check_router_settings

        check_router_settings(layers, params.boundary, f"{where}.loss.vsraq")
