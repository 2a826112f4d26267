"""What the rounding modifier reports per decoder layer: the report row (:func:`layer_report`, one log line each)
and the routers in scope that no tuned weight can reach (:func:`unreachable_routers`, never silently ignored)."""

from __future__ import annotations

from loguru import logger

from .arms import RouterDecision
from .tune import BlockTuner, TuneResult

__all__ = ["layer_report", "unreachable_routers"]


def layer_report(name: str, chain: list[str], samples: int, tuner: BlockTuner, result: TuneResult,
                 unreachable: list[str], seconds: float) -> dict:
    """The report row of decoder layer ``name`` (``chain``: the layers downstream up to the next router), logged
    as one line."""
    history = result.history
    row = {"layer": name, "samples": samples, "weights": tuner.tuned_modules, "iters": len(history),
           "loss_first": history[0] if history else None, "loss_best": min(history) if history else None,
           "seconds": round(seconds, 3), "rtn_fallback": dict(result.fallback or {}),
           "router_unreachable": unreachable,
           "routers": [f"{w}:{(name if w == 'block' else chain[-1])}.{l.router_name}" for w, l in tuner.scoped],
           "router": result.decision.value, "arms": result.arms, "gate": result.gate,
           "router_scale": result.router_scale}
    if result.chunks:  # memory.expert_chunk: each chunk's experts, decision and arms (the row's own are the first's)
        row["chunks"] = result.chunks
        decisions = {c["router"] for c in result.chunks}
        row["router"] = decisions.pop() if len(decisions) == 1 else "mixed"
    if history:
        kept = {RouterDecision.KEPT: ", router term kept", RouterDecision.UNGATED: ", router term (ungated)",
                RouterDecision.DROPPED: ", router term dropped (held-out)",
                RouterDecision.NOT_TRIED: ", router term not tried (forcing the unquantized experts gains "
                                          "nothing on held-out)"}.get(result.decision, "")
        if result.chunks:
            kept = ", experts " + ", ".join(f"{a}-{b - 1}: {c['router']}" for c in result.chunks
                                            for a, b in [c["experts"]])
        logger.info(f"{name}: tuned {tuner.tuned_modules} weights, {len(history)} iters, loss "
                    f"{history[0]:.4g} -> best {min(history):.4g}{kept} ({seconds:.1f} s)")
    return row


def unreachable_routers(tuner: BlockTuner, name: str) -> list[str]:
    """Routers in scope whose objective cannot reach any tuned weight (``block`` scope when every target lies
    after the router, e.g. a Nemotron-H block that holds only the MoE). Logged as a warning and listed in the
    report row, never silently ignored."""
    unreachable = []
    for scope, layer in tuner.scoped:
        if scope != "block":
            continue
        prefix = layer.name.removeprefix(name).lstrip(".")
        if all(w.name.startswith(prefix) for w in tuner.weights):
            unreachable.append(f"{name}.{layer.router_name}")
            logger.warning(f"{name}: the router objective at router_scope 'block' cannot reach any tuned weight "
                           f"(every target lies after {layer.router_name}); use router_scope 'next' or 'both'")
    return unreachable
