"""The weights one block tunes: per targeted Linear its rounding offsets and clip factors
(:class:`TunedWeight`), the NVFP4 global scales fused projections share, the quantize-dequantized writes, and
AutoRound's minibatch order (:class:`CyclicBatches`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ...schemes import QParams, WeightQuantizer
from ...validation import check_finite

__all__ = ["TunedWeight", "tuned_weights", "quantized_writes", "CyclicBatches", "FUSED_GROUPS", "CLIP_GRID"]

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
    """A :class:`TunedWeight` per target of ``block`` (names relative to it, compressed-tensors weight
    ``QuantizationArgs``), in ``targets``' order; fused projections (:data:`FUSED_GROUPS`, siblings under one
    parent) share one NVFP4 global scale, as llm-compressor's observers and vLLM's fused kernels do."""
    modules = dict(block.named_modules())
    quantizers = {n: WeightQuantizer(args, full_range=full_range) for n, args in targets.items()}
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
    weights = []
    for n, quantizer in quantizers.items():
        match = _EXPERT_RE.search(n)
        weights.append(TunedWeight(n, modules[n], quantizer, scales.get(n), int(match.group(1)) if match else None))
    return weights
