"""The router objectives' shared parts: the full-precision target (:class:`RouterTarget`), one router's loss
(:class:`RouterLoss`: its spaces, the target, the configured objective's weighted terms) and the registry of
objectives (:class:`Objective`, :func:`register`): each objective is one module of this package, found by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..routing import RouterFamily

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .config import LossSettings

__all__ = ["RouterTarget", "RouterLoss", "Objective", "register", "REGISTRY", "gather", "adjacent_gaps"]

REGISTRY: dict[str, "Objective"] = {}


class Objective:
    """A router objective: its ``name`` (the ``objective`` field's value), its own typed ``Settings`` (a pydantic
    model, the ``loss: {<name>: ...}`` section of a recipe; None without any), its named ``terms`` on one router's
    quantized logits ``zq`` (``[T, E]`` float32) against the target, and each term's weight from its settings. A new
    objective is one module of :mod:`routealign.losses` defining a subclass decorated with :func:`register`."""

    name: ClassVar[str]
    Settings: ClassVar["type[BaseModel] | None"] = None

    def terms(self, loss: "RouterLoss", zq: torch.Tensor, tgt: "RouterTarget") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def weights(self, params) -> dict[str, float]:
        raise NotImplementedError

    def extra(self, params, k: int) -> int:
        """Experts beyond the top-k the target keeps in full-precision order (capped by the router's experts)."""
        return k

    def check(self, params, layers, where: str) -> None:
        """Refuse settings the model's routers cannot satisfy (an :class:`~routealign.errors.InputError`)."""


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` the objective named ``cls.name``."""
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"router objective '{cls.name}' is defined twice ({type(REGISTRY[cls.name]).__module__}, "
                         f"{cls.__module__})")
    REGISTRY[cls.name] = cls()
    return cls


def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx)


def adjacent_gaps(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``s`` at ``idx`` minus ``s`` at the next index, per token (gaps between experts in the given order)."""
    v = gather(s, idx)
    return v[:, :-1] - v[:, 1:]


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

    def __init__(self, objective: str, settings: "LossSettings", family: RouterFamily, router: torch.nn.Module):
        from . import objective as registered

        self.objective = registered(objective)
        self.params = settings.of(objective)  # the objective's own settings
        self.structure_space = settings.structure_space
        self.family = family
        self.router = router
        self.k = int(router.top_k)
        self.num_experts = int(router.num_experts)
        self.extra = min(self.objective.extra(self.params, self.k), self.num_experts - self.k)

    def selection(self, logits: torch.Tensor) -> torch.Tensor:
        """Selection-space scores without group masking (differentiable)."""
        z = logits.float()
        if self.family.selection == "sigmoid_bias":
            return z.sigmoid() + self.router.e_score_correction_bias.float()
        return z

    def structure(self, logits: torch.Tensor) -> torch.Tensor:
        """Where the structure terms measure gaps (``structure_space``): logits, or selection scores."""
        return logits.float() if self.structure_space == "logits" else self.selection(logits)

    @torch.no_grad()
    def target(self, logits_fp: torch.Tensor) -> RouterTarget:
        z = logits_fp.reshape(-1, logits_fp.shape[-1]).float()
        scores = self.family.rank_scores(self.router, z)
        order = torch.topk(scores, self.k + self.extra, dim=-1).indices
        structure = scores if self.structure_space == "scores" else z.masked_fill(scores.isneginf(), -math.inf)
        return RouterTarget(logits=z, scores=scores, order=order, structure=structure)

    # -- the objective ------------------------------------------------------------------------------------
    def terms(self, logits_q: torch.Tensor, tgt: RouterTarget) -> dict[str, torch.Tensor]:
        """The named terms of the configured objective (unweighted)."""
        return self.objective.terms(self, logits_q.reshape(-1, logits_q.shape[-1]).float(), tgt)

    def weights(self) -> dict[str, float]:
        return self.objective.weights(self.params)

    def __call__(self, logits_q: torch.Tensor, tgt: RouterTarget) -> torch.Tensor:
        terms = self.terms(logits_q, tgt)
        weights = self.weights()
        total = logits_q.new_zeros((), dtype=torch.float32)
        for name, value in terms.items():
            total = total + weights[name] * value
        return total
