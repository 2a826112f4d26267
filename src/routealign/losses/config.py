"""The ``loss`` settings group of :class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier`
(:class:`LossSettings`): how the router term enters the step, where its structure terms measure gaps, and one
section per objective with that objective's own typed settings (``loss: {vsraq: {alpha: 0.3}}``), declared by the
objective's module (:attr:`~routealign.losses.base.Objective.Settings`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["LossSettings", "StructureSpace", "RouterBalance"]

StructureSpace = Literal["logits", "scores"]
RouterBalance = Literal["none", "grad_norm", "output"]


class LossSettings(BaseModel):
    """How the router objective is weighed and measured; each objective's own settings under its name."""

    model_config = ConfigDict(extra="allow")

    balance: RouterBalance = Field("grad_norm", description=(
        "how the router term's gradient joins the MSE gradient before the sign step: `none` adds `router_weight` "
        "times it; `grad_norm` rescales it per tensor to `router_weight` times the MSE gradient's norm (signed steps "
        "ignore magnitudes, so an unbalanced router gradient would decide every sign it outweighs); `output` "
        "balances the two at the block's output, so one backward through the block forms the step, not two "
        "(`router_scope: next` only)."))
    structure_space: StructureSpace = Field("logits", description=(
        "where the structure terms (VSRAQ's rank and margin, ExpertQuant's gap hinge) measure gaps: the raw "
        "`logits`, as both papers write them, or the selection `scores` (differs for sigmoid routers only)."))

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data):
        if not isinstance(data, dict):
            return data
        from . import names, objective

        out, known = dict(data), names()
        for key, value in data.items():
            if key in cls.model_fields:
                continue
            if key not in known:
                raise ValueError(f"loss.{key}: neither a loss setting ({', '.join(cls.model_fields)}) nor a router "
                                 f"objective ({', '.join(known)})")
            settings = objective(key).Settings
            if settings is None:
                raise ValueError(f"loss.{key}: router objective '{key}' has no settings")
            try:
                out[key] = value if isinstance(value, settings) else settings.model_validate(value or {})
            except ValidationError as exc:
                raise ValueError("; ".join(f"loss.{key}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in exc.errors())) from None
        return out

    @classmethod
    def sections(cls) -> dict[str, type[BaseModel]]:
        """Each registered objective's settings model, by objective name (the sections this group takes)."""
        from . import names, objective

        return {name: objective(name).Settings for name in names() if objective(name).Settings is not None}

    def of(self, name: str) -> BaseModel | None:
        """The settings of objective ``name``: its section, or its defaults; None for an objective without any."""
        from . import objective

        section = (self.model_extra or {}).get(name)
        if section is not None:
            return section
        settings = objective(name).Settings
        return None if settings is None else settings()
