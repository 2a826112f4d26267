"""Learned rounding for one decoder block (AutoRound-style), with router objectives.

Per targeted weight ``W`` (``[out, in]``): a rounding offset ``v`` (``[out, in]``, in grid units, kept in
``[-0.5, 0.5]``) and per-group clip factors ``c_lo``, ``c_hi`` (kept in ``[0, 1]``) that scale the group minimum
and maximum before the scale is computed. Signed gradient descent (``p -= lr_t * sign(grad)``) with a learning
rate decaying linearly from ``lr`` (default ``1/iters``) to 0; each iteration takes the next ``batch_size``
calibration sequences of a shuffled pass over the tuning part of the calibration set (AutoRound's sampler). A fraction ``holdout`` of the calibration sequences is held
out of the steps: the parameters kept are those of the iteration with the lowest loss *on the held-out sequences*
(evaluated every ``holdout.every`` iterations; with nothing held out, the lowest minibatch loss, as AutoRound).
With ``iters=0`` the result is plain RTN (with ``rounding.full_range: false`` identical to llm-compressor's
QuantizationModifier).

Loss: mean-squared error between the tuned block's output on the *quantized model's* input activations and the
unquantized block's output on the *unquantized model's* input activations (for the last decoder block, after the
model's final norm, the only consumer of that output: measured on the raw residual stream, tuning the last block
made the model worse than RTN on tiny-qwen3_moe), plus ``router_weight`` times the mean router objective
(:mod:`routealign.losses`) over the routers in scope:

- ``block``: this block's own routers, on the tuned block's activations (their logits only depend on the block's
  attention weights);
- ``next``: the next router downstream, evaluated (the layers up to it unquantized) on the tuned block's output;
  this is where the tuned experts' rounding changes the routing. For a layer followed by layers without a router
  (Nemotron-H: attention or mamba blocks between MoE blocks) the layers in between are run too;
- ``both``.

Router objectives fit the calibration tokens' routing and need not generalise (benchmarks/RESULTS.md). So with a
router objective and ``gate`` (default) the block is tuned twice from the same start on the same
minibatches, with and without the router term, and the result whose error on the held-out sequences is smaller
*at the output of the first routing layer downstream* is kept (the layers in between unquantized, every router
choosing its experts itself, so a changed expert choice counts by what it does to the values). The router term is
thus used in a block only where it helps on text it was not tuned on; the choice is reported per layer.

Experts that the router sends fewer than ``rounding.min_expert_tokens`` calibration tokens cannot be tuned from data:
they get MSE-optimal clipping RTN (per group, the clip factor on a grid that minimises the weight reconstruction
error) and are listed in a log line with their token counts.

The tuning forward runs in float32 on float32 copies of the block's parameters (the model is not modified until
the modifier writes :attr:`TuneResult.writes`), with compressed-tensors' quantized forward and llm-compressor's all-experts calibration
switched off, so each expert sees only its routed tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from loguru import logger

from ...accelerator import rows, to_host
from ...distributed import Ranks, write_parameters
from ...losses import RouterLoss
from ...routing import MoELayer
from ...runner import BlockRunner, LMTail, float_params
from ...streams import BlockInputs
from ...validation import check_finite
from .config import TuningConfig
from .heldout import HeldOut, Reference, masked_mse
from .arms import UNTUNED, RouterDecision, tune_arms
from .chunks import ExpertChunks
from .steps import balanced_at_output, balanced_per_tensor, signed_update
from .weights import CLIP_GRID, TunedWeight, quantized_writes, tuned_weights

__all__ = ["BlockTuner", "TuneResult", "RouterDecision"]


@dataclass
class TuneResult:
    """One block's tuning: what to write, and the evidence for it."""

    outputs: torch.Tensor  # the unquantized block's outputs (the next block's unquantized-stream inputs)
    writes: list[tuple[torch.nn.Module, str, torch.Tensor]]  # quantize-dequantized weights and their qparams
    history: list[float]  # the kept arm's training loss per iteration
    arms: dict[str, dict]  # per arm run (``plain``/``router``): losses, iteration kept, held-out curve
    decision: RouterDecision
    gate: dict | None = None  # paired_gate statistics when the gate compared arms (with ``headroom``)
    headroom: dict | None = None  # forced-routing statistics of the headroom rule
    router_scale: dict | None = None  # the router term against the MSE at the first router iteration
    fallback: dict[str, int] | None = None  # weights of starved experts (MSE-clipped RTN): routed tokens
    chunks: list[dict] | None = None  # memory.expert_chunk: per chunk of experts its experts, decision and arms

    def write(self) -> None:
        """Write :attr:`writes` into the model (compressed-tensors' ``update_offload_parameter``)."""
        write_parameters(self.writes)


