"""Memory of learned rounding, per tuned weight element: the one formula the tuner plans expert chunks with
(``memory.max_tuning_gib``) and ``benchmarks/tools/cost_model.py`` predicts with.

Per element of a weight being tuned, at the peak (the backward of a tuning step):

- the weight, a copy in the model's dtype (2 bytes in bf16, 4 in float32): a layer's stack of expert weights is
  one copy; a chunk of experts tunes on a view of it;
- its rounding offset, float32: 4;
- one byte per decision kept (int8 codes): the best iteration of the arm running, and with the router gate the
  plain arm's;
- the gradients of every tuned tensor, alive until the step: 4;
- one projection's fake-quantized weight recomputed in the backward, or its weight gradient: 4 bytes for a third
  of a layer's expert elements (gate, up and down are multiplied one after the other);
- with a router objective balanced against the MSE (``loss.balance: grad_norm``): the router gradients are taken
  first and kept while the MSE backward forms each tensor's gradient, one projection's worth more: 4/3.

Not counted: the activations (they scale with the minibatch's tokens, not with the weights), and conversions of
untuned experts (bounded pieces of :func:`routealign.accelerator.piece_elements`, not per element). Proven by
``tests/test_memory.py``: the allocator's peak while a block is tuned, float32 and bf16, chunked and not, with
and without the router term, is within 15% of :func:`layer_bytes`.
"""

from __future__ import annotations

from loguru import logger

__all__ = ["bytes_per_tuned", "layer_bytes", "arms_of", "expert_chunk"]

GIB = 2**30


def bytes_per_tuned(weight_bytes: float, arms: int, router: bool = False) -> float:
    """Peak bytes per tuned element (the module docstring): the weight copy, offset, kept decisions, gradients,
    one projection's recomputed weight or gradient, and with a balanced router term its in-flight MSE gradient."""
    return weight_bytes + 4 + arms + 4 + 4 / 3 + (4 / 3 if router else 0)


def layer_bytes(expert_elements: int, experts: int, other_elements: int, weight_bytes: float, arms: int,
                chunk: int = 0, router: bool = False) -> float:
    """Peak tuning bytes of a layer: its ``experts`` of ``expert_elements`` each (all projections) tuned ``chunk``
    at a time (0: all), and ``other_elements`` of other targets (attention, shared experts) tuned with the first
    chunk. The experts' stack is one copy of all of them; a chunk's state adds to it."""
    chunk = experts if chunk <= 0 else min(chunk, experts)
    full = bytes_per_tuned(weight_bytes, arms, router)
    stack = weight_bytes * expert_elements * experts
    return stack + chunk * expert_elements * (full - weight_bytes) + other_elements * full


def arms_of(config, objective: str) -> tuple[int, bool]:
    """``(decisions kept, whether the router term's gradient is balanced)`` of a block tuned with ``config``."""
    router = objective != "none" and config.router_weight > 0
    arms = 2 if router and config.gate.enabled and config.holdout.fraction > 0 else 1
    return arms, router and config.loss.balance == "grad_norm"


def expert_chunk(bases: list, singles: list, config, objective: str = "none") -> int:
    """Experts tuned at once per stack: ``config.memory.expert_chunk``, or with ``config.memory.max_tuning_gib`` the
    largest count
    whose :func:`layer_bytes` fits (0: all at once)."""
    if config.memory.expert_chunk or not bases or config.memory.max_tuning_gib is None:
        return int(config.memory.expert_chunk)
    experts = max(len(b.modules) for b in bases)
    per_expert = sum(b.weight[0].numel() for b in bases)
    other = sum(w.weight.numel() for w in singles)
    weight_bytes = bases[0].weight.element_size()
    arms, router = arms_of(config, objective)
    budget = config.memory.max_tuning_gib * GIB

    def need(chunk: int) -> float:
        return layer_bytes(per_expert, experts, other, weight_bytes, arms, chunk, router)

    for chunk in range(experts, 0, -1):
        if need(chunk) <= budget:
            return 0 if chunk == experts else chunk
    logger.warning(f"max_tuning_gib {config.memory.max_tuning_gib}: even one expert at a time is predicted to need "
                   f"{need(1) / GIB:.1f} GiB; tuning one at a time")
    return 1
