"""Settings of the learned-rounding algorithm (:class:`TuningConfig`), declared once:
:class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["TuningConfig", "RouterScope"]

RouterScope = Literal["block", "next", "both"]


class TuningConfig(BaseModel):
    """Settings of the learned-rounding algorithm. The one declaration of these fields:
    :class:`~routealign.modifiers.rounding.RouterAlignedRoundingModifier` inherits them."""

    model_config = ConfigDict(extra="forbid")

    iters: int = Field(200, ge=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    router_weight: float = Field(0.1, ge=0)
    router_scope: RouterScope = "next"
    min_expert_tokens: int = Field(8, ge=0)
    seed: int = 0
    batched_experts: bool = True
    # simulate input-activation quantization (NVFP4) in the tuning forward and the propagated stream
    quantize_activations: bool = True
    # NVFP4 expert activation global scales from all tokens or only the routed ones
    activation_scale_tokens: Literal["routed", "all"] = "all"
    # fraction of the calibration sequences held out of the tuning steps; they choose the iteration kept and
    # whether the router term is used in a block
    holdout: float = Field(0.125, ge=0, lt=1)
    holdout_every: int = Field(10, ge=1)
    # with a router objective: also tune without it and keep, per block, whichever result has the smaller error on
    # the held-out sequences at the output of the first layer downstream that routes
    router_gate: bool = True
    # the router arm is kept only when its held-out downstream error is below the plain arm's by more than this many
    # standard errors of the paired per-sequence difference (0: any mean improvement). Block-level differences are
    # mostly noise of the signed descent; keeping a noisy "win" costs perplexity (RESULTS section 6)
    router_gate_z: float = Field(1.645, ge=0)
    # with ``router_scope`` next (or both) and the gate on: before tuning with the router term, measure on the held-out
    # sequences whether forcing the unquantized expert choices at the next router lowers the downstream error of
    # the block tuned without it (the most any router objective can gain there). Without a significant gain (same
    # ``router_gate_z``) the router arm is not run: the block is kept as plain rounding, at plain rounding's cost
    router_headroom: bool = True
    # how the router term's gradient is combined with the MSE gradient before the sign step: ``none`` adds
    # ``router_weight`` times it; ``grad_norm`` rescales it per tensor to ``router_weight`` times the MSE
    # gradient's norm (signed steps ignore magnitudes, so an unbalanced router gradient decides the sign of every
    # coordinate where it outweighs the MSE gradient, whatever lambda is); ``output`` balances the two at the block's
    # output instead (the router term's gradient there rescaled to ``router_weight`` times the MSE's, over the
    # minibatch), so one backward through the block forms the step, not two (``router_scope: next`` only: the router
    # term must reach the block through its output)
    router_balance: Literal["none", "grad_norm", "output"] = "grad_norm"
    # where the clip ranges start: ``minmax`` (the group's full range, RTN, as AutoRound) or ``mse`` (per group the
    # clip factor on CLIP_GRID that minimises the weight reconstruction error: a better start for few iterations)
    init: Literal["minmax", "mse"] = "minmax"
    # bfloat16 autocast for the tuning iterations' forward and backward and the held-out loss that picks the
    # iteration (AutoRound's ``amp``, its default on bf16-capable devices): matmuls in bf16 (tensor cores, AMX),
    # rounding parameters, fake quantization, targets and losses in float32
    amp: bool = False
    # symmetric int schemes (W4A16, W3A16, W2A16): the full-range grid (scale = signed group maximum / 2^(b-1), the
    # largest magnitude exactly on the grid's end, all 2^b levels used; AutoRound's default) instead of
    # compressed-tensors' observer grid (maximum / ((2^b - 1) / 2)); the checkpoint format is the same (signed
    # scales). False reproduces llm-compressor's QuantizationModifier (RTN) exactly at ``iters: 0``
    full_range: bool = True
    # what the held-out decisions (the iteration kept, the router gate, the headroom rule) measure: ``next_router``,
    # the error at the output of the first routing layer downstream (and the tuning loss for the iteration); or
    # ``lm_head``, the KL divergence of the model's next-token distribution on the held-out sequences with every
    # later layer unquantized, against the unquantized model's (what held-out perplexity sees)
    decide_on: Literal["next_router", "lm_head"] = "next_router"
    # what picks each arm's iteration kept: the tuning objective on the held-out sequences (``heldout_loss``), or the
    # next-token KL at the LM head (``lm_head``; every held-out evaluation then runs the rest of the model: the cost
    # grows with the square of the depth)
    iteration_on: Literal["heldout_loss", "lm_head"] = "heldout_loss"
    # with the router gate: the router arm ``restart``s from the start for ``iters`` iterations (the same start and
    # minibatches as the plain arm), or ``refine``s the plain arm's last iteration for ``refine_fraction`` of them
    # (the router term as a refinement the gate keeps where it helps on held-out text; a fraction of the cost)
    router_arm: Literal["restart", "refine"] = "restart"
    refine_fraction: float = Field(0.25, gt=0, le=1)
    # tune a MoE layer's experts in chunks of this many (0: all at once), each chunk for ``iters`` iterations against
    # the experts before it quantized and those after it unquantized (the attention and shared weights with the
    # first): the tuning state is then a chunk's, so a layer larger than the accelerator's memory can be tuned, at
    # the chunks' count times the time. ``max_tuning_gib``: the largest chunk whose predicted memory fits this
    # budget (modifiers.rounding.memory), when ``expert_chunk`` is 0
    expert_chunk: int = Field(0, ge=0)
    max_tuning_gib: float | None = Field(None, gt=0)
    # what the block-output MSE compares the tuned block's output with: the unquantized block on the unquantized
    # stream (``unquantized``: the tuned block also corrects the error the layers before it left in its input), or on
    # the quantized stream the tuned block itself sees (``quantized``: the block's own error only, the target of
    # llm-compressor's AutoRoundModifier and GPTQModifier). Router targets are the unquantized model's either way
    target_stream: Literal["unquantized", "quantized"] = "unquantized"
    # keep a layer's calibration streams (the quantized and unquantized inputs, the unquantized outputs) in host
    # memory instead of on the block's device during its tuning: minibatches are then copied in each iteration
    offload_activations: bool = False

    @model_validator(mode="after")
    def _output_balance_needs_next_scope(self):
        if self.router_balance == "output" and self.router_scope != "next":
            raise ValueError(f"router_balance: output balances the router term at the block's output, which only "
                             f"router_scope: next reaches the block through; router_scope is {self.router_scope}")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @classmethod
    def of(cls, settings) -> "TuningConfig":
        """The config carried by ``settings`` (an object with these fields, e.g. the modifier)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})
