"""Memory of learned rounding, per tuned weight element: the one formula the tuner plans expert chunks with
(``max_tuning_gib``) and ``benchmarks/tools/cost_model.py`` predicts with.

Per element of a weight being tuned, at the peak (the backward of a tuning step):

- the weight, a copy in the model's dtype (2 bytes in bf16, 4 in float32): a layer's stack of expert weights is
  one copy; a chunk of experts tunes on a view of it;
- its rounding offset, float32: 4;
- one byte per decision kept (int8 codes): the best iteration of the arm running, and with the router gate the
  plain arm's;
- the gradients of every tuned tensor, alive until the step: 4 (with the router term's balance still one set: the
  router gradient is combined into the MSE gradient tensor by tensor);
- one projection's fake-quantized weight recomputed in the backward, or its weight gradient: 4 bytes for a third
  of a layer's expert elements (gate, up and down are multiplied one after the other).

Measured on the CPU (float32 model, 128 experts, ``benchmarks/pipeline/scale.py``): 14.5 bytes (plain rounding,
formula 14.3) and 17.4 bytes (both arms with the router term, formula 15.3; the rest is the minibatch's
activations at that shape). Activations scale with the minibatch's tokens, not with the weights, and are not
counted here.
"""

from __future__ import annotations

from loguru import logger

__all__ = ["bytes_per_tuned", "layer_bytes", "expert_chunk"]

GIB = 2**30


def bytes_per_tuned(weight_bytes: float, arms: int) -> float:
    """Peak bytes per tuned element (the module docstring): the weight copy, offset, kept decisions, gradients and
    one projection's recomputed weight or gradient."""
    return weight_bytes + 4 + arms + 4 + 4 / 3


def layer_bytes(expert_elements: int, experts: int, other_elements: int, weight_bytes: float, arms: int,
                chunk: int = 0) -> float:
    """Peak tuning bytes of a layer: its ``experts`` of ``expert_elements`` each (all projections) tuned ``chunk``
    at a time (0: all), and ``other_elements`` of other targets (attention, shared experts) tuned with the first
    chunk. The experts' stack is one copy of all of them; a chunk's state adds to it."""
    chunk = experts if chunk <= 0 else min(chunk, experts)
    state = bytes_per_tuned(weight_bytes, arms) - weight_bytes
    stack = weight_bytes * expert_elements * experts
    return stack + chunk * expert_elements * state + other_elements * bytes_per_tuned(weight_bytes, arms)


def expert_chunk(bases: list, singles: list, config) -> int:
    """Experts tuned at once per stack: ``config.expert_chunk``, or with ``config.max_tuning_gib`` the largest count
    whose :func:`layer_bytes` fits (0: all at once)."""
    if config.expert_chunk or not bases or config.max_tuning_gib is None:
        return int(config.expert_chunk)
    experts = max(len(b.modules) for b in bases)
    per_expert = sum(b.weight[0].numel() for b in bases)
    other = sum(w.weight.numel() for w in singles)
    weight_bytes = bases[0].weight.element_size()
    arms = 2 if config.router_gate else 1
    budget = config.max_tuning_gib * GIB
    for chunk in range(experts, 0, -1):
        if layer_bytes(per_expert, experts, other, weight_bytes, arms, chunk) <= budget:
            return 0 if chunk == experts else chunk
    logger.warning(f"max_tuning_gib {config.max_tuning_gib}: even one expert at a time is predicted to need "
                   f"{layer_bytes(per_expert, experts, other, weight_bytes, arms, 1) / GIB:.1f} GiB; tuning one at a "
                   "time")
    return 1
