"""``kl`` (EAQuant): KL(p_fp || p_q) of the top-k combine-weight distributions at the full-precision experts, with
the family's own weighting (softmax over the k logits, or normalised sigmoids), normalised to sum to one."""

from __future__ import annotations

import torch

from .base import Objective, RouterTarget, register

__all__ = ["KL", "kl"]


def kl(loss, zq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    idx = tgt.order[:, : loss.k]

    def dist(z):
        w = loss.family.weights_for(loss.router, z, idx).float()
        return w / w.sum(-1, keepdim=True).clamp_min(1e-20)

    p, q = dist(tgt.logits), dist(zq.float())
    return (p * (p.clamp_min(1e-20).log() - q.clamp_min(1e-20).log())).sum(-1).mean()


@register
class KL(Objective):
    name = "kl"

    def terms(self, loss, zq, tgt):
        return {"kl": kl(loss, zq, tgt)}

    def weights(self, params):
        return {"kl": 1.0}
