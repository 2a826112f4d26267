"""Hyperparameters of the router objectives (:class:`RouterLossConfig`), declared once:
:class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["RouterLossConfig", "StructureSpace"]

StructureSpace = Literal["logits", "scores"]


class RouterLossConfig(BaseModel):
    """Hyperparameters of the router objectives; defaults are the papers'. The one declaration of these fields:
    :class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them."""

    model_config = ConfigDict(extra="forbid")

    objective: str = "vsraq"  # a registered objective (routealign.losses.names())
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

    @field_validator("objective")
    @classmethod
    def _registered(cls, value: str) -> str:
        from . import names

        if value not in names():
            raise ValueError(f"unknown router objective '{value}'; known: {', '.join(names())}")
        return value

    @classmethod
    def of(cls, settings) -> "RouterLossConfig":
        """The config carried by ``settings`` (an object with these fields, e.g. the modifier)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})
