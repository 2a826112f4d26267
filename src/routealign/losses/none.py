"""``none``: no router term (plain learned rounding, the AutoRound baseline)."""

from __future__ import annotations

from .base import Objective, register

__all__ = ["NoObjective"]


@register
class NoObjective(Objective):
    name = "none"

    def terms(self, loss, zq, tgt):
        return {}

    def weights(self, params):
        return {}
