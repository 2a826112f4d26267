"""Settings of the learned-rounding algorithm (:class:`TuningConfig`), declared once, each field described once in
its ``Field(description=...)``: :class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them.

Twelve top-level fields a user sets; the rest in typed groups: ``holdout`` (what the held-out sequences decide),
``gate`` (the router term kept per block or not), ``memory`` (how a layer fits the accelerator), ``rounding`` (the
grid, the start, the streams) and ``loss`` (how the router term enters the step, plus one section per objective).
A name that moved into a group is refused with its new place (:data:`MOVED`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...losses import LossSettings
from ..fields import renamed

__all__ = ["TuningConfig", "RouterScope", "HoldoutSettings", "GateSettings", "MemorySettings", "RoundingSettings",
           "MOVED", "moved"]

RouterScope = Literal["block", "next", "both"]


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HoldoutSettings(_Group):
    """``holdout``: the calibration sequences held out of the tuning steps and what they decide. A number is the
    fraction (``holdout: 0.25``)."""

    fraction: float = Field(0.125, ge=0, lt=1, description=(
        "fraction of the calibration sequences held out of the tuning steps; they choose the iteration kept and "
        "whether the router term stays in a block (0: the last iteration, no gate)."))
    every: int = Field(10, ge=1, description="iterations between held-out evaluations.")
    decide_on: Literal["next_router", "lm_head"] = Field("next_router", description=(
        "what the held-out decisions (the iteration kept, the gate, the headroom rule) measure: `next_router`, the "
        "error at the output of the first routing layer downstream; `lm_head`, the KL divergence of the next-token "
        "distribution with every later layer unquantized (what held-out perplexity sees)."))
    iteration_on: Literal["heldout_loss", "lm_head"] = Field("heldout_loss", description=(
        "what picks each arm's iteration: the tuning objective on the held-out sequences, or the next-token KL at "
        "the LM head (every held-out evaluation then runs the rest of the model: cost grows with depth squared)."))

    @model_validator(mode="before")
    @classmethod
    def _number(cls, data):
        return {"fraction": data} if isinstance(data, (int, float)) and not isinstance(data, bool) else data


class GateSettings(_Group):
    """``gate``: with a router objective, each block tuned with and without it, the better kept on held-out
    sequences. ``gate: false`` turns it off."""

    enabled: bool = Field(True, description=(
        "tune each block with and without the router term and keep the one with the smaller held-out error "
        "(reported per layer: `router`, `arms`, `gate`)."))
    z: float = Field(1.645, ge=0, description=(
        "standard errors of the paired per-sequence difference the router arm must win by (1.645: one-sided 95%; "
        "0 keeps any mean improvement)."))
    headroom: bool = Field(True, description=(
        "with `router_scope: next`: run the router arm only where forcing the unquantized expert choices at the next "
        "router significantly lowers the held-out error of the block tuned without it; elsewhere the block costs "
        "what plain rounding costs."))
    arm: Literal["restart", "refine"] = Field("restart", description=(
        "the router arm `restart`s from the start (the plain arm's start and minibatches) or `refine`s the plain "
        "arm's last iteration for `refine_fraction` of the iterations."))
    refine_fraction: float = Field(0.25, gt=0, le=1, description="the refine arm's share of `iters`.")

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data):
        return {"enabled": data} if isinstance(data, bool) else data


class MemorySettings(_Group):
    """``memory``: how a layer's tuning fits the accelerator."""

    expert_chunk: int = Field(0, ge=0, description=(
        "tune a MoE layer's experts this many at a time (0: all at once), each chunk for `iters` iterations against "
        "the chunks before it quantized and those after it unquantized: a chunk's tuning state at the chunks' count "
        "times the time."))
    max_tuning_gib: float | None = Field(None, gt=0, description=(
        "with `expert_chunk` 0: the largest chunk whose predicted tuning memory fits this budget "
        "(modifiers.rounding.memory)."))
    offload_activations: bool = Field(False, description=(
        "keep a layer's calibration streams in host memory during its tuning, minibatches copied in per iteration."))
    batched_experts: bool = Field(True, description=(
        "run the experts stacked (grouped matmuls over routed tokens) instead of llm-compressor's per-expert loop "
        "(same values up to float summation order)."))


