"""``topk_mse`` (EAC-MoE): the mean over the k full-precision experts of ``(z_q - z_fp)^2``."""

from __future__ import annotations

import torch

from .base import Objective, RouterTarget, gather, register

__all__ = ["TopKMSE", "topk_mse"]


def topk_mse(loss, zq: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
    idx = tgt.order[:, : loss.k]
    return (gather(zq, idx) - gather(tgt.logits, idx)).pow(2).mean()


@register
class TopKMSE(Objective):
    name = "topk_mse"

    def terms(self, loss, zq, tgt):
        return {"topk_mse": topk_mse(loss, zq, tgt)}

    def weights(self, params):
        return {"topk_mse": 1.0}
