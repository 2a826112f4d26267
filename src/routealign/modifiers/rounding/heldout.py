"""What the held-out calibration sequences decide, and on what.

The unquantized side of a block (:class:`Reference`: outputs and router targets on the unquantized stream) and the
held-out evaluations of the block's current rounding (:class:`HeldOut`): the loss that picks the iteration kept,
and the per-sequence errors the router gate and the headroom rule compare (:func:`paired_gate`), measured either at
the first routing layer downstream (``holdout.decide_on: next_router``) or as the next-token KL at the LM head with
every later layer unquantized (``holdout.decide_on: lm_head``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ...accelerator import rows
from ...distributed import all_sum, gather_slices
from ...losses import RouterTarget
from ...runner import BlockRunner
from ...streams import BlockInputs

__all__ = ["Reference", "HeldOut", "paired_gate", "masked_mse", "mean_of"]


def masked_mse(y: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the real tokens (``valid`` ``[B, T]``; None: every position)."""
    if valid is None:
        return torch.nn.functional.mse_loss(y, target)
    return torch.nn.functional.mse_loss(y[valid], target[valid])


def mean_of(values: torch.Tensor) -> float:
    """Mean of per-sequence ``values`` (float64 sum)."""
    return float(values.double().sum()) / max(float(values.numel()), 1.0)


def paired_gate(diff: torch.Tensor, z: float) -> dict:
    """Decision on per-sequence paired differences ``diff`` (router arm minus plain arm, lower is better, every
    held-out sequence; under torch.distributed the same vector on every rank, :meth:`HeldOut.errors`): keep the
    router arm iff ``mean + z * se < 0`` with ``se`` the standard error of the mean. With one sequence the standard
    error is unknown: kept only when ``z`` is 0."""
    stats = torch.stack([diff.double().sum(), diff.double().pow(2).sum(),
                         torch.tensor(float(diff.numel()), dtype=torch.float64)])
    total, squares, n = (float(v) for v in stats)
    mean = total / max(n, 1.0)
    if n > 1:
        var = max(squares - n * mean * mean, 0.0) / (n - 1)
        se = math.sqrt(var / n)
    else:
        se = 0.0 if z == 0 else math.inf
    bound = mean + z * se if z else mean
    return {"mean_diff": mean, "se": se, "n": int(n), "z": z, "keep": bool(n >= 1 and bound < 0)}


