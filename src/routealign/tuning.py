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
:meth:`BlockTuner.apply`), with compressed-tensors' quantized forward and llm-compressor's all-experts calibration
switched off, so each expert sees only its routed tokens.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from compressed_tensors.quantization import QuantizationStrategy
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from torch.func import functional_call

from .errors import NonFiniteError
from .experts import batched_experts, input_quantization_plans
from .losses import RouterLoss, RouterTarget
from .routing import MoELayer, find_moe_layers
from .schemes import ActivationQuantizer, QParams, WeightQuantizer
from .streams import BlockInputs, run_block, to_device
from .validation import check_finite

__all__ = ["TuningConfig", "TunedWeight", "BlockTuner", "LMTail", "RouterScope", "FUSED_GROUPS", "CLIP_GRID", "world_size",
           "write_parameters", "suspended_offloading", "quantized_writes"]

RouterScope = Literal["block", "next", "both"]

# weights that must share one NVFP4 global scale (vLLM fuses them), as llm-compressor's observers do
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("gate_proj", "up_proj"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("w1", "w3"),
)

_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)\.")


def world_size() -> int:
    """Ranks of the torch.distributed group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_flat(tensors: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """``tensors`` reduced over ranks (``sum`` or ``max``) in one flat all-reduce; returned in their shapes."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [part.view_as(t).clone() for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Scale-out (llm-compressor's distributed mode, calibration samples split across ranks): sum every rounding
    parameter's gradient over ranks, so that every rank takes the same signed step and ends with identical
    parameters. Parameters without a gradient on this rank (no routed token in its minibatch) contribute zeros."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, _all_reduce_flat(grads)):
        p.grad = g


def _global_mean(value: torch.Tensor) -> float:
    """The loss averaged over ranks: every rank keeps the same best iteration."""
    if world_size() == 1:
        return float(value)
    (total,) = _all_reduce_flat([value.reshape(1).float()])
    return float(total) / world_size()


def _global_mean_of(values: torch.Tensor) -> float:
    """Mean of per-sequence ``values`` over every rank's sequences."""
    total, count = values.double().sum().reshape(1), torch.tensor([float(values.numel())], dtype=torch.float64)
    if world_size() > 1:
        total, count = _all_reduce_flat([total, count])
    return float(total) / max(float(count), 1.0)


def paired_gate(diff: torch.Tensor, z: float) -> dict:
    """Decision on per-sequence paired differences ``diff`` (router arm minus plain arm, lower is better, this
    rank's sequences; summed over ranks): keep the router arm iff ``mean + z * se < 0`` with ``se`` the standard
    error of the mean. With one sequence the standard error is unknown: kept only when ``z`` is 0."""
    stats = torch.stack([diff.double().sum(), diff.double().pow(2).sum(),
                         torch.tensor(float(diff.numel()), dtype=torch.float64)])
    if world_size() > 1:
        (stats,) = _all_reduce_flat([stats])
    total, squares, n = (float(v) for v in stats)
    mean = total / max(n, 1.0)
    if n > 1:
        var = max(squares - n * mean * mean, 0.0) / (n - 1)
        se = math.sqrt(var / n)
    else:
        se = 0.0 if z == 0 else math.inf
    bound = mean + z * se if z else mean
    return {"mean_diff": mean, "se": se, "n": int(n), "z": z, "keep": bool(n >= 1 and bound < 0)}


def _shared_across_ranks(module: torch.nn.Module) -> bool:
    """Whether ``module``'s tensors live in storage every rank shares (compressed-tensors' distributed CPU and disk
    offload caches)."""
    from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    return isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))


def _update_onloaded_copy(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Refresh this rank's onloaded copy of an offloaded tensor (kept while offloading is disabled) without writing
    the offloaded tensor another rank writes."""
    cache = module._parameters if name in module._parameters.offloaded_values else module._buffers
    offloaded = cache.offloaded_values.get(name)
    onloaded = cache.keep_onloaded_values.get(offloaded) if offloaded is not None else None
    if onloaded is not None and onloaded is not offloaded:
        onloaded.copy_(value.to(onloaded.dtype).reshape(onloaded.shape))


@torch.no_grad()
def write_parameters(writes: list[tuple[torch.nn.Module, str, torch.Tensor]]) -> None:
    """Write ``(module, name, value)`` with compressed-tensors' ``update_offload_parameter``.

    Under torch.distributed every rank holds the same values (gradients, losses, counts and maxima are all-reduced),
    but compressed-tensors' distributed CPU/disk offload keeps one copy that all ranks share, and
    ``update_offload_parameter`` must not be called by two ranks for the same tensor. There each tensor is written
    by one rank (round robin), the others refresh only their own onloaded copy, and barriers before and after make
    every rank finish reading before anyone writes and see every write afterwards.
    """
    from compressed_tensors.utils import update_offload_parameter

    world = world_size()
    if world == 1:
        for module, name, value in writes:
            update_offload_parameter(module, name, value)
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    dist.barrier()
    for i, (module, name, value) in enumerate(writes):
        if not _shared_across_ranks(module) or i % world == rank:
            update_offload_parameter(module, name, value)
        else:
            _update_onloaded_copy(module, name, value)
    dist.barrier()


def _all_reduce_counts(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Routed-token counts summed over ranks: every rank makes the same RTN-fallback decision."""
    if world_size() == 1 or not counts:
        return counts
    names = sorted(counts)
    return dict(zip(names, _all_reduce_flat([counts[n] for n in names])))


CLIP_GRID: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11))  # RTN-fallback clip search: 1.0 .. 0.5


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
    # coordinate where it outweighs the MSE gradient, whatever lambda is)
    router_balance: Literal["none", "grad_norm"] = "grad_norm"
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

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @classmethod
    def of(cls, settings) -> "TuningConfig":
        """The config carried by ``settings`` (an object with these fields, e.g. the modifier)."""
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})


