"""One arm of a block's tuning: signed gradient descent over the minibatches, the iteration kept chosen on the
held-out sequences (:func:`run_arm`), and the rules it keeps by (:func:`check_losses`: stop at the first non-finite
loss; :func:`track_lowest`: AutoRound's lowest-loss rule on the device when nothing is held out). Arms start from
and return to the tuned weights' own state (:func:`reset`, :func:`restore`)."""

from __future__ import annotations

import math

import torch

from ...errors import NonFiniteError
from ...streams import BlockInputs
from .heldout import HeldOut, Reference
from .weights import CyclicBatches, Snapshot, TunedWeight

__all__ = ["run_arm", "check_losses", "track_lowest", "reset", "restore"]


def run_arm(tuner, q: BlockInputs, reference: Reference, heldout: HeldOut, tuned: list[TunedWeight],
            train: torch.Tensor, use_router: bool, offset: int = 0,
            iters: int | None = None) -> tuple[list[Snapshot], dict, list[float]]:
    """Signed gradient descent on minibatches of ``train`` (global indices; this rank's sequences are
    ``offset`` onwards); returns the decisions of the iteration with the lowest held-out loss (lowest training
    loss when nothing is held out), a summary and the training losses.

    Nothing in an iteration waits for the device (one process): the minibatch order is drawn up front and
    copied once, the training losses stay on the device and are read, and checked finite, at the held-out
    evaluations and at the end; with nothing held out the lowest loss and its decisions are tracked on the
    device."""
    cfg = tuner.config
    params = [p for w in tuned for p in w.parameters()]
    batches = CyclicBatches(train, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    iters = cfg.iters if iters is None else iters
    order = [batches.next() for _ in range(iters)]
    local = tuner.ranks.alone
    if local and order:
        order = torch.stack(order).to(q.hidden.device, non_blocking=True)
    losses = torch.full((iters,), math.nan, dtype=torch.float64, device=tuner.device)
    best_loss, best, best_it = math.inf, None, -1
    tracked = None  # nothing held out: (lowest loss, its iteration, its decisions), on the device
    curve: list[tuple[int, float]] = []
    with torch.enable_grad():
        for it in range(iters + 1):
            if heldout and (it % cfg.holdout.every == 0 or it == iters):
                check_losses(tuner.name, losses, it, best_loss, best_it)
                curve.append((it, heldout.loss(use_router)))
                if curve[-1][1] < best_loss:
                    best_loss, best_it, best = curve[-1][1], it, [w.snapshot() for w in tuned]
            if it == iters:
                break
            loss, router = tuner.minibatch_losses(q, reference, order[it], use_router, offset)
            total = None if loss is None else loss + cfg.router_weight * router if router is not None else loss
            # summed over ranks (in one process the value itself, on the device, unread)
            (value,) = tuner.ranks.sum([0.0 if total is None else total.detach().double()])
            losses[it] = value
            value = losses[it]
            if not heldout:
                tracked = track_lowest(tracked, value, it, tuned)
            tuner.step(params, loss, router, total, it, iters)
    check_losses(tuner.name, losses, iters, best_loss, best_it)
    history = losses.tolist()
    if not heldout and tracked is not None:
        best_loss, best_it, best = float(tracked[0]), int(tracked[1]), tracked[2]
    info = {"best_iter": best_it, "train_first": history[0] if history else None,
            "train_best": min(history) if history else None,
            "heldout_first": curve[0][1] if curve else None,
            "heldout_best": best_loss if curve else None, "heldout_curve": curve}
    return best, info, history


def check_losses(name: str, losses: torch.Tensor, upto: int, best_loss: float, best_it: int) -> None:
    """:class:`NonFiniteError` at the first non-finite training loss before iteration ``upto``."""
    if upto == 0 or bool(torch.isfinite(losses[:upto]).all()):
        return
    values = losses[:upto].tolist()
    it = next(i for i, v in enumerate(values) if not math.isfinite(v))
    if best_it < 0 and it > 0:
        best_loss, best_it = min((v, i) for i, v in enumerate(values[:it]))
    last = f"last finite loss {best_loss:.6g} at iteration {best_it}" if best_it >= 0 else "no finite loss yet"
    raise NonFiniteError(
        f"{name}: tuning loss is {values[it]} at iteration {it} ({last}); the run stops: layers "
        f"before {name} are quantized, {name} and later layers are unchanged"
    )


def reset(weights: list[TunedWeight], start: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for w, clips in zip(weights, start):
        w.reset(clips)


def restore(weights: list[TunedWeight], snapshots: list[Snapshot]) -> None:
    for w, snap in zip(weights, snapshots):
        w.restore(snap)


@torch.no_grad()
def track_lowest(tracked, value: torch.Tensor, it: int, weights: list[TunedWeight]):
    """AutoRound's rule with nothing held out, without reading the loss: ``(lowest loss, its iteration, the
    decisions it was measured with)`` updated on the device with iteration ``it``'s ``value`` (taken before its
    step; a NaN loss never counts as lower)."""
    current = [w.snapshot() for w in weights]
    if tracked is None:
        lowest = torch.full_like(value, math.inf)
        better = value < lowest
        return (torch.where(better, value, lowest), torch.where(better, it, -1), current)
    lowest, at, kept = tracked
    better = value < lowest
    merged = [Snapshot(*(torch.where(better, new, old) for new, old in
                         zip((c.codes, c.clip_lo, c.clip_hi, c.zero_offset), (k.codes, k.clip_lo, k.clip_hi,
                                                                             k.zero_offset))))
              for c, k in zip(current, kept)]
    return torch.where(better, value, lowest), torch.where(better, it, at), merged
