"""The weights one block tunes: per targeted Linear, or per projection of all experts of a MoE layer stacked, the
rounding offsets and clip factors (:class:`TunedWeight`) and the decisions kept at an iteration (:class:`Snapshot`),
the NVFP4 global scales fused projections share, the quantize-dequantized writes, and AutoRound's minibatch order
(:class:`CyclicBatches`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...experts import Stacked
from ...schemes import QParams, WeightQuantizer, piece_elements
from ...validation import check_finite

__all__ = ["TunedWeight", "Snapshot", "tuned_weights", "quantized_writes", "CyclicBatches", "FUSED_GROUPS",
           "CLIP_GRID"]

# weights that must share one NVFP4 global scale (vLLM fuses them), as llm-compressor's observers do
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("gate_proj", "up_proj"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("w1", "w3"),
)

_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)\.")


CLIP_GRID: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11))  # RTN-fallback clip search: 1.0 .. 0.5


@dataclass
class Snapshot:
    """A tuned weight's rounding decision, kept at an iteration: the codes it rounds to (1 byte per weight), its
    clip factors and, per expert, whether its offsets were all zero (such a weight is written as plain RTN)."""

    codes: torch.Tensor
    clip_lo: torch.Tensor
    clip_hi: torch.Tensor
    zero_offset: torch.Tensor


class TunedWeight:
    """One targeted Linear weight, or one projection of every expert of an experts container stacked into one tensor
    (``[E, out, in]``), and its rounding parameters: offsets (``[..., out, in]``, float32, grid units) and per-group
    clip factors (``[..., out, groups]``).

    A stack is tuned as one tensor: one fake quantization per iteration and one signed step for all its experts.
    Experts can be frozen (starved experts: MSE-clipped RTN); their parameters then never move (``step_mask``).
    The weight is kept in the model's dtype, a copy that is never re-read from the module (the ranks of a
    distributed run may share the module's storage); the arithmetic is float32 (exact promotion)."""

    def __init__(self, name: str, modules: torch.nn.Module | list[torch.nn.Module], quantizer: WeightQuantizer,
                 global_scale: torch.Tensor | None, expert: int | None = None,
                 experts: torch.nn.Module | None = None, projection: str | None = None,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, first_expert: int = 0,
                 state: bool = True):
        self.name = name  # relative to the block; a stack is named by its container and projection
        self.stacked = isinstance(modules, (list, tuple))
        self.modules = list(modules) if self.stacked else [modules]
        self.quantizer = quantizer
        self.global_scale = global_scale
        self.expert = expert  # a single expert's weight (not stacked)
        self.experts, self.projection = experts, projection  # a stack's container and projection name
        self.first_expert = first_expert  # a stack's first expert in its container (a part of the experts: chunks)
        with torch.no_grad():
            self.dtype = self.modules[0].weight.dtype
            if weight is None:  # given: a part of a layer's stack (a view)
                weights = [m.weight.detach() for m in self.modules]
                weight = torch.stack(weights) if self.stacked else weights[0].clone()
            self.weight = weight
        if bias is None and self.stacked and self.modules[0].bias is not None:
            bias = torch.stack([m.bias.detach().float() for m in self.modules])
        self.bias = bias
        self._gs32 = global_scale.float() if global_scale is not None else None
        self.active = torch.ones(len(self.modules) if self.stacked else (), dtype=torch.bool)
        self._step_mask: torch.Tensor | None = None
        self._trainable = state
        self._codes: torch.Tensor | None = None  # set while a snapshot is restored
        self._zero_offset: torch.Tensor | None = None
        self._frozen: torch.Tensor | None = None  # fake weight of a frozen single weight, computed once
        self.offset = self.clip_lo = self.clip_hi = None
        if state:  # a stack that only holds a layer's weights for its chunks (expert_chunk) has none
            with torch.no_grad():
                wmin, wmax = quantizer.group_minmax(self.weight.float())
            self._min32, self._max32 = wmin, wmax
            self.offset = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device,
                                      requires_grad=True)
            self.clip_lo = torch.ones_like(wmin, requires_grad=True)
            self.clip_hi = torch.ones_like(wmax, requires_grad=True)

    def part(self, start: int, end: int) -> "TunedWeight":
        """Experts ``[start, end)`` of a stack as a stack of their own, tuned on their own: its weight a view of this
        stack's (the experts tuned before are written into it, the later ones still unquantized)."""
        return TunedWeight(self.name, self.modules[start:end], self.quantizer,
                           None if self.global_scale is None else self.global_scale[start:end],
                           experts=self.experts, projection=self.projection, weight=self.weight[start:end],
                           bias=None if self.bias is None else self.bias[start:end],
                           first_expert=self.first_expert + start)

    @property
    def expert_ids(self) -> range:
        """A stack's experts (their index in the container)."""
        return range(self.first_expert, self.first_expert + len(self.modules))

    @property
    def module(self) -> torch.nn.Module:
        """The Linear of a single (not stacked) weight."""
        return self.modules[0]

    @property
    def weight32(self) -> torch.Tensor:
        """The weight in float32 (a copy for lower-precision models)."""
        return self.weight.float()

    @property
    def trainable(self) -> bool:
        """Whether any of its weights (experts) is tuned."""
        return self._trainable

    @property
    def step_mask(self) -> torch.Tensor | None:
        """``[E, 1, 1]`` (1.0 for experts being tuned) where some experts of a stack are frozen, else None."""
        return self._step_mask

    def parameters(self) -> list[torch.Tensor]:
        return [self.offset, self.clip_lo, self.clip_hi]

    def qparams(self) -> QParams:
        """The scale (with gradients to the clip factors) of the current clip factors. Its values are computed from
        the clipped ranges rounded to the model's dtype, as the written scale is (:meth:`final`): the codes the
        tuning rounds to are dequantized with the scale the checkpoint stores."""
        return self.quantizer.qparams(self._min32 * self.clip_lo, self._max32 * self.clip_hi, self._gs32,
                                      value_dtype=self.dtype)

    def fake_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fake-quantized weight (float32, or ``dtype``) with gradients to the rounding parameters; the restored
        snapshot's decision when one is restored (no gradients); a frozen single weight's computed once."""
        if self._codes is not None:
            with torch.no_grad():
                return self.quantizer.dequantize(self._codes, self.qparams(), dtype or torch.float32)
        if not self.trainable:
            if self._frozen is None:
                with torch.no_grad():
                    self._frozen = self.quantizer.fake_quant(self.weight, self.qparams(), self.offset)
            return self._frozen if dtype is None else self._frozen.to(dtype)
        return self.quantizer.fake_quant(self.weight, self.qparams(), self.offset, out_dtype=dtype)

    def as_stacked(self, quantized: bool, dtype: torch.dtype | None = None) -> Stacked:
        """A stack as the batched experts multiply it: unquantized, or fake-quantized with the current rounding
        parameters (gradients to them; the fake-quantized weights computed inside the product, never kept: the
        restored snapshot's or a frozen stack's computed once, without gradients)."""
        if not quantized:
            return Stacked(self.weight, self.bias)
        return _FakeQuantized(None, self.bias, tuned=self, compute=dtype)

    # -- snapshots --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self) -> Snapshot:
        """The current rounding decision (restored with :meth:`restore`; tuning never resumes from one)."""
        if self._codes is not None:
            return Snapshot(self._codes, self.clip_lo.detach().clone(), self.clip_hi.detach().clone(),
                            self._zero_offset)
        codes = self.quantizer.codes(self.weight, self.qparams(), self.offset)
        return Snapshot(codes, self.clip_lo.detach().clone(), self.clip_hi.detach().clone(), self._zero_offsets())

    def _zero_offsets(self) -> torch.Tensor:
        """Whether the offsets are all zero (per expert of a stack)."""
        offset = self.offset.detach()
        return ~offset.flatten(start_dim=-2).any(-1) if self.stacked else ~offset.any()

    @torch.no_grad()
    def restore(self, snap: Snapshot) -> None:
        self.resume((snap.clip_lo, snap.clip_hi))
        self._codes, self._zero_offset = snap.codes, snap.zero_offset

    @torch.no_grad()
    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip factors tuning starts from (offsets start at zero)."""
        return self.clip_lo.detach().clone(), self.clip_hi.detach().clone()

    @torch.no_grad()
    def reset(self, start: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Back to the start: offsets zero, the clip factors of :meth:`start`, no snapshot restored."""
        self.offset.zero_()
        self.resume(start)

    @torch.no_grad()
    def resume(self, clips: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Back to the live parameters after a snapshot was restored: the offsets as the last step left them and
        the clip factors ``clips`` (:meth:`start` taken then)."""
        self.clip_lo.copy_(clips[0])
        self.clip_hi.copy_(clips[1])
        self._codes = self._zero_offset = None
        self._frozen = None
        for p in self.parameters():
            p.grad = None

    def drop_offsets(self) -> None:
        """Free the offsets once a snapshot is restored for good (its codes carry the decision)."""
        if self._codes is not None:
            self.offset = torch.zeros((), device=self.weight.device).expand(self.weight.shape)

    def release(self) -> None:
        """Drop the tuning state (after the writes are written)."""
        self.offset = self.clip_lo = self.clip_hi = self.weight = None
        self._codes = self._frozen = None

    # -- starting points ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def mse_clip_fallback(self, grid: tuple[float, ...], experts: list[int] | None = None) -> None:
        """RTN with, per group, the clip factor on ``grid`` that minimises the weight reconstruction error; the
        weight (a stack: the ``experts`` listed) is no longer tuned."""
        if not self.stacked or experts is None:
            self.mse_clip(grid)
            self.active.fill_(False)
            self._trainable = False
            self._frozen = None
            return
        lo, hi = self.clip_lo.detach().clone(), self.clip_hi.detach().clone()
        offset = self.offset.detach().clone()
        self.mse_clip(grid)
        keep = torch.ones(len(self.modules), dtype=torch.bool)
        keep[list(experts)] = False
        k = keep.to(lo.device)
        self.clip_lo.copy_(torch.where(k.view(-1, 1, 1), lo, self.clip_lo))
        self.clip_hi.copy_(torch.where(k.view(-1, 1, 1), hi, self.clip_hi))
        self.offset.copy_(torch.where(k.view(-1, 1, 1), offset, self.offset))
        self.active &= keep
        self._trainable = bool(self.active.any())
        self._step_mask = self.active.to(self.offset.device, torch.float32).view(-1, 1, 1)

    @torch.no_grad()
    def mse_clip(self, grid: tuple[float, ...]) -> None:
        """Per group, the clip factor on ``grid`` that minimises the weight reconstruction error (symmetric clip),
        as the clip ranges; rounding offsets zero. A stack is searched a few experts at a time
        (:func:`~routealign.schemes.piece_elements`)."""
        per = self.weight[0].numel() if self.stacked else self.weight.numel()
        step = max(1, piece_elements(self.weight.device) // per) if self.stacked else 1
        parts = [slice(a, a + step) for a in range(0, len(self.modules), step)] if self.stacked else [slice(None)]
        for part in parts:
            gs = None if self._gs32 is None else (self._gs32[part] if self.stacked else self._gs32)
            w32 = self.weight[part].float()
            wmin, wmax = self._min32[part], self._max32[part]
            best_err, best_c = None, None
            for c in grid:
                lo = torch.full_like(wmin, c)
                qp = self.quantizer.qparams(wmin * lo, wmax * lo, gs, value_dtype=self.dtype)
                err = (self.quantizer.fake_quant(w32, qp) - w32).pow(2)
                err = err.unflatten(-1, (lo.shape[-1], -1)).sum(-1)
                if best_err is None:
                    best_err, best_c = err, lo.clone()
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_c = torch.where(better, lo, best_c)
            self.clip_lo[part] = best_c
            self.clip_hi[part] = best_c
        self.offset.zero_()

    # -- the result ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def final(self) -> tuple[torch.Tensor, QParams]:
        """Quantize-dequantized weight in the model's dtype (``[..., out, in]``) and its parameters.

        Scales are computed as llm-compressor's observers compute them (from the clipped group range, in the
        weight's dtype). Untuned weights (offset 0, clip 1; per expert in a stack) are quantized with
        compressed-tensors' own arithmetic: exactly RTN. Tuned weights keep the integers their float32 tuning
        arithmetic rounded to (the restored snapshot's codes): signed gradient descent leaves many offsets just across
        a rounding boundary, and re-deriving the integers from a scale rounded to the model's dtype (relative error
        2^-9 in bf16) would undo those decisions at random. The dequantized value ``(q - zp) * scale`` is rounded
        once to the model's dtype. The scale written is the one the codes were rounded against (:meth:`qparams`: its
        value from the clipped range in the model's dtype, exactly the observers' at clip 1).

        compressed-tensors' compressor re-quantizes the written weight with the stored scale, in the model's dtype:
        where that does not give back the integers (8 bits in bf16: ``(q * scale)`` rounded to 8 significant bits,
        then divided in bf16), the written value is moved by one unit in the last place to one that does
        (:func:`packable`). The checkpoint then holds exactly the integers tuned, or for untouched weights exactly
        the integers llm-compressor's QuantizationModifier packs (those of the original weight)."""
        w = self.weight
        wmin, wmax = self.quantizer.group_minmax(w)
        # RTN as llm-compressor's observers compute it, in the weight's dtype (untouched weights and experts)
        rtn = self.quantizer.qparams(wmin, wmax, self.global_scale)
        zero = self._zero_offset if self._codes is not None else self._zero_offsets()
        untouched = zero & (self.clip_lo == 1).flatten(start_dim=-2).all(-1) & (
            self.clip_hi == 1).flatten(start_dim=-2).all(-1)
        stored = self._stored_dtype()
        if bool(untouched.all()):
            written = self.quantizer.fake_quant(w, rtn)
            return packable(written, packed_integers(w, rtn, self.quantizer.args, stored), rtn, self.quantizer.args,
                            stored), rtn
        qp = self.qparams()
        codes = self._codes if self._codes is not None else self.quantizer.codes(w, qp, self.offset)
        tuned = self.quantizer.dequantize(codes, qp, w.dtype)
        target = None if self.quantizer.is_fp4 else codes
        if self.stacked and bool(untouched.any()):  # those experts exactly RTN
            own = QParams(rtn.scale[untouched], rtn.zero_point[untouched],
                          None if rtn.global_scale is None else rtn.global_scale[untouched])
            tuned[untouched] = self.quantizer.fake_quant(w[untouched], own)
            if target is not None:
                target = target.clone()
                target[untouched] = packed_integers(w[untouched], own, self.quantizer.args, stored)
        qp = QParams(qp.scale, qp.zero_point, rtn.global_scale)
        return packable(tuned, target, qp, self.quantizer.args, stored), qp

    def _stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores the scale in (compressed-tensors' ``weight_scale``)."""
        scale = getattr(self.modules[0], "weight_scale", None)
        return scale.dtype if scale is not None else self.dtype


def _ct_integers(x: torch.Tensor, qp: QParams, args, stored: torch.dtype) -> torch.Tensor:
    """The integers compressed-tensors' pack compressor stores for weight ``x`` (``[..., out, in]``) with scales
    ``qp`` stored in ``stored``: its ``quantize`` (in ``x``'s dtype), as the compressor calls it."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    shape = x.shape
    scale = qp.scale.to(stored)
    zp = None if args.symmetric or qp.zero_point is None else qp.zero_point
    rows = x.reshape(-1, shape[-1])
    q = quantize(x=rows, scale=scale.reshape(-1, scale.shape[-1]),
                 zero_point=None if zp is None else zp.reshape(-1, zp.shape[-1]), args=args, dtype=torch.int8)
    return q.reshape(shape)


def packed_integers(w: torch.Tensor, qp: QParams, args, stored: torch.dtype) -> torch.Tensor | None:
    """What llm-compressor's QuantizationModifier checkpoint packs for the original weight ``w`` (int schemes; None for
    FP4, whose values the NVFP4 compressor re-derives exactly)."""
    if args.type != "int":
        return None
    return _ct_integers(w, qp, args, stored)


@torch.no_grad()
def packable(written: torch.Tensor, integers: torch.Tensor | None, qp: QParams, args,
             stored: torch.dtype) -> torch.Tensor:
    """``written`` (the model's dtype) with each value that compressed-tensors would not quantize back to its
    ``integers`` moved by one unit in the last place, up or down, to one that it does; a
    :class:`~routealign.errors.CheckpointError` if neither does (the checkpoint would not hold the decision).
    ``integers`` None: nothing to check."""
    if integers is None:
        return written
    wrong = _ct_integers(written, qp, args, stored) != integers
    if not bool(wrong.any()):
        return written
    written = written.clone()
    for direction in (float("inf"), float("-inf")):
        moved = torch.nextafter(written, torch.full_like(written, direction))
        fixed = wrong & (_ct_integers(moved, qp, args, stored) == integers)
        written = torch.where(fixed, moved, written)
        wrong &= ~fixed
    if bool(wrong.any()):
        from ...errors import CheckpointError

        raise CheckpointError(f"{int(wrong.sum())} quantized values cannot be stored in {written.dtype} so that "
                              f"compressed-tensors packs their integers ({args.num_bits}-bit {args.strategy})")
    return written


@dataclass
class _FakeQuantized(Stacked):
    """A tuned stack multiplied with its fake quantization inside the product
    (:meth:`~routealign.schemes.WeightQuantizer.fake_quant_matmul`)."""

    tuned: TunedWeight | None = None
    compute: torch.dtype | None = None

    def matmul(self, tokens: torch.Tensor, offsets: torch.Tensor | None, dtype: torch.dtype,
               ends: list[int] | None = None) -> torch.Tensor:
        w = self.tuned
        if w._codes is not None or not w.trainable or not torch.is_grad_enabled():
            # no gradient to take: the fake-quantized weights for this product only
            return Stacked(w.fake_weight(self.compute), None).matmul(tokens, offsets, dtype)
        return w.quantizer.fake_quant_matmul(w.weight, w.qparams(), w.offset, tokens, offsets, dtype)

    def dense(self) -> torch.Tensor:
        return self.tuned.fake_weight(self.compute)

    @property
    def out_features(self) -> int:
        return self.tuned.weight.shape[1]


@torch.no_grad()
def quantized_writes(w: TunedWeight, where: str, store: bool = False) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """``(module, name, value)`` writes of ``w``'s quantize-dequantized weight and quantization parameters (per
    expert module for a stack), each checked finite (:class:`NonFiniteError` naming ``where``). With ``store`` the
    quantized weight replaces ``w.weight``'s values (a part of a layer's stack: the later parts are tuned against it)
    and the writes read it there."""
    weight, qp = w.final()
    # checked before anything is stored: a non-finite part leaves the stack the later parts are tuned against as it was
    for what, value in (("weight", weight), ("weight_scale", qp.scale), ("weight_global_scale", qp.global_scale)):
        if value is not None:
            check_finite(value, f"{where}: quantized {what}")
    if store:
        w.weight.copy_(weight)
        weight = w.weight
    writes = []
    for e, module in enumerate(w.modules):
        pick = (lambda t: t[e]) if w.stacked else (lambda t: t)  # noqa: E731
        writes.append((module, "weight", pick(weight)))
        for key, value in (("weight_scale", qp.scale), ("weight_zero_point", qp.zero_point),
                           ("weight_global_scale", qp.global_scale)):
            current = getattr(module, key, None)
            if value is not None and current is not None:
                writes.append((module, key, pick(value).to(current.dtype).reshape(current.shape)))
    return writes


class CyclicBatches:
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


def tuned_weights(block: torch.nn.Module, targets: dict, full_range: bool) -> list[TunedWeight]:
    """The :class:`TunedWeight` of ``block``'s targets (names relative to it, compressed-tensors weight
    ``QuantizationArgs``), in ``targets``' order. Each projection of a linearized experts container whose experts are
    all targeted with the same arguments is one stack (``[E, out, in]``; without tuning state: its experts are tuned
    as :meth:`TunedWeight.part` of it, all at once or in chunks); every other target is its own. Fused projections (:data:`FUSED_GROUPS`, siblings under one parent) share one NVFP4 global scale (per
    expert in a stack), as llm-compressor's observers and vLLM's fused kernels do."""
    from ...experts import supports_batching

    modules = dict(block.named_modules())
    stacks: dict[str, tuple[str, str, list[str]]] = {}  # member name -> (stack name, projection, members)
    for cname, container in modules.items():
        if not supports_batching(container):
            continue
        found, targeted = {}, set()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            members = [f"{cname}.{e}.{proj}" if cname else f"{e}.{proj}" for e in range(container.num_experts)]
            if any(m in targets for m in members):
                targeted.add(proj)
            if all(m in targets for m in members) and all(targets[m] == targets[members[0]] for m in members):
                found[proj] = members
        if set(found) != targeted:  # some experts' projections excluded: each weight on its own, as before
            continue
        for proj, members in found.items():
            for m in members:
                stacks[m] = (f"{cname}.{proj}" if cname else proj, proj, members)
    quantizers = {n: WeightQuantizer(args, full_range=full_range) for n, args in targets.items()}

    def stacked(name: str) -> torch.Tensor:
        members = stacks[name][2] if name in stacks else [name]
        weights = [modules[m].weight.detach() for m in members]
        return torch.stack(weights) if name in stacks else weights[0]

    scales: dict[str, torch.Tensor] = {}
    for name, quantizer in quantizers.items():
        if not quantizer.uses_global_scale or name in scales:
            continue
        parent, _, leaf = name.rpartition(".")
        if name in stacks:  # the same projection's fused siblings of every expert: stacks of their own
            container = parent.rpartition(".")[0]
            group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
            lead = [f"{container}.0.{m}" if container else f"0.{m}" for m in group]
            lead = [m for m in lead if m in stacks]
            scale = quantizer.global_scale(*[stacked(m) for m in lead])
            for m in lead:
                for member in stacks[m][2]:
                    scales[member] = scale
            continue
        group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
        members = [f"{parent}.{m}" if parent else m for m in group]
        members = [m for m in members if m in quantizers and m not in stacks]
        scale = quantizer.global_scale(*[modules[m].weight.detach() for m in members])
        for m in members:
            scales[m] = scale
    weights, done = [], set()
    for n, quantizer in quantizers.items():
        if n in stacks:
            stack_name, proj, members = stacks[n]
            if stack_name not in done:
                done.add(stack_name)
                container = modules[stack_name.rpartition(".")[0]] if "." in stack_name else block
                weights.append(TunedWeight(stack_name, [modules[m] for m in members], quantizer, scales.get(n),
                                           experts=container, projection=proj, state=False))
            continue
        match = _EXPERT_RE.search(n)
        weights.append(TunedWeight(n, modules[n], quantizer, scales.get(n), int(match.group(1)) if match else None))
    return weights