@contextlib.contextmanager
def suspended_offloading(*modules: torch.nn.Module | None):
    """Take compressed-tensors' offloading off ``modules`` (their tensors stay on the execution device) and put it
    back afterwards. functional_call swaps parameters in ``_parameters``; an offload cache would copy them and cut
    the gradient."""
    from compressed_tensors.offload import get_cache_init_kwargs
    from compressed_tensors.offload.cache.base import OffloadCache
    from compressed_tensors.offload.module import offload_module, remove_module_offload

    suspended = []
    for root in modules:
        if root is None:
            continue
        for sub in root.modules():
            if isinstance(sub._parameters, OffloadCache):
                # devices and cache settings (disk offload: its folder), to put the same offloading back
                suspended.append((sub, get_cache_init_kwargs(sub)))
                remove_module_offload(sub, onload_tensors=True)
    try:
        yield
    finally:
        for sub, kwargs in suspended:
            offload_module(sub, **kwargs)


@dataclass
class TunedWeight:
    """One targeted Linear weight and its rounding parameters."""

    name: str  # relative to the block
    module: torch.nn.Module
    quantizer: WeightQuantizer
    global_scale: torch.Tensor | None
    expert: int | None
    offset: torch.Tensor = field(init=False)
    clip_lo: torch.Tensor = field(init=False)
    clip_hi: torch.Tensor = field(init=False)
    trainable: bool = True
    _frozen: torch.Tensor | None = field(default=None, init=False, repr=False)  # fake weight once not trainable

    def __post_init__(self):
        w = self.module.weight.detach()
        self.dtype = w.dtype
        self.weight32 = w.to(torch.float32, copy=True)  # never the module's storage (float32 models; shared ranks)
        wmin, wmax = self.quantizer.group_minmax(self.weight32)
        self._min32, self._max32 = wmin, wmax
        self.offset = torch.zeros_like(self.weight32, requires_grad=True)
        self.clip_lo = torch.ones_like(wmin, requires_grad=True)
        self.clip_hi = torch.ones_like(wmax, requires_grad=True)
        self._gs32 = self.global_scale.float() if self.global_scale is not None else None

    def parameters(self) -> list[torch.Tensor]:
        return [self.offset, self.clip_lo, self.clip_hi]

    def fake_weight(self) -> torch.Tensor:
        """float32 fake-quantized weight with gradients to the rounding parameters; once the weight is no longer
        trainable (RTN fallback), computed once, without a graph, and reused by every iteration."""
        if not self.trainable:
            if self._frozen is None:
                with torch.no_grad():
                    self._frozen = self._fake_weight()
            return self._frozen
        return self._fake_weight()

    def _fake_weight(self) -> torch.Tensor:
        qp = self.quantizer.qparams(self._min32 * self.clip_lo, self._max32 * self.clip_hi, self._gs32)
        return self.quantizer.fake_quant(self.weight32, qp, self.offset)

    @torch.no_grad()
    def mse_clip_fallback(self, grid: tuple[float, ...]) -> None:
        """RTN with, per group, the clip factor on ``grid`` that minimises the weight reconstruction error; the
        weight is no longer tuned."""
        self.mse_clip(grid)
        self.trainable = False
        self._frozen = None

    @torch.no_grad()
    def mse_clip(self, grid: tuple[float, ...]) -> None:
        """Per group, the clip factor on ``grid`` that minimises the weight reconstruction error (symmetric clip),
        as the clip ranges; rounding offsets zero."""
        best_err, best_c = None, None
        for c in grid:
            lo = torch.full_like(self.clip_lo, c)
            qp = self.quantizer.qparams(self._min32 * lo, self._max32 * lo, self._gs32)
            err = (self.quantizer.fake_quant(self.weight32, qp) - self.weight32).pow(2)
            err = err.unflatten(-1, (lo.shape[-1], -1)).sum(-1)
            if best_err is None:
                best_err, best_c = err, lo.clone()
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_c = torch.where(better, lo, best_c)
        self.clip_lo.copy_(best_c)
        self.clip_hi.copy_(best_c)
        self.offset.zero_()

    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, QParams]:
        """Quantize-dequantized weight in the model's dtype and its parameters.

        Scales are computed as llm-compressor's observers compute them (from the clipped group range, in the
        weight's dtype). Untuned weights (offset 0, clip 1) are quantized with compressed-tensors' own arithmetic:
        exactly RTN. Tuned weights take their integers from the float32 arithmetic they were tuned in: signed
        gradient descent leaves many offsets just across a rounding boundary, and re-deriving the integers in bf16
        (relative error 2^-9) would undo those decisions at random. The dequantized value ``(q - zp) * scale`` is
        then rounded once to the model's dtype; compressed-tensors re-quantizes it to the same integers (<= 4 bits).
        """
        # the weight as it was when tuning started, never re-read from the module: under torch.distributed another
        # rank may already have written its (identical) result into storage the ranks share
        w = self.weight32.to(self.dtype)
        wmin, wmax = self.quantizer.group_minmax(w)
        lo = (wmin.float() * self.clip_lo).to(w.dtype)
        hi = (wmax.float() * self.clip_hi).to(w.dtype)
        qp = self.quantizer.qparams(lo, hi, self.global_scale)
        if not bool(self.offset.any()) and bool((self.clip_lo == 1).all() and (self.clip_hi == 1).all()):
            return self.quantizer.fake_quant(w, qp), qp
        qp32 = QParams(qp.scale.float(), qp.zero_point, qp.global_scale)
        return self.quantizer.fake_quant(self.weight32, qp32, self.offset).to(w.dtype), qp


@torch.no_grad()
def quantized_writes(w: TunedWeight, where: str) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """``(module, name, value)`` writes of ``w``'s quantize-dequantized weight and quantization parameters, each
    checked finite (:class:`NonFiniteError` naming ``where``)."""
    weight, qp = w.final()
    for what, value in (("weight", weight), ("weight_scale", qp.scale), ("weight_global_scale", qp.global_scale)):
        if value is not None:
            check_finite(value, f"{where}: quantized {what}")
    writes = [(w.module, "weight", weight)]
    for key, value in (("weight_scale", qp.scale), ("weight_zero_point", qp.zero_point),
                       ("weight_global_scale", qp.global_scale)):
        current = getattr(w.module, key, None)
        if value is not None and current is not None:
            writes.append((w.module, key, value.to(current.dtype).reshape(current.shape)))
    return writes


