"""Learned rounding for one decoder block (AutoRound-style), with router objectives.

Per targeted weight ``W`` (``[out, in]``): a rounding offset ``v`` (``[out, in]``, in grid units, kept in
``[-0.5, 0.5]``) and per-group clip factors ``c_lo``, ``c_hi`` (kept in ``[0, 1]``) that scale the group minimum
and maximum before the scale is computed. Signed gradient descent (``p -= lr_t * sign(grad)``) with a learning
rate decaying linearly from ``lr`` (default ``1/iters``) to 0; each iteration takes the next ``batch_size``
calibration sequences of a shuffled pass over the tuning part of the calibration set (AutoRound's sampler). A fraction ``holdout`` of the calibration sequences is held
out of the steps: the parameters kept are those of the iteration with the lowest loss *on the held-out sequences*
(evaluated every ``holdout_every`` iterations; with nothing held out, the lowest minibatch loss, as AutoRound).
With ``iters=0`` the result is plain RTN (with ``full_range=False`` identical to llm-compressor's QuantizationModifier).

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
router objective and ``router_gate`` (default) the block is tuned twice from the same start on the same
minibatches, with and without the router term, and the result whose error on the held-out sequences is smaller
*at the output of the first routing layer downstream* is kept (the layers in between unquantized, every router
choosing its experts itself, so a changed expert choice counts by what it does to the values). The router term is
thus used in a block only where it helps on text it was not tuned on; the choice is reported per layer.

Experts that the router sends fewer than ``min_expert_tokens`` calibration tokens cannot be tuned from data: they
get MSE-optimal clipping RTN (per group, the clip factor on a grid that minimises the weight reconstruction error)
and are listed in a log line with their token counts.

The tuning forward runs in float32 on float32 copies of the block's parameters (the model is not modified until
the modifier writes :attr:`TuneResult.writes`), with compressed-tensors' quantized forward and llm-compressor's all-experts calibration
switched off, so each expert sees only its routed tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from enum import Enum

import torch
from loguru import logger

from ...accelerator import rows, to_host
from ...distributed import all_reduce, all_reduce_counts, all_reduce_grads, all_sum, world_size, write_parameters
from ...errors import NonFiniteError
from ...losses import RouterLoss
from ...routing import MoELayer
from ...experts import Parts, Stacked
from ...runner import BlockRunner, LMTail, float_params
from ...schemes import row_chunks
from ...streams import BlockInputs
from ...validation import check_finite
from .config import TuningConfig
from .heldout import HeldOut, Reference, masked_mse, mean_of, paired_gate
from .memory import expert_chunk
from .weights import CLIP_GRID, CyclicBatches, Snapshot, TunedWeight, quantized_writes, tuned_weights

__all__ = ["BlockTuner", "TuneResult", "RouterDecision"]


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
    chunks: list[dict] | None = None  # expert_chunk: per chunk of experts its experts, decision and arms

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

    def __init__(self, block: torch.nn.Module, targets: dict, loss_config, config: TuningConfig,
                 next_block: torch.nn.Module | list | None = None, name: str = "block",
                 output_norm: torch.nn.Module | None = None, activations: dict | None = None,
                 next_kwargs: list[dict] | None = None, lm_tail: LMTail | None = None):
        chain = [] if next_block is None else list(next_block) if isinstance(next_block, (list, tuple)) else [next_block]
        at_head = config.decide_on == "lm_head" or config.iteration_on == "lm_head"
        if at_head and lm_tail is None:
            raise ValueError(f"{name}: decide_on / iteration_on 'lm_head' needs the rest of the model (lm_tail)")
        self.block, self.name, self.config, self.loss_config = block, name, config, loss_config
        self.runner = BlockRunner(block, chain, next_kwargs, output_norm,
                                  lm_tail if at_head else None, activations,
                                  config.batched_experts, name)
        self.activations = self.runner.activations
        # the stacks of expert weights (no tuning state of their own) and the other targets; tuning runs on
        # `weights`: the other targets and, per stack, the part of its experts being tuned (all of them at once
        # unless expert_chunk / max_tuning_gib split them)
        every = tuned_weights(block, targets, config.full_range)
        self._bases = [w for w in every if w.stacked]
        self._singles = [w for w in every if not w.stacked]
        self.chunk = expert_chunk(self._bases, self._singles, config, loss_config.objective)
        self.weights: list[TunedWeight] = list(self._singles)
        self._parts: dict[int, TunedWeight] = {}  # id(base) -> the part being tuned
        self._span: dict[int, tuple[int, int]] = {}
        self._select(0)
        self.own_layers, self.next_layers = self.runner.own_layers, self.runner.next_layers
        scope = config.router_scope if loss_config.objective != "none" else None
        self.scoped: list[tuple[str, MoELayer]] = []
        if scope in ("block", "both"):
            self.scoped += [("block", l) for l in self.own_layers]
        if scope in ("next", "both"):
            self.scoped += [("next", l) for l in self.next_layers]
        self.losses = {(where, l.name): RouterLoss(loss_config, l.family, l.router) for where, l in self.scoped}
        self._names = {id(m): n for n, m in block.named_modules()}
        tuned = {f"{self._names[id(m)]}.weight" for w in every for m in w.modules}
        # float32 copies of what is not tuned (the tuned weights are bound per forward: fake-quantized or unquantized)
        self._params32 = float_params(block, exclude=tuned)
        self._router_scale: dict | None = None
        self._output: torch.Tensor | None = None  # the block output of the last minibatch (router_balance: output)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def tuned_modules(self) -> int:
        """How many Linear modules the block tunes (each expert's projection counted)."""
        return len(self._singles) + sum(len(b.modules) for b in self._bases)

    # -- the unquantized side and the routed tokens -------------------------------------------------------
    @torch.no_grad()
    def reference(self, fp: BlockInputs, chunk: int = 8) -> Reference:
        """The unquantized block's outputs and router targets on the unquantized stream ``fp``; with
        ``offload_activations`` the outputs in host memory (each chunk moved there as it is computed: the whole set is
        never on the accelerator), pinned for an accelerator."""
        runner = self.runner
        offload = self.config.offload_activations
        outs, own, nxt = [], {l.name: [] for l in self.own_layers}, {l.name: [] for l in self.next_layers}
        mask = fp.mask()
        params, stacked = self.bind(quantized=False)
        for h, kwargs, valid in runner.chunks(fp, chunk):
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
        for (where, name), loss in self.losses.items():
            z = torch.cat(own[name] if where == "block" else nxt[name])
            targets[(where, name)] = loss.target(z.reshape(-1, z.shape[-1]))
        outputs = torch.cat(outs)
        return Reference(to_host(outputs, self.device) if offload else outputs,
                         None if mask is None else mask.to(self.device), targets)

    @torch.no_grad()
    def expert_token_counts(self, q: BlockInputs, chunk: int = 8) -> dict[str, torch.Tensor]:
        """Routed calibration tokens per expert of each MoE layer in the block, on the quantized stream."""
        counts = {l.name: torch.zeros(l.num_experts, dtype=torch.long) for l in self.own_layers}
        params, stacked = self.bind(quantized=False)
        for h, kwargs, valid in (self.runner.chunks(q, chunk) if self.own_layers else ()):
            _, logits = self.runner.run(self.block, params, h, kwargs, self.own_layers, stop_after=True,
                                        stacked=stacked)
            for l in self.own_layers:
                z = logits[l.name] if valid is None else logits[l.name][valid.reshape(-1).to(logits[l.name].device)]
                idx = l.family.route(l.router, z).indices
                counts[l.name] += torch.bincount(idx.reshape(-1).cpu(), minlength=l.num_experts)
        return counts

    def _fallback(self, counts: dict[str, torch.Tensor]) -> dict[str, int]:
        """MSE-clipped RTN for the weights of experts routed fewer than ``min_expert_tokens`` tokens (any MoE
        layer of the block); returns those weights with the token counts."""
        starving: dict[int, int] = {}
        for l in self.own_layers:
            for e, c in enumerate(counts[l.name].tolist()):
                if c < self.config.min_expert_tokens:
                    starving[e] = c
        self._starving = starving
        fallback = self._freeze_starving()
        if starving:
            listed = ", ".join(f"experts.{e} ({c} tokens)" for e, c in sorted(starving.items()))
            logger.info(f"{self.name}: {len(starving)} experts with fewer than {self.config.min_expert_tokens} "
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

    # -- expert chunks --------------------------------------------------------------------------------------
    @property
    def chunks(self) -> int:
        """How many chunks of experts a layer is tuned in (1: all experts at once)."""
        if not self.chunk or not self._bases:
            return 1
        return max(-(-len(b.modules) // self.chunk) for b in self._bases)

    def _select(self, index: int) -> None:
        """Tune chunk ``index`` of every stack next (the other targets only with the first chunk; afterwards they
        keep the decision it made)."""
        for base in self._bases:
            n = len(base.modules)
            start, end = (0, n) if self.chunks == 1 else (min(index * self.chunk, n), min((index + 1) * self.chunk, n))
            self._span[id(base)] = (start, end)
            if end > start:
                self._parts[id(base)] = base.part(start, end)
            else:
                self._parts.pop(id(base), None)
        singles = self._singles if index == 0 else []
        self.weights = singles + [self._parts[id(b)] for b in self._bases if id(b) in self._parts]

    # -- the decision -------------------------------------------------------------------------------------
    def split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tuning, held-out) calibration sequence indices: ``holdout`` of ``n``, drawn with the seed; none held
        out when that is less than one sequence or would leave none to tune on."""
        held = int(n * self.config.holdout)
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
                       lm_head=cfg.decide_on == "lm_head", autocast=self._autocast, offset=offset,
                       iteration_on_lm_head=cfg.iteration_on == "lm_head")

    def tune(self, q: BlockInputs, fp: BlockInputs, offset: int = 0, total: int | None = None) -> TuneResult:
        """Tune on quantized-stream inputs ``q`` against unquantized-stream inputs ``fp``.

        With held-out sequences (``holdout``) the iteration kept is the one with the lowest held-out loss (checked
        every ``holdout_every`` iterations and after the last); with a router objective and ``router_gate``, the
        block is tuned twice from the same start on the same minibatches, with and without the router term, and
        the result with the smaller held-out error (``decide_on``) is kept.

        Under torch.distributed ``q`` and ``fp`` hold this rank's part of the calibration set: sequences
        ``offset`` onwards of ``total`` in a global order the ranks share. The held-out split and the minibatches are
        drawn over the whole set, as one process draws them; each rank computes its sequences' share of every loss,
        gradient and held-out error, and the sums over ranks are what one process computes on the whole set, so
        every rank takes the same steps and the same decisions."""
        check_finite(q.hidden, f"{self.name}: calibration activations entering the layer (quantized stream)")
        check_finite(fp.hidden, f"{self.name}: calibration activations entering the layer (unquantized stream)")
        # the streams on the device (minibatches sliced there), or with offload_activations on the host, pinned
        # where an accelerator copies from it (asynchronous copies per minibatch)
        offload = self.config.offload_activations
        place = (lambda t: to_host(t, self.device)) if offload else (lambda t: t.to(self.device))  # noqa: E731
        q = q.with_hidden(place(q.hidden))
        fp = q if fp.hidden is q.hidden else fp.with_hidden(place(fp.hidden))
        reference = self.reference(fp)
        # the next block's unquantized stream (where the reference outputs are: on the host when offloaded)
        outputs = reference.outputs.to(fp.hidden.dtype)
        check_finite(reference.outputs, f"{self.name}: the unquantized layer's output")
        if self.config.target_stream == "quantized" and fp.hidden is not q.hidden:
            # the block's own error only: the unquantized block on the quantized stream (router targets stay the
            # unquantized model's)
            local = self.reference(q)
            reference = Reference(local.outputs, local.mask, reference.router_targets)
        fallback = self._fallback(all_reduce_counts(self.expert_token_counts(q)))
        cfg = self.config
        tuning = cfg.iters > 0 and bool(self.weights)
        if tuning:
            total = q.hidden.shape[0] if total is None else total
            train, held = self.split(total)
            heldout = self.heldout(q, reference, held, offset)
        untuned = ([], {}, RouterDecision.UNTUNED, None, None)
        # every path, iters 0 included, goes over every chunk of experts: each chunk's weights are written once
        chunks, writes, first = [], [], None
        for index in range(self.chunks):
            if index:
                self._select(index)
                fallback.update(self._freeze_starving())
            result = self._tune_selected(q, heldout, reference, train, held, offset) if tuning else untuned
            writes += self._writes(store=self.chunks > 1)
            if self.chunks > 1:  # the part's tuning state goes before the next part's is made
                for w in self.weights:
                    if w.stacked:
                        w.release()
                chunks.append({"experts": list(self._span[id(self._bases[0])]), "router": result[2].value,
                               "arms": result[1], "gate": result[3]})
            first = first or result
        history, info, decision, gate, headroom = first
        return TuneResult(outputs, writes, history, info, decision, gate, headroom, self._router_scale, fallback,
                          chunks or None)

    def _tune_selected(self, q: BlockInputs, heldout: HeldOut, reference: Reference, train: torch.Tensor,
                       held: torch.Tensor, offset: int):
        """The loop or loops (both arms with the router gate) over the weights being tuned; the decision kept is
        restored. Returns ``(history, arms, decision, gate, headroom)``."""
        cfg = self.config
        if cfg.init == "mse":
            for w in self.weights:
                if w.trainable:
                    w.mse_clip(CLIP_GRID)
        tuned = [w for w in self.weights if w.trainable]
        arms = ["router"] if self.scoped else ["plain"]
        if self.scoped and cfg.router_gate and held.numel() and cfg.router_weight > 0:
            arms = ["plain", "router"]
        simulate = cfg.quantize_activations and bool(self.activations)
        start = [w.start() for w in tuned]
        kept: dict[str, list[Snapshot]] = {}
        info: dict[str, dict] = {}
        history: dict[str, list[float]] = {}
        gate = headroom = None
        all_tokens = cfg.activation_scale_tokens == "all"
        with self.runner.simulating(self.runner.activation_quantizers(q, all_tokens=all_tokens) if simulate else {}):
            first = arms[0]
            _reset(tuned, start)
            kept[first], info[first], history[first] = self._loop(q, reference, heldout, tuned, train,
                                                                  first == "router", offset)
            decision = RouterDecision.UNGATED if arms[0] == "router" else RouterDecision.NONE
            if len(arms) == 2:
                # the plain arm's held-out errors with its kept parameters (the loop ends on the last iteration's):
                # used by the headroom rule and by the gate
                last = [w.start() for w in tuned]  # its last iteration's clip factors (a refinement continues there)
                _restore(tuned, kept["plain"])
                plain = heldout.errors()
                info["plain"]["downstream_heldout"] = mean_of(plain)
                headroom = self._headroom(heldout, plain)
                if headroom is not None and not headroom["keep"]:
                    gate, decision = {"keep": False, "headroom": headroom}, RouterDecision.NOT_TRIED
                else:
                    if cfg.router_arm == "refine":  # from the plain arm's last iteration, a fraction of the steps
                        for w, clips in zip(tuned, last):
                            w.resume(clips)
                        iters = max(1, round(cfg.iters * cfg.refine_fraction))
                    else:
                        _reset(tuned, start)
                        iters = cfg.iters
                    kept["router"], info["router"], history["router"] = self._loop(q, reference, heldout, tuned,
                                                                                   train, True, offset, iters)
                    _restore(tuned, kept["router"])
                    router = heldout.errors()
                    info["router"]["downstream_heldout"] = mean_of(router)
                    gate = {**paired_gate(router - plain, cfg.router_gate_z), "headroom": headroom}
                    decision = RouterDecision.KEPT if gate["keep"] else RouterDecision.DROPPED
        chosen = "router" if decision.router_used else "plain"
        _restore(tuned, kept[chosen])
        for w in tuned:
            w.drop_offsets()
        return history[chosen], info, decision, gate, headroom

    def _headroom(self, heldout: HeldOut, own: torch.Tensor) -> dict | None:
        """With the plain arm's kept parameters set and ``own`` its held-out errors: whether forcing the
        unquantized expert choices at the next routers lowers them significantly (``router_headroom``;
        ``keep`` false: nothing to gain). None where the rule does not apply."""
        cfg = self.config
        if not (cfg.router_headroom and self.runner.chain and self.next_layers
                and any(where == "next" for where, _ in self.scoped)):
            return None
        forced = heldout.errors(forced=True)
        return {**paired_gate(forced - own, cfg.router_gate_z), "own": mean_of(own), "forced": mean_of(forced)}

    # -- the loop -----------------------------------------------------------------------------------------
    def bind(self, quantized: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """The block's float32 parameters for a forward and the stacked expert weights (``{container: {projection:
        Stacked}}``) of :meth:`BlockRunner.run`: the tuned weights fake-quantized with the current rounding
        parameters (``quantized``; gradients to them; bfloat16 under ``amp`` inside autocast) or unquantized."""
        kind = self.device.type
        dtype = torch.get_autocast_dtype(kind) if quantized and self.config.amp and torch.is_autocast_enabled(kind) \
            else None
        params, stacked = dict(self._params32), {}
        for w in self._singles:
            params[f"{self._names[id(w.module)]}.weight"] = w.fake_weight(dtype) if quantized else w.weight.float()
        for base in self._bases:
            stacked.setdefault(base.experts, {})[base.projection] = self._stack(base, quantized, dtype)
        return params, stacked

    def _stack(self, base: TunedWeight, quantized: bool, dtype: torch.dtype | None) -> Stacked:
        """A stack of expert weights as the batched experts multiply it: unquantized, or the part being tuned
        fake-quantized between the experts tuned before (quantized, written into the stack) and after it."""
        if not quantized:
            return Stacked(base.weight, base.bias)
        start, end = self._span[id(base)]
        count = len(base.modules)
        part = self._parts.get(id(base))
        if (start, end) == (0, count):
            return part.as_stacked(True, dtype)
        # the experts before and after the chunk in pieces of at most a chunk (a bf16 model's piece is converted
        # to float32 for its backward, one piece at a time: a chunk's worth, not every untuned expert's)
        step = max(self.chunk, 1)
        pieces = [(a, min(a + step, b), Stacked(base.weight[a:min(a + step, b)]))
                  for lo, hi in ((0, start), (end, count)) for a in range(lo, hi, step) for b in [hi]]
        if part is not None:
            pieces.append((start, end, part.as_stacked(True, dtype)))
        return Parts(None, base.bias, parts=tuple(sorted(pieces, key=lambda piece: piece[0])))

    def _autocast(self):
        """bfloat16 autocast on the block's device when ``amp`` (else nothing)."""
        if not self.config.amp:
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
        self._output = y if router is not None and self.config.router_balance == "output" else None
        return loss, router

    def _loop(self, q: BlockInputs, reference: Reference, heldout: HeldOut, tuned: list[TunedWeight],
              train: torch.Tensor, use_router: bool, offset: int = 0,
              iters: int | None = None) -> tuple[list[Snapshot], dict, list[float]]:
        """Signed gradient descent on minibatches of ``train`` (global indices; this rank's sequences are
        ``offset`` onwards); returns the decisions of the iteration with the lowest held-out loss (lowest training
        loss when nothing is held out), a summary and the training losses.

        Nothing in an iteration waits for the device (one process): the minibatch order is drawn up front and
        copied once, the training losses stay on the device and are read, and checked finite, at the held-out
        evaluations and at the end; with nothing held out the lowest loss and its decisions are tracked on the
        device."""
        cfg = self.config
        params = [p for w in tuned for p in w.parameters()]
        batches = CyclicBatches(train, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        iters = cfg.iters if iters is None else iters
        order = [batches.next() for _ in range(iters)]
        local = world_size() == 1
        if local and order:
            order = torch.stack(order).to(q.hidden.device, non_blocking=True)
        losses = torch.full((iters,), math.nan, dtype=torch.float64, device=self.device)
        best_loss, best, best_it = math.inf, None, -1
        tracked = None  # nothing held out: (lowest loss, its iteration, its decisions), on the device
        curve: list[tuple[int, float]] = []
        with torch.enable_grad():
            for it in range(iters + 1):
                if heldout and (it % cfg.holdout_every == 0 or it == iters):
                    self._check_finite(losses, it, best_loss, best_it)
                    curve.append((it, heldout.loss(use_router)))
                    if curve[-1][1] < best_loss:
                        best_loss, best_it, best = curve[-1][1], it, [w.snapshot() for w in tuned]
                if it == iters:
                    break
                loss, router = self._minibatch_losses(q, reference, order[it], use_router, offset)
                total = None if loss is None else loss + cfg.router_weight * router if router is not None else loss
                if local:
                    value = total.detach().double()
                    losses[it] = value
                else:
                    (value,) = all_sum([0.0 if total is None else float(total.detach())])
                    losses[it] = value
                    value = losses[it]
                if not heldout:
                    tracked = _track(tracked, value, it, tuned)
                self._step(params, loss, router, total, it, iters)
        self._check_finite(losses, iters, best_loss, best_it)
        history = losses.tolist()
        if not heldout and tracked is not None:
            best_loss, best_it, best = float(tracked[0]), int(tracked[1]), tracked[2]
        info = {"best_iter": best_it, "train_first": history[0] if history else None,
                "train_best": min(history) if history else None,
                "heldout_first": curve[0][1] if curve else None,
                "heldout_best": best_loss if curve else None, "heldout_curve": curve}
        return best, info, history

    def _check_finite(self, losses: torch.Tensor, upto: int, best_loss: float, best_it: int) -> None:
        """:class:`NonFiniteError` at the first non-finite training loss before iteration ``upto``."""
        if upto == 0 or bool(torch.isfinite(losses[:upto]).all()):
            return
        values = losses[:upto].tolist()
        it = next(i for i, v in enumerate(values) if not math.isfinite(v))
        if best_it < 0 and it > 0:
            best_loss, best_it = min((v, i) for i, v in enumerate(values[:it]))
        last = f"last finite loss {best_loss:.6g} at iteration {best_it}" if best_it >= 0 else "no finite loss yet"
        raise NonFiniteError(
            f"{self.name}: tuning loss is {values[it]} at iteration {it} ({last}); the run stops: layers "
            f"before {self.name} are quantized, {self.name} and later layers are unchanged"
        )

    def _minibatch_losses(self, q: BlockInputs, reference: Reference, batch: torch.Tensor, use_router: bool,
                          offset: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`step_losses` of minibatch ``batch`` (global indices). Under torch.distributed: of this rank's
        sequences of it, each loss weighted by this rank's share of the minibatch's real tokens (both losses are
        means over real tokens), so the sums over ranks of the losses and of their gradients are one process's;
        ``(None, None)`` where this rank holds none of the minibatch."""
        if world_size() == 1:
            return self.step_losses(q, reference, batch, use_router)
        mine = (batch >= offset) & (batch < offset + q.hidden.shape[0])
        local = batch[mine] - offset
        valid = reference.valid(local)
        tokens = float(local.numel() * q.hidden.shape[1] if valid is None else valid.sum())
        (everyone,) = all_sum([tokens])
        if not local.numel():
            return None, None
        loss, router = self.step_losses(q, reference, local, use_router)
        share = tokens / everyone
        return loss * share, None if router is None else router * share

    def _step(self, params: list[torch.Tensor], loss: torch.Tensor | None, router: torch.Tensor | None,
              total: torch.Tensor | None, it: int, iters: int) -> None:
        """One signed step: gradients (balanced with ``router_balance``), summed over ranks, then
        ``p -= lr_t * sign(grad)`` and the parameters clamped to their ranges, for every tuned tensor at once (a few
        ``torch._foreach_*`` calls; frozen experts of a stack do not move). ``loss`` is None on a rank that holds
        none of the minibatch (it contributes zero gradients)."""
        cfg = self.config
        for p in params:
            p.grad = None
        # a router term that reaches no tuned weight (unreachable, reported) has no gradient to combine; every rank
        # takes the same branch (the ranks' collectives must match)
        combine = router is not None and router.requires_grad
        if world_size() > 1:
            (flag,) = all_reduce([torch.tensor([float(combine)])], op="max")
            combine = bool(flag)
        if combine and cfg.router_balance == "output":
            self._output_balanced_backward(params, loss, router)
        elif combine and (cfg.router_balance != "none" or it == 0):
            self._combine_gradients(params, loss, router, measure_only=cfg.router_balance == "none")
        if not combine or cfg.router_balance == "none":
            if total is not None and total.requires_grad:
                total.backward()
            all_reduce_grads(params)
        lr = cfg.learning_rate * (1 - it / iters)
        with torch.no_grad():
            moved, grads, bounded = [], [], {(-0.5, 0.5): [], (0.0, 1.0): []}
            for w in self.weights:
                if not w.trainable:
                    continue
                for p in w.parameters():
                    if p.grad is not None:
                        moved.append(p)
                        grads.append(p.grad)
                        if w.step_mask is not None:  # frozen experts of a stack: no step (sign 0)
                            p.grad.mul_(w.step_mask)
                bounded[(-0.5, 0.5)].append(w.offset)
                bounded[(0.0, 1.0)] += [w.clip_lo, w.clip_hi]
            if moved:
                torch._foreach_sign_(grads)
                torch._foreach_add_(moved, grads, alpha=-lr)
            for (low, high), tensors in bounded.items():
                if tensors:
                    torch._foreach_clamp_min_(tensors, low)
                    torch._foreach_clamp_max_(tensors, high)
        for p in params:
            p.grad = None

    def _output_balanced_backward(self, params: list[torch.Tensor], mse: torch.Tensor | None,
                                  router: torch.Tensor | None) -> None:
        """``router_balance: output``: the MSE's and the router term's gradients at the block's output (the router's
        backward goes through the next layer only), the router's rescaled to ``router_weight`` times the MSE's norm
        over the minibatch (every rank's tokens), then one backward through the block; gradients summed over ranks.
        Records at the first call what :meth:`_combine_gradients` records, measured at the output."""
        lam, y = self.config.router_weight, self._output
        self._output = None
        if mse is not None and y is not None:
            gm = torch.autograd.grad(mse, y, retain_graph=True)[0]
            gr = torch.autograd.grad(router, y, retain_graph=True, allow_unused=True)[0] \
                if router.requires_grad else None
            gr = torch.zeros_like(gm) if gr is None else gr
            squares = [gm.double().pow(2).sum(), gr.double().pow(2).sum()]
        else:  # a rank that holds none of the minibatch: zero gradients, its share of the collectives
            gm = gr = None
            squares = [torch.zeros((), dtype=torch.float64)] * 2
        if world_size() > 1:
            nm2, nr2 = all_sum([float(v) for v in squares])
        else:
            nm2, nr2 = squares
        nm, nr = torch.as_tensor(nm2).sqrt(), torch.as_tensor(nr2).sqrt()
        if gm is not None:
            scale = (lam * nm / nr.clamp_min(1e-30)).to(gm.dtype).to(gm.device)
            y.backward(gm.add_(gr.mul_(scale)))
        all_reduce_grads(params)
        if self._router_scale is None:
            mse_value, router_value = all_sum([0.0 if mse is None else float(mse.detach()),
                                               0.0 if router is None else float(router.detach())]) \
                if world_size() > 1 else (float(mse.detach()), float(router.detach()))
            self._router_scale = {"loss_ratio": lam * router_value / max(mse_value, 1e-30),
                                  "grad_norm_ratio": lam * float(nr) / max(float(nm), 1e-30),
                                  "measured_at": "block output"}

    def _combine_gradients(self, params: list[torch.Tensor], mse: torch.Tensor | None, router: torch.Tensor | None,
                           measure_only: bool) -> None:
        """Separate MSE and router gradients (each summed over ranks); records at the first call how they compare
        (``router_scale``: loss ratio, gradient-norm ratio and the fraction of coordinates whose step sign the
        weighted router gradient changes); unless ``measure_only``, sets ``p.grad`` to the MSE gradient plus the
        router gradient rescaled per tensor (per expert in a stack) to ``router_weight`` times the MSE gradient's
        norm. ``mse`` and ``router`` are None on a rank that holds none of the minibatch.

        In one process the router gradient is taken first and kept, and each tensor's MSE gradient is combined with
        it as the backward reaches that tensor (a hook): one set of gradients is alive, not two."""
        lam = self.config.router_weight
        record = self._router_scale is None
        owners = {id(p): w for w in self.weights for p in w.parameters()}
        order = {id(p): i for i, p in enumerate(params)}
        sums: list[tuple[int, torch.Tensor]] = []  # recorded once, per tensor, read together in the params' order

        def combine(p: torch.Tensor, gm: torch.Tensor | None, gr: torch.Tensor | None) -> torch.Tensor | None:
            w = owners[id(p)]
            gm = torch.zeros_like(p) if gm is None else gm
            gr = torch.zeros_like(p) if gr is None else gr
            if w.stacked:  # one norm per expert
                nm = torch.linalg.vector_norm(gm, dim=(-2, -1), keepdim=True)
                nr = torch.linalg.vector_norm(gr, dim=(-2, -1), keepdim=True)
            else:
                nm, nr = gm.norm(), gr.norm()
            if record:
                mask = w.step_mask if w.step_mask is not None else torch.ones((), device=gm.device)
                sums.append((order[id(p)], torch.stack([
                    (nm.double().pow(2) * mask).sum(), (nr.double().pow(2) * mask).sum(),
                    _sign_flips(gm, gr, lam, mask), mask.expand_as(gm).sum().double()])))
            if measure_only:
                return None
            return gm.add_(gr.mul_(lam).mul_(nm / nr.clamp_min(1e-30)))

        if world_size() == 1 and mse is not None and not measure_only:
            g_rt = torch.autograd.grad(router, params, retain_graph=True, allow_unused=True) \
                if router.requires_grad else [None] * len(params)
            pending = {id(p): g for p, g in zip(params, g_rt)}
            del g_rt  # each router gradient is freed once combined
            # combined in the MSE gradient's own buffer, which the backward then stores as the gradient (returning
            # a new tensor from the hook would have it copied)
            def hook(gm: torch.Tensor, p: torch.Tensor) -> None:
                combine(p, gm, pending.pop(id(p)))

            handles = [p.register_hook(lambda gm, p=p: hook(gm, p)) for p in params]
            try:
                mse.backward()
            finally:
                for handle in handles:
                    handle.remove()
            for p in params:  # not reached by the MSE: its gradient is zero, and so is the combination's
                if id(p) in pending:
                    pending.pop(id(p))
                    if record:
                        combine(p, None, None)
        else:
            if mse is None:
                g_mse = g_rt = [None] * len(params)
            else:
                g_mse = torch.autograd.grad(mse, params, retain_graph=True, allow_unused=True)
                g_rt = torch.autograd.grad(router, params, retain_graph=measure_only, allow_unused=True) \
                    if router.requires_grad else [None] * len(params)
            g_mse = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_mse)]
            g_rt = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_rt)]
            if world_size() > 1:
                reduced = all_reduce(g_mse + g_rt)
                g_mse, g_rt = reduced[: len(params)], reduced[len(params):]
            for p, gm, gr in zip(params, g_mse, g_rt):
                combined = combine(p, gm, gr)
                if combined is not None:
                    p.grad = combined
        if record:
            sums.sort(key=lambda item: item[0])
            norm_m, norm_r, flips, total = (torch.stack([t for _, t in sums]).sum(0).tolist() if sums
                                            else (0.0, 0.0, 0.0, 0.0))
            if world_size() == 1:
                ratio = float(lam * router.detach() / mse.detach().clamp_min(1e-30))
            else:
                mse_value, router_value = all_sum([0.0 if mse is None else float(mse.detach()),
                                                   0.0 if router is None else float(router.detach())])
                ratio = lam * router_value / max(mse_value, 1e-30)
            self._router_scale = {"loss_ratio": ratio,
                                  "grad_norm_ratio": lam * (norm_r ** 0.5) / max(norm_m ** 0.5, 1e-30),
                                  "sign_flip_fraction": flips / max(total, 1.0)}

    def _router_loss(self, reference: Reference, y, logits, kwargs, idx):
        if not self.scoped:
            return None
        next_logits = {}
        if any(where == "next" for where, _ in self.scoped):
            _, next_logits = self.runner.run_next(y, kwargs, stop_after=True)
        valid = reference.valid(idx)
        total = None
        for (where, name), loss in self.losses.items():
            z = logits[name] if where == "block" else next_logits[name]
            z = (z if valid is None else z[valid.reshape(-1).to(z.device)]).float()
            value = loss(z, reference.router_target((where, name), idx))
            total = value if total is None else total + value
        return total / len(self.losses)

    def _writes(self, store: bool = False) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
        """The writes of the weights being tuned (``store``: a part's quantized weights also replace its experts'
        in the stack, for the chunks after it)."""
        return [item for w in self.weights
                for item in quantized_writes(w, f"{self.name}.{w.name}", store=store and w.stacked)]


def _reset(weights: list[TunedWeight], start: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for w, clips in zip(weights, start):
        w.reset(clips)


def _restore(weights: list[TunedWeight], snapshots: list[Snapshot]) -> None:
    for w, snap in zip(weights, snapshots):
        w.restore(snap)


@torch.no_grad()
def _track(tracked, value: torch.Tensor, it: int, weights: list[TunedWeight]):
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


@torch.no_grad()
def _sign_flips(gm: torch.Tensor, gr: torch.Tensor, lam: float, mask: torch.Tensor) -> torch.Tensor:
    """How many coordinates' step sign the weighted router gradient changes (``mask``: experts counted), in pieces
    (:func:`~routealign.schemes.row_chunks`: no temporary of the gradient's size)."""
    rows = gm.reshape(-1, gm.shape[-1])
    weights = mask.expand(*gm.shape[:-1], 1).reshape(-1, 1)
    total = torch.zeros((), dtype=torch.float64, device=gm.device)
    for a, b in row_chunks(*rows.shape, rows.device):
        g = rows[a:b]
        changed = g.sign() != (g + lam * gr.reshape(rows.shape)[a:b]).sign()
        total += (changed * weights[a:b]).sum().double()
    return total
