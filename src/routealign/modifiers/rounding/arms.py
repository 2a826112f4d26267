"""The comparison of a block's tuning with and without the router term (the router gate), and what it returns.

With a router objective and ``gate`` the block is tuned twice from the same start on the same minibatches
(:func:`~.loop.run_arm`), with and without the router term, and the arm with the smaller held-out error
(``holdout.decide_on``) is kept (:func:`~.heldout.paired_gate`); ``gate.headroom`` first asks whether forcing the
unquantized expert choices downstream would help at all (:func:`headroom_rule`). :func:`tune_arms` returns an
:class:`ArmOutcome`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ...streams import BlockInputs
from .heldout import HeldOut, Reference, mean_of, paired_gate
from .loop import reset, restore, run_arm
from .weights import CLIP_GRID, Snapshot

__all__ = ["RouterDecision", "ArmOutcome", "tune_arms", "headroom_rule", "UNTUNED"]


class RouterDecision(str, Enum):
    """What a block's tuning did with the router term."""

    NONE = "none"  # no router objective in scope: plain learned rounding
    UNTUNED = "untuned"  # nothing tuned (iters 0 or no target): RTN
    UNGATED = "ungated"  # the router term in the loss, no comparison (router_gate off, or nothing held out)
    KEPT = "kept"  # both arms tuned; the router arm won on the held-out sequences
    DROPPED = "dropped"  # both arms tuned; the plain arm won
    NOT_TRIED = "not_tried"  # the headroom rule found nothing to gain; only the plain arm ran

    @property
    def router_used(self) -> bool:
        """Whether the kept rounding was tuned with the router term."""
        return self in (RouterDecision.UNGATED, RouterDecision.KEPT)


@dataclass(frozen=True)
class ArmOutcome:
    """What the arms of one block's (or one chunk of experts') tuning decided."""

    history: list[float]  # the kept arm's training loss per iteration
    arms: dict[str, dict]  # per arm run (``plain``/``router``): losses, iteration kept, held-out curve
    decision: RouterDecision
    gate: dict | None = None  # paired_gate statistics when the gate compared arms (with ``headroom``)
    headroom: dict | None = None  # forced-routing statistics of the headroom rule


UNTUNED = ArmOutcome([], {}, RouterDecision.UNTUNED)  # iters 0 or nothing to tune: RTN


def tune_arms(tuner, q: BlockInputs, heldout: HeldOut, reference: Reference, train: torch.Tensor,
              held: torch.Tensor, offset: int) -> ArmOutcome:
    """The arm or arms (both with the router gate) over ``tuner``'s weights being tuned; the kept arm's decisions
    are restored into them."""
    cfg = tuner.config
    if cfg.rounding.init == "mse":
        for w in tuner.weights:
            if w.trainable:
                w.mse_clip(CLIP_GRID)
    tuned = [w for w in tuner.weights if w.trainable]
    arms = ["router"] if tuner.scoped else ["plain"]
    if tuner.scoped and cfg.gate.enabled and held.numel() and cfg.router_weight > 0:
        arms = ["plain", "router"]
    simulate = cfg.rounding.quantize_activations and bool(tuner.activations)
    start = [w.start() for w in tuned]
    kept: dict[str, list[Snapshot]] = {}
    info: dict[str, dict] = {}
    history: dict[str, list[float]] = {}
    gate = headroom = None
    all_tokens = cfg.rounding.activation_scale_tokens == "all"
    with tuner.runner.simulating(tuner.runner.activation_quantizers(q, all_tokens=all_tokens) if simulate else {}):
        first = arms[0]
        reset(tuned, start)
        kept[first], info[first], history[first] = run_arm(tuner, q, reference, heldout, tuned, train,
                                                              first == "router", offset)
        decision = RouterDecision.UNGATED if arms[0] == "router" else RouterDecision.NONE
        if len(arms) == 2:
            # the plain arm's held-out errors with its kept parameters (the loop ends on the last iteration's):
            # used by the headroom rule and by the gate
            last = [w.start() for w in tuned]  # its last iteration's clip factors (a refinement continues there)
            restore(tuned, kept["plain"])
            plain = heldout.errors()
            info["plain"]["downstream_heldout"] = mean_of(plain)
            headroom = headroom_rule(tuner, heldout, plain)
            if headroom is not None and not headroom["keep"]:
                gate, decision = {"keep": False, "headroom": headroom}, RouterDecision.NOT_TRIED
            else:
                if cfg.gate.arm == "refine":  # from the plain arm's last iteration, a fraction of the steps
                    for w, clips in zip(tuned, last):
                        w.resume(clips)
                    iters = max(1, round(cfg.iters * cfg.gate.refine_fraction))
                else:
                    reset(tuned, start)
                    iters = cfg.iters
                kept["router"], info["router"], history["router"] = run_arm(tuner, q, reference, heldout, tuned,
                                                                               train, True, offset, iters)
                restore(tuned, kept["router"])
                router = heldout.errors()
                info["router"]["downstream_heldout"] = mean_of(router)
                gate = {**paired_gate(router - plain, cfg.gate.z), "headroom": headroom}
                decision = RouterDecision.KEPT if gate["keep"] else RouterDecision.DROPPED
    chosen = "router" if decision.router_used else "plain"
    restore(tuned, kept[chosen])
    for w in tuned:
        w.drop_offsets()
    return ArmOutcome(history[chosen], info, decision, gate, headroom)

def headroom_rule(tuner, heldout: HeldOut, own: torch.Tensor) -> dict | None:
    """With the plain arm's kept parameters set and ``own`` its held-out errors: whether forcing the
    unquantized expert choices at the next routers lowers them significantly (``gate.headroom``;
    ``keep`` false: nothing to gain). None where the rule does not apply."""
    cfg = tuner.config
    if not (cfg.gate.headroom and tuner.runner.chain and tuner.next_layers
            and any(scope == "next" for scope, _ in tuner.scoped)):
        return None
    forced = heldout.errors(forced=True)
    return {**paired_gate(forced - own, cfg.gate.z), "own": mean_of(own), "forced": mean_of(forced)}