@dataclass
class Reference:
    """The unquantized block on the unquantized stream: its float32 outputs ``[N, T, H]`` (padded positions zero),
    the real-token mask (None: nothing padded) and, per router in scope ``(scope, layer name)``, the router target."""

    outputs: torch.Tensor
    mask: torch.Tensor | None
    router_targets: dict[tuple[str, str], RouterTarget]

    def valid(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Real-token mask ``[len(idx), T]`` of calibration sequences ``idx`` (None: nothing is padded)."""
        return None if self.mask is None else self.mask[idx.to(self.mask.device)]

    def output(self, idx: torch.Tensor, device) -> torch.Tensor:
        return rows(self.outputs, idx, device)

    def router_target(self, key: tuple[str, str], idx: torch.Tensor) -> RouterTarget:
        """The target of the real tokens of sequences ``idx`` (rows of the flattened ``[N * T]`` target)."""
        tgt = self.router_targets[key]
        seq = self.outputs.shape[1]
        rows = idx.view(-1, 1) * seq + torch.arange(seq, device=idx.device).view(1, -1)
        valid = self.valid(idx)
        rows = rows.reshape(-1) if valid is None else rows[valid.to(rows.device)]
        return tgt[rows.to(tgt.logits.device)]

    def per_sequence(self, idx: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """Per-token errors ``[B, T]`` of calibration sequences ``idx`` averaged over each one's real tokens
        (float64, on the CPU)."""
        valid = self.valid(idx)
        err = err.mean(1) if valid is None else err.masked_fill(~valid, 0).sum(1) / valid.sum(1)
        return err.double().cpu()


class HeldOut:
    """Evaluations of the block's current rounding on the held-out sequences ``held`` (indices in the global order
    of the calibration set) of ``q`` (the sequences ``offset`` onwards of it: this rank's, under torch.distributed).

    ``params`` gives the block's float32 parameters with the current fake-quantized weights; ``router_loss(y,
    logits, kwargs, idx)`` the weighted-in router objective (None without one). The unquantized side (downstream
    outputs, next-token distributions, the next routers' choices on them) is computed once and shared by both arms.
    Each rank evaluates its own held-out sequences; losses are sums over ranks and per-sequence errors come back
    for every held-out sequence, in order, on every rank.
    """

    def __init__(self, runner: BlockRunner, reference: Reference, q: BlockInputs, held: torch.Tensor,
                 params: Callable[[], dict], router_loss: Callable | None, router_weight: float,
                 lm_head: bool, autocast: Callable[[], contextlib.AbstractContextManager], per_pass: int = 8,
                 offset: int = 0, iteration_on_lm_head: bool = False):
        mine = (held >= offset) & (held < offset + q.hidden.shape[0])
        self.runner, self.reference, self.q, self.held = runner, reference, q, held[mine] - offset
        self.count, self.start = held.numel(), int((held < offset).sum())  # all held-out; this rank's first
        self._params, self._router_loss, self.router_weight = params, router_loss, router_weight
        self.lm_head = lm_head  # the decisions (router gate, headroom) compare next-token KLs at the LM head
        self.iteration_on_lm_head = iteration_on_lm_head  # and so does the choice of the iteration kept
        self._autocast = autocast
        self.per_pass = per_pass
        self._down_fp: list[torch.Tensor] = []
        self._down_fp_idx: list[dict[str, torch.Tensor]] = []
        self._tail_fp: list[torch.Tensor] = []
        self._tail_fp_idx: list[dict[str, torch.Tensor]] = []

    def __bool__(self) -> bool:
        return bool(self.count)

    def _outputs(self, layers: list):
        """Per pass: ``(indices, block output, router logits of layers, unquantized target, float32 kwargs)``."""
        runner = self.runner
        kwargs = runner.kwargs32(self.q.kwargs)
        params, stacked = self._params()
        held = self.held.to(self.q.hidden.device)
        for start in range(0, held.numel(), self.per_pass):
            idx = held[start : start + self.per_pass]
            y, logits = runner.run(runner.block, params, rows(self.q.hidden, idx, runner.device, torch.float32),
                                   kwargs, layers, stacked=stacked)
            yield idx, y, logits, self.reference.output(idx, y.device), kwargs

    @torch.no_grad()
    def loss(self, use_router: bool) -> float:
        """What picks the iteration kept: the tuning objective (block-output MSE, plus the weighted router term when
        ``use_router``) on the held-out sequences, under ``amp`` as the steps are; with ``iteration_on_lm_head`` the
        mean next-token KL at the LM head instead (:meth:`lm_head_errors`). Over every rank's held-out sequences."""
        if self.iteration_on_lm_head:
            return mean_of(self.lm_head_errors())
        runner = self.runner
        sq, elems, router, chunks = [], 0, [], 0
        with self._autocast():
            for idx, y, logits, target, kwargs in self._outputs(runner.own_layers):
                y = y.float()
                err = runner.normed(y) - runner.normed(target)
                valid = self.reference.valid(idx)
                err = err if valid is None else err[valid]
                sq.append(err.pow(2).sum())
                elems += err.numel()
                if use_router and self._router_loss is not None:
                    router.append((self._router_loss(y, logits, kwargs, idx).float(), idx.numel()))
                    chunks += idx.numel()
        # read once (one wait for the device), each chunk's value as it was computed
        values = torch.stack(sq + [r for r, _ in router]).tolist() if sq or router else []
        n_sq = len(sq)
        sq = sum(values[:n_sq], 0.0)
        router = sum((v * n for v, (_, n) in zip(values[n_sq:], router)), 0.0)
        sq, elems, router, chunks = all_sum([sq, float(elems), router, float(chunks)])
        value = sq / max(elems, 1)
        if chunks:
            value += self.router_weight * router / chunks
        return float(torch.tensor(value))  # rounded to float32, as the loss was before ranks were summed

    def errors(self, forced: bool = False) -> torch.Tensor:
        """Per held-out sequence, what the router gate and the headroom rule compare: :meth:`lm_head_errors` with
        ``lm_head``, else :meth:`downstream_errors`; every held-out sequence's, in order, on every rank."""
        local = self.lm_head_errors(forced, gather=False) if self.lm_head else self.downstream_errors(forced)
        return gather_slices(local, self.start, self.count)

    @torch.no_grad()
    def downstream_errors(self, forced: bool = False) -> torch.Tensor:
        """Per held-out sequence, the mean squared error at the output of the first routing layer downstream (the
        next layers unquantized, their experts chosen by their own routers, or with ``forced`` by the unquantized
        stream's choices), or of this block (through the final norm) when none follows."""
        runner, errors = self.runner, []
        for i, (idx, y, _, target, kwargs) in enumerate(self._outputs([])):
            if runner.chain:
                if i == len(self._down_fp):  # the unquantized side is the same for every arm: computed once
                    out, logits = runner.run_next(target, kwargs, stop_after=False)
                    self._down_fp.append(out)
                    self._down_fp_idx.append(runner.next_choices(logits))
                force = self._down_fp_idx[i] if forced else None
                y, _ = runner.run_next(y, kwargs, stop_after=False, force=force)
                target = self._down_fp[i]
            else:
                y, target = runner.normed(y), runner.normed(target)
            errors.append(self.reference.per_sequence(idx, (y - target).pow(2).mean(-1)))
        return torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)

    @torch.no_grad()
    def lm_head_errors(self, forced: bool = False, gather: bool = True) -> torch.Tensor:
        """Per held-out sequence, the mean over its real tokens of ``KL(p_fp || p_q)`` of the next-token
        distributions: ``p_q`` from this block's quantized output (current rounding parameters, quantized-stream
        input), ``p_fp`` from its unquantized output, each through the rest of the model unquantized (``forced``:
        the next routers take the unquantized side's expert choices). With ``gather`` every rank's sequences."""
        runner = self.runner
        chunks = list(self._outputs([]))
        if not chunks:
            return torch.zeros(0, dtype=torch.float64)
        if not self._tail_fp:  # the unquantized side is the same for every arm: computed once
            self._tail_fp, self._tail_fp_idx = runner.tail_logprobs([target for _, _, _, target, _ in chunks],
                                                                    route=True)
        logq, _ = runner.tail_logprobs([y for _, y, _, _, _ in chunks], force=self._tail_fp_idx if forced else None)
        errors = [self.reference.per_sequence(idx, (ref.exp() * (ref - lq)).sum(-1))
                  for (idx, *_), ref, lq in zip(chunks, self._tail_fp, logq)]
        local = torch.cat(errors)
        return gather_slices(local, self.start, self.count) if gather else local