class BlockTuner:
    """Learned rounding of every targeted Linear in ``block``.

    ``targets`` maps names relative to ``block`` to compressed-tensors weight ``QuantizationArgs``. ``kwargs`` of
    the inputs are the block's keyword arguments as the model's forward passes them
    (:class:`~routealign.streams.StreamEngine`). ``next_block`` is the following decoder layer, or the list of the
    layers downstream up to and including the first one that routes (a Nemotron-H MoE block is followed by attention
    or mamba blocks first); ``next_kwargs`` their keyword arguments (default: the block's own). The next router is
    the router of the last of them (``router_scope`` ``next``/``both``). :meth:`tune` returns a :class:`TuneResult`;
    the model is not modified until its writes are written.
    """

    def __init__(self, block: torch.nn.Module, targets: dict, config: TuningConfig,
                 next_block: torch.nn.Module | list | None = None, name: str = "block",
                 output_norm: torch.nn.Module | None = None, activations: dict | None = None,
                 next_kwargs: list[dict] | None = None, lm_tail: LMTail | None = None):
        chain = [] if next_block is None else list(next_block) if isinstance(next_block, (list, tuple)) else [next_block]
        at_head = config.holdout.decide_on == "lm_head" or config.holdout.iteration_on == "lm_head"
        if at_head and lm_tail is None:
            raise ValueError(f"{name}: holdout.decide_on / holdout.iteration_on 'lm_head' needs the rest of the model "
                             "(lm_tail)")
        self.block, self.name, self.config = block, name, config
        self.runner = BlockRunner(block, chain, next_kwargs, output_norm,
                                  lm_tail if at_head else None, activations,
                                  config.memory.batched_experts, name)
        self.activations = self.runner.activations
        # the stacks of expert weights (no tuning state of their own) and the other targets; tuning runs on
        # `weights`: the other targets and, per stack, the part of its experts being tuned (all of them at once
        # unless expert_chunk / max_tuning_gib split them)
        every = tuned_weights(block, targets, config.rounding.full_range)
        self.experts = ExpertChunks(every, config, config.objective)
        self.weights: list[TunedWeight] = self.experts.select(0)
        self.own_layers, self.next_layers = self.runner.own_layers, self.runner.next_layers
        scope = config.router_scope if config.objective != "none" else None
        self.scoped: list[tuple[str, MoELayer]] = []
        if scope in ("block", "both"):
            self.scoped += [("block", l) for l in self.own_layers]
        if scope in ("next", "both"):
            self.scoped += [("next", l) for l in self.next_layers]
        self.losses = {(scope, l.name): RouterLoss(config.objective, config.loss, l.family, l.router)
                       for scope, l in self.scoped}
        self._names = {id(m): n for n, m in block.named_modules()}
        tuned = {f"{self._names[id(m)]}.weight" for w in every for m in w.modules}
        # float32 copies of what is not tuned (the tuned weights are bound per forward: fake-quantized or unquantized)
        self._params32 = float_params(block, exclude=tuned)
        self._router_scale: dict | None = None
        self.ranks = Ranks()  # sums over data-parallel ranks (each the value itself in one process)
        self._output: torch.Tensor | None = None  # the block output of the last minibatch (loss.balance: output)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def tuned_modules(self) -> int:
        """How many Linear modules the block tunes (each expert's projection counted)."""
        return self.experts.modules

    # -- the unquantized side and the routed tokens -------------------------------------------------------
    @torch.no_grad()
    def reference(self, fp: BlockInputs, per_pass: int = 8) -> Reference:
        """The unquantized block's outputs and router targets on the unquantized stream ``fp``; with
        ``memory.offload_activations`` the outputs in host memory (each chunk moved there as it is computed: the whole set
        is never on the accelerator), pinned for an accelerator."""
        runner = self.runner
        offload = self.config.memory.offload_activations
        outs, own, nxt = [], {l.name: [] for l in self.own_layers}, {l.name: [] for l in self.next_layers}
        mask = fp.mask()
        params, stacked = self.bind(quantized=False)
        for h, kwargs, valid in runner.passes(fp, per_pass):
            y, logits = runner.run(self.block, params, h, kwargs, self.own_layers, stacked=stacked)
            out = y if valid is None else y.masked_fill(~valid.unsqueeze(-1), 0)  # padded: zeros
            outs.append(out.cpu() if offload else out)
            for n in own:
                own[n].append(logits[n].float())
            if self.next_layers:
                _, logits = runner.run_next(y, kwargs, stop_after=True)
                for n in nxt:
                    nxt[n].append(logits[n].float())
        targets = {}
        for (scope, name), loss in self.losses.items():
            z = torch.cat(own[name] if scope == "block" else nxt[name])
            targets[(scope, name)] = loss.target(z.reshape(-1, z.shape[-1]))
        outputs = torch.cat(outs)
        return Reference(to_host(outputs, self.device) if offload else outputs,
                         None if mask is None else mask.to(self.device), targets)

    @torch.no_grad()
    def expert_token_counts(self, q: BlockInputs, per_pass: int = 8) -> dict[str, torch.Tensor]:
        """Routed calibration tokens per expert of each MoE layer in the block, on the quantized stream."""
        counts = {l.name: torch.zeros(l.num_experts, dtype=torch.long) for l in self.own_layers}
        params, stacked = self.bind(quantized=False)
        for h, kwargs, valid in (self.runner.passes(q, per_pass) if self.own_layers else ()):
            _, logits = self.runner.run(self.block, params, h, kwargs, self.own_layers, stop_after=True,
                                        stacked=stacked)
            for l in self.own_layers:
                z = logits[l.name] if valid is None else logits[l.name][valid.reshape(-1).to(logits[l.name].device)]
                idx = l.family.route(l.router, z).indices
                counts[l.name] += torch.bincount(idx.reshape(-1).cpu(), minlength=l.num_experts)
        return counts

    def _fallback(self, counts: dict[str, torch.Tensor]) -> dict[str, int]:
        """MSE-clipped RTN for the weights of experts routed fewer than ``rounding.min_expert_tokens`` tokens (any MoE
        layer of the block); returns those weights with the token counts."""
        starving: dict[int, int] = {}
        for l in self.own_layers:
            for e, c in enumerate(counts[l.name].tolist()):
                if c < self.config.rounding.min_expert_tokens:
                    starving[e] = c
        self._starving = starving
        fallback = self._freeze_starving()
        if starving:
            listed = ", ".join(f"experts.{e} ({c} tokens)" for e, c in sorted(starving.items()))
            logger.info(f"{self.name}: {len(starving)} experts with fewer than "
                        f"{self.config.rounding.min_expert_tokens} "
                        f"routed calibration tokens use MSE-clipped RTN: {listed}")
        return fallback

    def _freeze_starving(self) -> dict[str, int]:
        """MSE-clipped RTN for the starving experts among the weights being tuned; returns them with their counts."""
        starving, fallback = self._starving, {}
        for w in self.weights:
            if w.stacked:
                frozen = [e for e in w.expert_ids if e in starving]
                if frozen:
                    w.mse_clip_fallback(CLIP_GRID, [e - w.first_expert for e in frozen])
                    container = w.name.rpartition(".")[0]
                    for e in frozen:
                        fallback[f"{container}.{e}.{w.projection}" if container else f"{e}.{w.projection}"] = \
                            starving[e]
            elif w.expert is not None and w.expert in starving:
                w.mse_clip_fallback(CLIP_GRID)
                fallback[w.name] = starving[w.expert]
        return fallback

    # -- the decision -------------------------------------------------------------------------------------
    def split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tuning, held-out) calibration sequence indices: ``holdout`` of ``n``, drawn with the seed; none held
        out when that is less than one sequence or would leave none to tune on."""
        held = int(n * self.config.holdout.fraction)
        if held < 1 or held >= n:
            return torch.arange(n), torch.arange(0)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1_000_003))
        return perm[held:].sort().values, perm[:held].sort().values

    def heldout(self, q: BlockInputs, reference: Reference, held: torch.Tensor, offset: int = 0) -> HeldOut:
        """Evaluations of the current rounding on the held-out sequences ``held`` (global indices; this rank's
        sequences are ``offset`` onwards) of ``q``."""
        router = (lambda y, logits, kwargs, idx: self._router_loss(reference, y, logits, kwargs, idx)) \
            if self.scoped else None
        cfg = self.config
        return HeldOut(self.runner, reference, q, held, self.bind, router, cfg.router_weight,
                       lm_head=cfg.holdout.decide_on == "lm_head", autocast=self._autocast, offset=offset,
                       iteration_on_lm_head=cfg.holdout.iteration_on == "lm_head")

    def tune(self, q: BlockInputs, fp: BlockInputs, offset: int = 0, total: int | None = None) -> TuneResult:
        """Tune on quantized-stream inputs ``q`` against unquantized-stream inputs ``fp``.

        With held-out sequences (``holdout``) the iteration kept is the one with the lowest held-out loss (checked
        every ``holdout.every`` iterations and after the last); with a router objective and ``gate``, the
        block is tuned twice from the same start on the same minibatches, with and without the router term, and
        the result with the smaller held-out error (``holdout.decide_on``) is kept.

        Under torch.distributed ``q`` and ``fp`` hold this rank's part of the calibration set: sequences
        ``offset`` onwards of ``total`` in a global order the ranks share. The held-out split and the minibatches are
        drawn over the whole set, as one process draws them; each rank computes its sequences' share of every loss,
        gradient and held-out error, and the sums over ranks are what one process computes on the whole set, so
        every rank takes the same steps and the same decisions."""
        check_finite(q.hidden, f"{self.name}: calibration activations entering the layer (quantized stream)")
        check_finite(fp.hidden, f"{self.name}: calibration activations entering the layer (unquantized stream)")
        # the streams on the device (minibatches sliced there), or with offload_activations on the host, pinned
        # where an accelerator copies from it (asynchronous copies per minibatch)
        offload = self.config.memory.offload_activations
        place = (lambda t: to_host(t, self.device)) if offload else (lambda t: t.to(self.device))  # noqa: E731
        q = q.with_hidden(place(q.hidden))
        fp = q if fp.hidden is q.hidden else fp.with_hidden(place(fp.hidden))
        reference = self.reference(fp)
        # the next block's unquantized stream (where the reference outputs are: on the host when offloaded)
        outputs = reference.outputs.to(fp.hidden.dtype)
        check_finite(reference.outputs, f"{self.name}: the unquantized layer's output")
        if self.config.rounding.target_stream == "quantized" and fp.hidden is not q.hidden:
            # the block's own error only: the unquantized block on the quantized stream (router targets stay the
            # unquantized model's)
            local = self.reference(q)
            reference = Reference(local.outputs, local.mask, reference.router_targets)
        fallback = self._fallback(self.ranks.counts(self.expert_token_counts(q)))
        cfg = self.config
        tuning = cfg.iters > 0 and bool(self.weights)
        if tuning:
            total = q.hidden.shape[0] if total is None else total
            train, held = self.split(total)
            heldout = self.heldout(q, reference, held, offset)
        # every path, iters 0 included, goes over every chunk of experts: each chunk's weights are written once
        chunks, writes, first = [], [], None
        many = self.experts.count > 1
        for index in range(self.experts.count):
            if index:
                self.weights = self.experts.select(index)
                fallback.update(self._freeze_starving())
            result = tune_arms(self, q, heldout, reference, train, held, offset) if tuning else UNTUNED
            writes += self._writes(store=many)
            if many:  # the part's tuning state goes before the next part's is made
                self.experts.release(self.weights)
                chunks.append({"experts": self.experts.span(), "router": result.decision.value,
                               "arms": result.arms, "gate": result.gate})
            first = result if first is None else first
        return TuneResult(outputs, writes, first.history, first.arms, first.decision, first.gate, first.headroom,
                          self._router_scale, fallback, chunks or None)

    # -- the loop -----------------------------------------------------------------------------------------
    def bind(self, quantized: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """The block's float32 parameters for a forward and the stacked expert weights (``{container: {projection:
        Stacked}}``) of :meth:`BlockRunner.run`: the tuned weights fake-quantized with the current rounding
        parameters (``quantized``; gradients to them; bfloat16 under ``amp`` inside autocast) or unquantized."""
        kind = self.device.type
        amp = quantized and self.config.rounding.amp and torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if amp \
            else None
        params, stacked = dict(self._params32), {}
        for w in self.experts.singles:
            params[f"{self._names[id(w.module)]}.weight"] = w.fake_weight(dtype) if quantized else w.weight.float()
        for base in self.experts.stacks:
            stacked.setdefault(base.experts, {})[base.projection] = self.experts.stack(base, quantized, dtype)
        return params, stacked

    def _autocast(self):
        """bfloat16 autocast on the block's device when ``amp`` (else nothing)."""
        if not self.config.rounding.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step_losses(self, q: BlockInputs, reference: Reference, idx: torch.Tensor,
                    use_router: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(block-output MSE, router objective or None) of calibration sequences ``idx`` with the current rounding
        parameters, with gradients to them (when grads are enabled)."""
        runner = self.runner
        kwargs = runner.kwargs32(q.kwargs)
        idx = idx.to(q.hidden.device)
        h = rows(q.hidden, idx, self.device, torch.float32)
        with self._autocast():
            params, stacked = self.bind()
            y, logits = runner.run(self.block, params, h, kwargs, self.own_layers, stacked=stacked)
        y = y.float()
        target = reference.output(idx, y.device)
        loss = masked_mse(runner.normed(y), runner.normed(target), reference.valid(idx))
        with self._autocast():
            router = self._router_loss(reference, y, logits, kwargs, idx) if use_router else None
        self._output = y if router is not None and self.config.loss.balance == "output" else None
        return loss, router

    def minibatch_losses(self, q: BlockInputs, reference: Reference, batch: torch.Tensor, use_router: bool,
                          offset: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`step_losses` of minibatch ``batch`` (global indices). Under torch.distributed: of this rank's
        sequences of it, each loss weighted by this rank's share of the minibatch's real tokens (both losses are
        means over real tokens), so the sums over ranks of the losses and of their gradients are one process's;
        ``(None, None)`` where this rank holds none of the minibatch."""
        if self.ranks.alone:
            return self.step_losses(q, reference, batch, use_router)
        mine = (batch >= offset) & (batch < offset + q.hidden.shape[0])
        local = batch[mine] - offset
        valid = reference.valid(local)
        tokens = float(local.numel() * q.hidden.shape[1] if valid is None else valid.sum())
        (everyone,) = self.ranks.sum([tokens])
        if not local.numel():
            return None, None
        loss, router = self.step_losses(q, reference, local, use_router)
        share = tokens / everyone
        return loss * share, None if router is None else router * share

    def step(self, params: list[torch.Tensor], loss: torch.Tensor | None, router: torch.Tensor | None,
             total: torch.Tensor | None, it: int, iters: int) -> None:
        """One signed step: gradients (balanced with ``loss.balance``, :mod:`.steps`), summed over ranks, then
        :func:`~.steps.signed_update` at iteration ``it``'s learning rate. ``loss`` is None on a rank that holds none
        of the minibatch (it contributes zero gradients)."""
        cfg = self.config
        for p in params:
            p.grad = None
        # a router term that reaches no tuned weight (unreachable, reported) has no gradient to combine; every rank
        # takes the same branch (the ranks' collectives must match)
        combine = self.ranks.any(router is not None and router.requires_grad)
        record, scale = self._router_scale is None, None
        if combine and cfg.loss.balance == "output":
            scale = balanced_at_output(self.ranks, params, self._output, loss, router, cfg.router_weight, record)
        elif combine and (cfg.loss.balance != "none" or it == 0):
            owners = {id(p): w for w in self.weights for p in w.parameters()}
            scale = balanced_per_tensor(self.ranks, params, owners, loss, router, cfg.router_weight,
                                        measure_only=cfg.loss.balance == "none", record=record)
        self._output = None
        if not combine or cfg.loss.balance == "none":
            if total is not None and total.requires_grad:
                total.backward()
            self.ranks.grads(params)
        if scale is not None:
            self._router_scale = scale
        signed_update(self.weights, cfg.learning_rate * (1 - it / iters))
        for p in params:
            p.grad = None

    def _router_loss(self, reference: Reference, y, logits, kwargs, idx):
        if not self.scoped:
            return None
        next_logits = {}
        if any(scope == "next" for scope, _ in self.scoped):
            _, next_logits = self.runner.run_next(y, kwargs, stop_after=True)
        valid = reference.valid(idx)
        total = None
        for (scope, name), loss in self.losses.items():
            z = logits[name] if scope == "block" else next_logits[name]
            z = (z if valid is None else z[valid.reshape(-1).to(z.device)]).float()
            value = loss(z, reference.router_target((scope, name), idx))
            total = value if total is None else total + value
        return total / len(self.losses)

    def _writes(self, store: bool = False) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
        """The writes of the weights being tuned (``store``: a part's quantized weights also replace its experts'
        in the stack, for the chunks after it)."""
        return [item for w in self.weights
                for item in quantized_writes(w, f"{self.name}.{w.name}", store=store and w.stacked)]