class RoundingSettings(_Group):
    """``rounding``: the grid, the start and the streams the block-output loss compares."""

    init: Literal["minmax", "mse"] = Field("minmax", description=(
        "where the clip ranges start: `minmax` (the full range, RTN, AutoRound's start) or `mse` (per group the clip "
        "factor minimising the weight reconstruction error)."))
    full_range: bool = Field(True, description=(
        "symmetric int schemes: AutoRound's full-range grid (scale = signed group maximum / 2^(b-1)); false is "
        "compressed-tensors' observer grid and reproduces llm-compressor's QuantizationModifier at `iters: 0`."))
    amp: bool = Field(False, description=(
        "bfloat16 autocast for the tuning forward and backward and the held-out loss (AutoRound's `amp`); rounding "
        "parameters, targets and losses stay float32."))
    min_expert_tokens: int = Field(8, ge=0, description=(
        "experts routed fewer calibration tokens are not tuned: MSE-clipped RTN."))
    quantize_activations: bool = Field(True, description=(
        "schemes with quantized input activations (NVFP4): simulate them in the tuning forward and the propagated "
        "quantized stream."))
    activation_scale_tokens: Literal["routed", "all"] = Field("all", description=(
        "NVFP4 expert activation global scales from `all` tokens (a bound on what any routing sends an expert) or "
        "only the `routed` ones."))
    target_stream: Literal["unquantized", "quantized"] = Field("unquantized", description=(
        "what the block-output MSE compares with: the unquantized block on the `unquantized` stream (also corrects "
        "the earlier layers' error), or on the `quantized` stream the block sees (its own error only, as "
        "AutoRoundModifier and GPTQModifier)."))


class TuningConfig(BaseModel):
    """Settings of the learned-rounding algorithm. The one declaration of these fields:
    :class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them."""

    model_config = ConfigDict(extra="forbid")

    objective: str = Field("vsraq", description=(
        "router objective, a registered name (`routealign.losses.names()`): `none` is plain learned rounding; "
        "`vsraq`, `expertquant`, `topk_mse`, `kl` add a router-alignment term."))
    iters: int = Field(200, ge=0, description="tuning iterations per block (0: round to nearest).")
    lr: float | None = Field(None, gt=0, description="signed-gradient step, decayed linearly to 0 (none: 1/iters).")
    batch_size: int = Field(8, ge=1, description="calibration sequences per iteration.")
    seed: int = Field(0, description="seed of the minibatch order and the held-out split.")
    router_weight: float = Field(0.1, ge=0, description="λ: weight of the router objective against the block MSE.")
    router_scope: RouterScope = Field("next", description=(
        "the routers the objective sees: the block's own (`block`), the first routing layer downstream through the "
        "block's output (`next`), or `both`."))
    holdout: HoldoutSettings = Field(default_factory=HoldoutSettings, description=(
        "the held-out sequences and what they decide (a number: the fraction)."))
    gate: GateSettings = Field(default_factory=GateSettings, description=(
        "the router term kept per block only where it wins on held-out sequences (false: always kept)."))
    memory: MemorySettings = Field(default_factory=MemorySettings, description="how a layer fits the accelerator.")
    rounding: RoundingSettings = Field(default_factory=RoundingSettings, description=(
        "the grid, the start and the streams the loss compares."))
    loss: LossSettings = Field(default_factory=LossSettings, description=(
        "how the router term enters the step, and each objective's own settings under its name."))

    @field_validator("objective")
    @classmethod
    def _registered(cls, value: str) -> str:
        from ...losses import names

        if value not in names():
            raise ValueError(f"unknown router objective '{value}'; known: {', '.join(names())}")
        return value

    # moved() is defined below the class and reads the objectives at validation time
    _moved_names = renamed(lambda: moved(), hint=lambda place: f"write {_nested(place)}")

    @model_validator(mode="after")
    def _output_balance_needs_next_scope(self):
        if self.loss.balance == "output" and self.router_scope != "next":
            raise ValueError(f"loss.balance: output balances the router term at the block's output, which only "
                             f"router_scope: next reaches the block through; router_scope is {self.router_scope}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def params(self):
        """The objective's own settings (``loss.<objective>``), or None."""
        return self.loss.of(self.objective)

    @classmethod
    def of(cls, settings) -> "TuningConfig":
        """The config carried by ``settings`` (an object with these fields, e.g. the modifier)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})


def _nested(path: str) -> str:
    parts = path.split(".")
    return "".join(f"{p}: {{" for p in parts[:-1]) + f"{parts[-1]}: ..." + "}" * (len(parts) - 1)


# the flat names the modifier took before its settings were grouped (issue 41), each with its new place
MOVED = {
    "holdout_every": "holdout.every", "decide_on": "holdout.decide_on", "iteration_on": "holdout.iteration_on",
    "router_gate": "gate.enabled", "router_gate_z": "gate.z", "router_headroom": "gate.headroom",
    "router_arm": "gate.arm", "refine_fraction": "gate.refine_fraction",
    **{name: f"memory.{name}" for name in MemorySettings.model_fields},
    **{name: f"rounding.{name}" for name in RoundingSettings.model_fields},
    "router_balance": "loss.balance", "structure_space": "loss.structure_space",
}


def moved() -> dict[str, str]:
    """:data:`MOVED` plus every registered objective's settings (``alpha`` -> ``loss.vsraq.alpha``)."""
    from ...losses import names, objective

    out = dict(MOVED)
    for name in names():
        settings = objective(name).Settings
        for field in (settings.model_fields if settings is not None else {}):
            out.setdefault(field, f"loss.{name}.{field}")
    return out