class _CyclicBatches:
    """Minibatches of ``indices`` drawn as AutoRound draws them: a shuffled pass over all of them, batch after
    batch, reshuffled when fewer than a batch remain (every calibration sequence is used equally often)."""

    def __init__(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.indices = indices
        self.size = min(batch_size, indices.numel())
        self.generator = generator
        self.order = indices[:0]
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.size > self.order.numel():
            self.order = self.indices[torch.randperm(self.indices.numel(), generator=self.generator)]
            self.pos = 0
        batch = self.order[self.pos : self.pos + self.size]
        self.pos += self.size
        return batch


@dataclass
class LMTail:
    """The rest of the model after a block, run unquantized for decisions at the LM head (``decide_on:
    lm_head``): the later decoder layers with their keyword arguments, the final norm and the LM head."""

    layers: list[torch.nn.Module]
    kwargs: list[dict]
    norm: torch.nn.Module | None
    head: torch.nn.Module


class BlockTuner:
    """Learned rounding of every targeted Linear in ``block``.

    ``targets`` maps names relative to ``block`` to compressed-tensors weight ``QuantizationArgs``. ``kwargs`` of
    the inputs are the block's keyword arguments as the model's forward passes them
    (:class:`~routealign.streams.StreamEngine`). ``next_block`` is the following decoder layer, or the list of the
    layers downstream up to and including the first one that routes (a Nemotron-H MoE block is followed by attention
    or mamba blocks first); ``next_kwargs`` their keyword arguments (default: the block's own). The next router is
    the router of the last of them (``router_scope`` ``next``/``both``).
    """

    def __init__(self, block: torch.nn.Module, targets: dict, loss_config, config: TuningConfig,
                 next_block: torch.nn.Module | list | None = None, name: str = "block",
                 output_norm: torch.nn.Module | None = None, activations: dict | None = None,
                 next_kwargs: list[dict] | None = None, lm_tail: LMTail | None = None):
        self.block = block
        # input-activation quantization args of targets whose inputs are fake-quantized while tuning (NVFP4)
        self.activations = dict(activations or {})
        self._act_hooks_on: dict[str, ActivationQuantizer] = {}
        self._act_plans: dict = {}  # experts.input_quantization_plans of _act_hooks_on, while simulating
        if next_block is None:
            chain = []
        elif isinstance(next_block, (list, tuple)):
            chain = list(next_block)
        else:
            chain = [next_block]
        self.next_chain = chain
        self.next_block = chain[-1] if chain else None
        if next_kwargs is not None and len(next_kwargs) != len(chain):
            raise ValueError(f"{name}: {len(next_kwargs)} keyword sets for {len(chain)} downstream layers")
        self.output_norm = output_norm
        self.config = config
        self.name = name
        self.device = next(block.parameters()).device
        # float32 on the block's device once, not on every tuning forward
        self._next_kw32 = (None if next_kwargs is None
                           else [to_device(kw, torch.float32, self.device) for kw in next_kwargs])
        self._down_fp: list[torch.Tensor] = []  # downstream outputs of the held-out targets, the same for both arms
        self._down_fp_idx: list[dict[str, torch.Tensor]] = []  # the next routers' choices on them
        modules = dict(block.named_modules())
        self.weights: list[TunedWeight] = []
        quantizers = {n: WeightQuantizer(args, full_range=config.full_range) for n, args in targets.items()}
        global_scales = self._global_scales(modules, quantizers)
        for n, quantizer in quantizers.items():
            match = _EXPERT_RE.search(n)
            self.weights.append(TunedWeight(n, modules[n], quantizer, global_scales.get(n),
                                            int(match.group(1)) if match else None))
        self.own_layers = find_moe_layers(block, require=False)
        self.next_layers = find_moe_layers(self.next_block, require=False) if chain else []
        scope = config.router_scope if loss_config.objective != "none" else None
        self.scoped: list[tuple[str, MoELayer]] = []
        if scope in ("block", "both"):
            self.scoped += [("block", l) for l in self.own_layers]
        if scope in ("next", "both"):
            self.scoped += [("next", l) for l in self.next_layers]
        self.losses = {(where, l.name): RouterLoss(loss_config, l.family, l.router) for where, l in self.scoped}
        self.loss_config = loss_config
        self._params32 = self._float_params(block)
        self._next_params32 = [self._float_params(b) for b in chain]
        self._norm_params32 = self._float_params(output_norm) if output_norm is not None else {}
        self.history: list[float] = []
        self.fallback: dict[str, int] = {}
        # per arm (``router`` / ``plain``): training and held-out losses, the iteration kept, the downstream error
        self.arms: dict[str, dict] = {}
        self.router_kept: bool | None = None
        self.gate: dict | None = None  # the gate's statistics (paired_gate) when both arms ran
        self.headroom: dict | None = None  # forced-routing statistics (router_headroom)
        self.router_scale: dict | None = None  # the router term against the MSE at the first router iteration
        self._mask: torch.Tensor | None = None  # real tokens of the calibration sequences (None: none padded)
        if config.decide_on == "lm_head" and lm_tail is None:
            raise ValueError(f"{name}: decide_on 'lm_head' needs the rest of the model (lm_tail)")
        self.lm_tail = lm_tail if config.decide_on == "lm_head" else None
        if self.lm_tail is not None:
            self._tail_params = [self._float_params(m) for m in self.lm_tail.layers]
            self._tail_kw32 = [to_device(kw, torch.float32, self.device) for kw in self.lm_tail.kwargs]
            self._tail_norm32 = self._float_params(self.lm_tail.norm) if self.lm_tail.norm is not None else {}
            self._head32 = self._float_params(self.lm_tail.head)
        self._tail_fp: list[torch.Tensor] = []  # unquantized log-probabilities of the held-out chunks
        self._tail_fp_idx: list[dict[str, torch.Tensor]] = []  # the next routers' choices on them

    @staticmethod
    def _float_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if tensor.is_floating_point() and not leaf.startswith(("weight_", "input_", "output_")):
                out[name] = tensor.detach().float()
        return out

    @staticmethod
    def _global_scales(modules: dict, quantizers: dict) -> dict[str, torch.Tensor]:
        """One NVFP4 global scale per fused group (siblings under one parent), else per weight."""
        scales: dict[str, torch.Tensor] = {}
        for name, quantizer in quantizers.items():
            if not quantizer.uses_global_scale or name in scales:
                continue
            parent, _, leaf = name.rpartition(".")
            group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
            members = [f"{parent}.{m}" if parent else m for m in group]
            members = [m for m in members if m in quantizers]
            scale = quantizer.global_scale(*[modules[m].weight.detach() for m in members])
            for m in members:
                scales[m] = scale
        return scales

    # -- forward passes -----------------------------------------------------------------------------------
    def _run(self, module, params, hidden, kwargs, layers, stop_after: bool = False, all_experts: bool = False,
             batched: bool | None = None, force: dict[str, torch.Tensor] | None = None):
        """Forward ``module`` with ``params`` (:func:`routealign.streams.run_block`); returns (output, or None when
        stopped after the last of ``layers``' routers, and their logits by layer name, with gradients)."""
        batched = self.config.batched_experts if batched is None else batched
        acting = module is self.block and bool(self._act_hooks_on)
        @contextlib.contextmanager
        def extra():
            with contextlib.ExitStack() as stack:
                if batched and not all_experts:
                    # the batched experts bypass the expert Linear modules where the activation hooks sit, so they
                    # apply those quantizers themselves
                    stack.enter_context(batched_experts(module, self._act_plans if acting else None))
                if acting:
                    stack.enter_context(self._activation_hooks())
                yield

        # entered inside run_block, after plain_forwards (which removes instance forwards: entered before it, the
        # batched experts' forward would be removed and llm-compressor's per-expert loop would run instead)
        return run_block(module, params, hidden, kwargs, layers, stop_after=stop_after, all_experts=all_experts,
                         extra=extra(), force=force)

    def _run_next(self, y: torch.Tensor, kwargs: dict, stop_after: bool,
                  force: dict[str, torch.Tensor] | None = None):
        """The downstream layers (unquantized) on ``y``: (output of the last, or None when stopped after its
        routers, and its routers' logits). ``force``: expert indices the next routers return instead of their own."""
        h, logits = y, {}
        for i, (module, params) in enumerate(zip(self.next_chain, self._next_params32)):
            kw = kwargs if self._next_kw32 is None else self._next_kw32[i]
            last = i == len(self.next_chain) - 1
            h, logits = self._run(module, params, h, kw, self.next_layers if last else [],
                                  stop_after=stop_after and last, force=force if last else None)
        return h, logits

    def _chunks(self, inputs: BlockInputs, chunk: int = 8):
        """``(float32 hidden chunk, float32 kwargs, real-token mask or None)`` over the calibration sequences in
        order, on the block's device (padded sequences stay padded: for values, not for statistics taken by hooks,
        see :meth:`BlockInputs.by_length`)."""
        kwargs = to_device(inputs.kwargs, torch.float32, self.device)
        mask = inputs.mask()
        for start in range(0, inputs.hidden.shape[0], chunk):
            yield (inputs.hidden[start : start + chunk].to(self.device, torch.float32), kwargs,
                   None if mask is None else mask[start : start + chunk].to(self.device))

    def _valid(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Real-token mask ``[len(idx), T]`` of calibration sequences ``idx`` (None: nothing is padded)."""
        return None if self._mask is None else self._mask[idx.to(self._mask.device)]

    def _block_params(self) -> dict[str, torch.Tensor]:
        params = dict(self._params32)
        for w in self.weights:
            params[f"{w.name}.weight"] = w.fake_weight()
        return params

    @torch.no_grad()
    def targets(self, fp: BlockInputs, chunk: int = 8):
        """Unquantized outputs and router targets on the unquantized stream; returns the outputs (the next block's
        unquantized inputs) in the input dtype."""
        outs, own, nxt = [], {l.name: [] for l in self.own_layers}, {l.name: [] for l in self.next_layers}
        mask = fp.mask()
        self._mask = None if mask is None else mask.to(self.device)
        for h, kwargs, valid in self._chunks(fp, chunk):
            y, logits = self._run(self.block, self._params32, h, kwargs, self.own_layers)
            outs.append(y if valid is None else y.masked_fill(~valid.unsqueeze(-1), 0))  # padded: zeros
            for n in own:
                own[n].append(logits[n].float())
            if self.next_layers:
                _, logits = self._run_next(y, kwargs, stop_after=True)
                for n in nxt:
                    nxt[n].append(logits[n].float())
        self._y_fp = torch.cat(outs)
        self._seq = fp.hidden.shape[1]
        self._targets: dict[tuple[str, str], RouterTarget] = {}
        for (where, name), loss in self.losses.items():
            z = torch.cat(own[name] if where == "block" else nxt[name])
            self._targets[(where, name)] = loss.target(z.reshape(-1, z.shape[-1]))
        return self._y_fp.to(fp.hidden.dtype)

    def _slice_target(self, tgt: RouterTarget, idx: torch.Tensor) -> RouterTarget:
        seq = self._seq
        rows = idx.view(-1, 1) * seq + torch.arange(seq, device=idx.device).view(1, -1)
        valid = self._valid(idx)
        rows = rows.reshape(-1) if valid is None else rows[valid.to(rows.device)]
        return tgt[rows.to(tgt.logits.device)]

    @staticmethod
    def _real_rows(z: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Router logits ``[B*T, E]`` of the real tokens only."""
        return z if valid is None else z[valid.reshape(-1).to(z.device)]

    @staticmethod
    def _mse(y: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Mean squared error over the real tokens (``valid`` ``[B, T]``; None: every position)."""
        if valid is None:
            return torch.nn.functional.mse_loss(y, target)
        return torch.nn.functional.mse_loss(y[valid], target[valid])

    @torch.no_grad()
    def expert_token_counts(self, q: BlockInputs, chunk: int = 8) -> dict[str, torch.Tensor]:
        """Routed calibration tokens per expert of each MoE layer in the block, on the quantized stream."""
        counts = {l.name: torch.zeros(l.num_experts, dtype=torch.long) for l in self.own_layers}
        if not self.own_layers:
            return counts
        for h, kwargs, valid in self._chunks(q, chunk):
            _, logits = self._run(self.block, self._params32, h, kwargs, self.own_layers, stop_after=True)
            for l in self.own_layers:
                idx = l.family.route(l.router, self._real_rows(logits[l.name], valid)).indices
                counts[l.name] += torch.bincount(idx.reshape(-1).cpu(), minlength=l.num_experts)
        return counts

    def _apply_fallback(self, counts: dict[str, torch.Tensor]) -> None:
        if not self.own_layers:
            return
        starving: dict[int, int] = {}
        for l in self.own_layers:
            for e, c in enumerate(counts[l.name].tolist()):
                if c < self.config.min_expert_tokens:
                    starving[e] = c
        self.fallback = {}
        for w in self.weights:
            if w.expert is not None and w.expert in starving:
                w.mse_clip_fallback(CLIP_GRID)
                self.fallback[w.name] = starving[w.expert]
        if starving:
            listed = ", ".join(f"experts.{e} ({c} tokens)" for e, c in sorted(starving.items()))
            logger.info(f"{self.name}: {len(starving)} experts with fewer than {self.config.min_expert_tokens} "
                        f"routed calibration tokens use MSE-clipped RTN: {listed}")

    # -- the loop -----------------------------------------------------------------------------------------
    def split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tuning, held-out) calibration sequence indices: ``holdout`` of ``n``, drawn with the seed; none held
        out when that is less than one sequence or would leave none to tune on."""
        held = int(n * self.config.holdout)
        if held < 1 or held >= n:
            return torch.arange(n), torch.arange(0)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1_000_003))
        return perm[held:].sort().values, perm[:held].sort().values

    def tune(self, q: BlockInputs, fp: BlockInputs) -> torch.Tensor:
        """Tune on quantized-stream inputs ``q`` against unquantized-stream inputs ``fp``; returns the unquantized
        block outputs (the next block's unquantized-stream inputs).

        With held-out sequences (``holdout``) the iteration kept is the one with the lowest held-out loss (checked
        every ``holdout_every`` iterations and after the last); with a router objective and ``router_gate``, the
        block is tuned twice from the same start on the same minibatches, with and without the router term, and
        the result with the smaller held-out error at the output of the first routing layer downstream (where a
        changed expert choice shows in the values; the block's own output for the last block) is kept."""
        check_finite(q.hidden, f"{self.name}: calibration activations entering the layer (quantized stream)")
        check_finite(fp.hidden, f"{self.name}: calibration activations entering the layer (unquantized stream)")
        y_fp = self.targets(fp)
        check_finite(self._y_fp, f"{self.name}: the unquantized layer's output")
        self._apply_fallback(_all_reduce_counts(self.expert_token_counts(q)))
        cfg = self.config
        if cfg.iters <= 0 or not self.weights:
            return y_fp
        if cfg.init == "mse":
            for w in self.weights:
                if w.trainable:
                    w.mse_clip(CLIP_GRID)
        params = [p for w in self.weights if w.trainable for p in w.parameters()]
        train, held = self.split(q.hidden.shape[0])
        arms = ["router"] if self.scoped else ["plain"]
        if self.scoped and cfg.router_gate and held.numel() and cfg.router_weight > 0:
            arms = ["plain", "router"]
        simulate = cfg.quantize_activations and bool(self.activations)
        start = [p.detach().clone() for p in params]
        results: dict[str, list[torch.Tensor]] = {}
        histories: dict[str, list[float]] = {}

        def tune_arm(arm: str) -> None:
            self._set(params, start)
            self.history = []
            results[arm], self.arms[arm] = self._tune_loop(q, params, train, held, use_router=arm == "router")
            histories[arm] = self.history

        with self._simulating(self.activation_quantizers(q) if simulate else {}):
            tune_arm(arms[0])
            chosen = arms[0]
            self.router_kept = True if chosen == "router" else None
            if len(arms) == 2:
                # the plain arm's held-out downstream errors, with its kept parameters (the loop ends on the last
                # iteration's): used by the headroom rule and by the gate
                self._set(params, results["plain"])
                plain = self._decision_errors(q, held)
                self.arms["plain"]["downstream_heldout"] = _global_mean_of(plain)
                self.gate = {"keep": False, "headroom": None}
                if not self._router_has_no_headroom(q, held, plain):
                    tune_arm("router")
                    self._set(params, results["router"])
                    router = self._decision_errors(q, held)
                    self.arms["router"]["downstream_heldout"] = _global_mean_of(router)
                    self.gate = paired_gate(router - plain, cfg.router_gate_z)
                self.gate["headroom"] = self.headroom
                self.router_kept = self.gate["keep"]
                chosen = "router" if self.router_kept else "plain"
        self._set(params, results[chosen])
        self.history = histories[chosen]
        return y_fp

    @staticmethod
    @torch.no_grad()
    def _set(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for p, v in zip(params, values):
            p.copy_(v)
            p.grad = None

    def _tune_loop(self, q: BlockInputs, params: list[torch.Tensor], train: torch.Tensor, held: torch.Tensor,
                   use_router: bool) -> tuple[list[torch.Tensor], dict]:
        """Signed gradient descent on minibatches of ``train``; returns the parameters of the iteration with the
        lowest held-out loss (lowest training loss when nothing is held out) and a summary."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        kwargs = to_device(q.kwargs, torch.float32, self.device)
        best_loss, best, best_it = math.inf, None, -1
        heldout: list[tuple[int, float]] = []
        batches = _CyclicBatches(train, cfg.batch_size, gen)

        def consider(it: int, value: float) -> None:
            nonlocal best_loss, best, best_it
            if value < best_loss:
                best_loss, best_it = value, it
                best = [p.detach().clone() for p in params]

        with torch.enable_grad():
            for it in range(cfg.iters):
                if held.numel() and it % cfg.holdout_every == 0:
                    heldout.append((it, self._heldout_loss(q, held, use_router)))
                    consider(it, heldout[-1][1])
                idx = batches.next()
                h = q.hidden[idx].to(self.device, torch.float32)
                with self._autocast():
                    y, logits = self._run(self.block, self._block_params(), h, kwargs, self.own_layers)
                y = y.float()
                target = self._y_fp[idx.to(self._y_fp.device)].to(y.device)
                loss = self._mse(self._normed(y), self._normed(target), self._valid(idx))
                with self._autocast():
                    router = self._router_loss(y, logits, kwargs, idx) if use_router else None
                total = loss + cfg.router_weight * router if router is not None else loss
                value = _global_mean(total.detach())
                if not math.isfinite(value):
                    last = (f"last finite loss {best_loss:.6g} at iteration {best_it}" if best is not None
                            else "no finite loss yet")
                    raise NonFiniteError(
                        f"{self.name}: tuning loss is {value} at iteration {it} ({last}); the run stops: layers "
                        f"before {self.name} are quantized, {self.name} and later layers are unchanged"
                    )
                self.history.append(value)
                if not held.numel():
                    consider(it, value)
                for p in params:
                    p.grad = None
                # a router term that reaches no tuned weight (unreachable, reported) has no gradient to combine
                combine = router is not None and router.requires_grad
                if combine and (cfg.router_balance != "none" or it == 0):
                    self._combine_gradients(params, loss, router, measure_only=cfg.router_balance == "none")
                if not combine or cfg.router_balance == "none":
                    total.backward()
                _all_reduce_grads(params)
                lr = cfg.learning_rate * (1 - it / cfg.iters)
                with torch.no_grad():
                    for w in self.weights:
                        if not w.trainable:
                            continue
                        for p in w.parameters():
                            if p.grad is not None:
                                p.add_(p.grad.sign(), alpha=-lr)
                        w.offset.clamp_(-0.5, 0.5)
                        w.clip_lo.clamp_(0.0, 1.0)
                        w.clip_hi.clamp_(0.0, 1.0)
            if held.numel():
                heldout.append((cfg.iters, self._heldout_loss(q, held, use_router)))
                consider(cfg.iters, heldout[-1][1])
        info = {"best_iter": best_it, "train_first": self.history[0] if self.history else None,
                "train_best": min(self.history) if self.history else None,
                "heldout_first": heldout[0][1] if heldout else None,
                "heldout_best": best_loss if heldout else None, "heldout_curve": heldout}
        return best, info

    def _router_has_no_headroom(self, q: BlockInputs, held: torch.Tensor, own: torch.Tensor) -> bool:
        """With the plain arm's kept parameters set and ``own`` its held-out downstream errors: whether forcing the
        unquantized expert choices at the next routers fails to lower them significantly (``router_headroom``;
        records ``headroom``)."""
        cfg = self.config
        if not (cfg.router_headroom and self.next_chain and self.next_layers
                and any(where == "next" for where, _ in self.scoped)):
            return False
        forced = self._decision_errors(q, held, forced=True)
        self.headroom = {**paired_gate(forced - own, cfg.router_gate_z), "own": _global_mean_of(own),
                         "forced": _global_mean_of(forced)}
        return not self.headroom["keep"]

    def _combine_gradients(self, params: list[torch.Tensor], mse: torch.Tensor, router: torch.Tensor,
                           measure_only: bool) -> None:
        """Separate MSE and router gradients; records at the first call how they compare (``router_scale``: loss
        ratio, gradient-norm ratio and the fraction of coordinates whose step sign the weighted router gradient
        changes); unless ``measure_only``, sets ``p.grad`` to the MSE gradient plus the router gradient rescaled
        per tensor to ``router_weight`` times the MSE gradient's norm."""
        lam = self.config.router_weight
        g_mse = torch.autograd.grad(mse, params, retain_graph=True, allow_unused=True)
        g_rt = torch.autograd.grad(router, params, retain_graph=measure_only, allow_unused=True)
        flips = total = 0
        norm_m = norm_r = 0.0
        for p, gm, gr in zip(params, g_mse, g_rt):
            gm = torch.zeros_like(p) if gm is None else gm
            gr = torch.zeros_like(p) if gr is None else gr
            nm, nr = gm.norm(), gr.norm()
            norm_m += float(nm) ** 2
            norm_r += float(nr) ** 2
            if self.router_scale is None:
                flips += int((gm.sign() != (gm + lam * gr).sign()).sum())
                total += gm.numel()
            if not measure_only:
                p.grad = gm + lam * gr * (nm / nr.clamp_min(1e-30))
        if self.router_scale is None:
            self.router_scale = {"loss_ratio": float(lam * router.detach() / mse.detach().clamp_min(1e-30)),
                                 "grad_norm_ratio": lam * (norm_r ** 0.5) / max(norm_m ** 0.5, 1e-30),
                                 "sign_flip_fraction": flips / max(total, 1)}

    def _held_out(self, q: BlockInputs, held: torch.Tensor, layers: list, chunk: int = 8):
        """Per chunk of the held-out sequences, with the current rounding parameters: ``(indices, block output,
        router logits of layers, unquantized target, float32 kwargs)``."""
        kwargs = to_device(q.kwargs, torch.float32, self.device)
        params = self._block_params()
        for start in range(0, held.numel(), chunk):
            idx = held[start : start + chunk]
            y, logits = self._run(self.block, params, q.hidden[idx].to(self.device, torch.float32), kwargs, layers)
            yield idx, y, logits, self._y_fp[idx.to(self._y_fp.device)].to(y.device), kwargs

    def _autocast(self):
        """bfloat16 autocast on the block's device when ``amp`` (else nothing)."""
        if not self.config.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def _heldout_loss(self, q: BlockInputs, held: torch.Tensor, use_router: bool) -> float:
        """The tuning objective (block-output MSE, plus the weighted router term when ``use_router``) on the
        held-out sequences, with the current rounding parameters (under ``amp`` as the steps are); with
        ``decide_on: lm_head`` the mean next-token KL at the LM head instead (:meth:`lm_head_errors`)."""
        if self.lm_tail is not None:
            return _global_mean_of(self.lm_head_errors(q, held))
        sq, elems, router, chunks = 0.0, 0, 0.0, 0
        with self._autocast():
            for idx, y, logits, target, kwargs in self._held_out(q, held, self.own_layers):
                y = y.float()
                err = self._normed(y) - self._normed(target)
                valid = self._valid(idx)
                err = err if valid is None else err[valid]
                sq += float(err.pow(2).sum())
                elems += err.numel()
                if use_router and self.scoped:
                    router += float(self._router_loss(y, logits, kwargs, idx)) * idx.numel()
                    chunks += idx.numel()
        value = sq / max(elems, 1)
        if chunks:
            value += self.config.router_weight * router / chunks
        return _global_mean(torch.tensor(value))

    @torch.no_grad()
    def _downstream_errors(self, q: BlockInputs, held: torch.Tensor, forced: bool = False) -> torch.Tensor:
        """Per held-out sequence, the mean squared error at the output of the first routing layer downstream (the
        next layers unquantized, their experts chosen by their own routers, or with ``forced`` by the unquantized
        stream's choices), or of this block (through the final norm) when none follows."""
        errors = []
        for i, (idx, y, _, target, kwargs) in enumerate(self._held_out(q, held, [])):
            if self.next_chain:
                if i == len(self._down_fp):  # the unquantized side is the same for every arm: computed once
                    out, logits = self._run_next(target, kwargs, stop_after=False)
                    self._down_fp.append(out)
                    self._down_fp_idx.append({l.name: l.family.route(l.router, logits[l.name]).indices
                                              for l in self.next_layers if l.name in logits})
                force = self._down_fp_idx[i] if forced else None
                y, _ = self._run_next(y, kwargs, stop_after=False, force=force)
                target = self._down_fp[i]
            else:
                y, target = self._normed(y), self._normed(target)
            errors.append(self._per_sequence(idx, (y - target).pow(2).mean(-1)))
        return torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)

    def _per_sequence(self, idx: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """Per-token errors ``[B, T]`` of calibration sequences ``idx`` averaged over each one's real tokens
        (float64, on the CPU)."""
        valid = self._valid(idx)
        err = err.mean(1) if valid is None else err.masked_fill(~valid, 0).sum(1) / valid.sum(1)
        return err.double().cpu()

    def _decision_errors(self, q: BlockInputs, held: torch.Tensor, forced: bool = False) -> torch.Tensor:
        """Per held-out sequence, what the gate and the headroom rule compare (``decide_on``)."""
        if self.lm_tail is not None:
            return self.lm_head_errors(q, held, forced=forced)
        return self._downstream_errors(q, held, forced=forced)

    def _tail_logprobs(self, y: torch.Tensor, force: dict[str, torch.Tensor] | None = None,
                       route: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log-probabilities of the next token after ``y`` (this block's output) through the rest of the model,
        unquantized; ``force``: expert indices the next routers return instead of their own; with ``route`` also
        the next routers' own choices."""
        tail = self.lm_tail
        h, chosen = y, {}
        for module, params, kw in zip(tail.layers, self._tail_params, self._tail_kw32):
            routing = module is self.next_block
            layers = self.next_layers if routing else []
            h, logits = self._run(module, params, h, kw, layers, force=force if routing else None)
            if routing and route:
                chosen = {l.name: l.family.route(l.router, logits[l.name]).indices
                          for l in self.next_layers if l.name in logits}
        if tail.norm is not None:
            h = functional_call(tail.norm, self._tail_norm32, (h,))
        logits = functional_call(tail.head, self._head32, (h,))
        return torch.log_softmax(logits.float(), dim=-1), chosen

    @torch.no_grad()
    def lm_head_errors(self, q: BlockInputs, held: torch.Tensor, forced: bool = False) -> torch.Tensor:
        """Per held-out sequence, the mean over its real tokens of ``KL(p_fp || p_q)`` of the next-token
        distributions: ``p_q`` from this block's quantized output (current rounding parameters, quantized-stream
        input), ``p_fp`` from its unquantized output, each through the rest of the model unquantized (``forced``:
        the next routers take the unquantized side's expert choices)."""
        errors = []
        for i, (idx, y, _, target, _) in enumerate(self._held_out(q, held, [])):
            if i == len(self._tail_fp):  # the unquantized side is the same for every arm: computed once
                logp, chosen = self._tail_logprobs(target, route=True)
                self._tail_fp.append(logp)
                self._tail_fp_idx.append(chosen)
            ref = self._tail_fp[i]
            logq, _ = self._tail_logprobs(y, force=self._tail_fp_idx[i] if forced else None)
            errors.append(self._per_sequence(idx, (ref.exp() * (ref - logq)).sum(-1)))
        return torch.cat(errors) if errors else torch.zeros(0, dtype=torch.float64)

    def _downstream_error(self, q: BlockInputs, held: torch.Tensor) -> float:
        """The mean of :meth:`_downstream_errors` (over all ranks' held-out sequences)."""
        return _global_mean_of(self._downstream_errors(q, held))

    def _normed(self, y: torch.Tensor) -> torch.Tensor:
        """The last block's output is read only through the model's final norm: measure its error there."""
        if self.output_norm is None:
            return y
        return functional_call(self.output_norm, self._norm_params32, (y,))

    def _router_loss(self, y, logits, kwargs, idx):
        if not self.scoped:
            return None
        next_logits = {}
        if any(where == "next" for where, _ in self.scoped):
            _, next_logits = self._run_next(y, kwargs, stop_after=True)
        total = None
        for (where, name), loss in self.losses.items():
            z = self._real_rows(logits[name] if where == "block" else next_logits[name], self._valid(idx)).float()
            value = loss(z, self._slice_target(self._targets[(where, name)], idx))
            total = value if total is None else total + value
        return total / len(self.losses)

    @contextlib.contextmanager
    def _simulating(self, quantizers: dict[str, ActivationQuantizer]):
        """Inside, the block's forwards fake-quantize the inputs of the targets in ``quantizers``."""
        modules = dict(self.block.named_modules())
        self._act_hooks_on = quantizers
        # what the batched experts apply, worked out once rather than on every forward
        self._act_plans = input_quantization_plans(self.block, {modules[n]: q for n, q in quantizers.items()})
        try:
            yield
        finally:
            self._act_hooks_on, self._act_plans = {}, {}

    @contextlib.contextmanager
    def _activation_hooks(self):
        modules = dict(self.block.named_modules())
        handles = [modules[n].register_forward_pre_hook(lambda mod, args, quant=quant: (quant(args[0]), *args[1:]))
                   for n, quant in self._act_hooks_on.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def activation_quantizers(self, q: "BlockInputs", scales: dict | None = None) -> dict[str, ActivationQuantizer]:
        """Straight-through activation fake quantizers of the targets with quantized inputs, with the global scales
        ``scales`` (default: :meth:`input_global_scales` on ``q`` with the current weights)."""
        if scales is None:
            scales = self.input_global_scales(q, list(self.activations))
        return {n: ActivationQuantizer(args, scales.get(n)) for n, args in self.activations.items()
                if args.strategy != QuantizationStrategy.TENSOR_GROUP or n in scales}

    @torch.no_grad()
    def input_global_scales(self, q: "BlockInputs", names: list[str]) -> dict[str, torch.Tensor]:
        """NVFP4 input global scales (float32 ``[1]``, compressed-tensors' ``generate_gparam``) of ``names`` from
        the largest input each sees on the quantized stream: all tokens or only the routed ones
        (``activation_scale_tokens``). An expert that saw no routed token takes the largest value among the
        same projection of the other experts."""
        from compressed_tensors.quantization.utils import generate_gparam

        if not names:
            return {}
        amax = self.routed_input_amax(q, names, all_tokens=self.config.activation_scale_tokens == "all")
        by_leaf: dict[str, torch.Tensor] = {}
        for n, value in amax.items():
            leaf = n.rsplit(".", 1)[-1]
            by_leaf[leaf] = torch.maximum(by_leaf[leaf], value) if leaf in by_leaf else value
        scales = {}
        for n in names:
            value = amax.get(n, by_leaf.get(n.rsplit(".", 1)[-1]))
            if value is not None:
                scales[n] = generate_gparam(-value.reshape(1).float(), value.reshape(1).float())
        return scales

    @torch.no_grad()
    def routed_input_amax(self, q: BlockInputs, names: list[str], chunk: int = 8,
                          all_tokens: bool = False) -> dict[str, torch.Tensor]:
        """Largest absolute input each named module sees when the block (with its current weights) runs on the
        quantized stream; experts see only their routed tokens (``all_tokens``: every token, as under
        llm-compressor's all-experts calibration). Modules that see no token are absent."""
        modules = dict(self.block.named_modules())
        params = self._float_params(self.block)
        amax: dict[str, torch.Tensor] = {}

        def hook(mod, args, n):
            value = args[0].detach().abs().amax() if args[0].numel() else None
            if value is not None:
                amax[n] = torch.maximum(amax[n], value) if n in amax else value

        handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n in names]
        try:
            # every sequence cut to its real length: a hook inside the block cannot tell a padded token from a real one
            for _, h, kwargs in q.by_length(chunk):
                kwargs = to_device(kwargs, torch.float32, self.device)
                h = h.to(self.device, torch.float32)
                self._run(self.block, params, h, kwargs, [], all_experts=all_tokens, batched=False)  # hooks
        finally:
            for h in handles:
                h.remove()
        if world_size() > 1:  # the largest input on any rank: every rank writes the same activation global scales
            values = [amax[n].float() if n in amax else torch.zeros((), device=self.device) for n in names]
            amax = {n: v for n, v in zip(names, _all_reduce_flat(values, op="max")) if float(v) > 0}
        return amax

    @torch.no_grad()
    def propagate(self, q: BlockInputs, chunk: int = 8, input_scales: dict | None = None) -> torch.Tensor:
        """The block's output, with its current (written) weights and, with ``input_scales``, its quantized input
        activations, on the quantized stream: the next block's quantized-stream input (in the input dtype)."""
        params = self._float_params(self.block)
        simulate = input_scales is not None and self.config.quantize_activations and bool(self.activations)
        outs = []
        with self._simulating(self.activation_quantizers(q, input_scales) if simulate else {}):
            for h, kwargs, valid in self._chunks(q, chunk):
                y, _ = self._run(self.block, params, h, kwargs, [])
                y = y if valid is None else y.masked_fill(~valid.unsqueeze(-1), 0)  # padded positions: zeros
                outs.append(y.to(q.hidden.dtype).to(q.hidden.device))
        out = torch.cat(outs)
        check_finite(out, f"{self.name}: the quantized layer's output")
        return out

    # -- results ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Write quantize-dequantized weights and their quantization parameters into the block's modules."""
        write_parameters([item for w in self.weights for item in quantized_writes(w, f"{self.name}.{w.name}")])
