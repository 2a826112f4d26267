"""Straight-through fake quantization of weights, on compressed-tensors' own arithmetic.

Learned rounding needs gradients through quantization; compressed-tensors' ``fake_quantize`` has none. This module
computes the *same values* as compressed-tensors (bit for bit, tested) while letting gradients through:

- rounding (to the int grid, or to FP4 e2m1 values) is a custom autograd function whose forward is
  compressed-tensors' ``round_to_quantized_type_args`` and whose backward is the identity inside the clamp range;
- scales and zero-points take their *values* from compressed-tensors' ``calculate_qparams`` (so FP8 rounding of
  NVFP4 group scales, eps replacement and zero-point rounding are exactly theirs) and their *gradients* from the
  continuous min/max formula they round.

Weights may be 2-D ``[out, in]`` or stacked experts ``[E, out, in]``; groups run along the last dimension. NVFP4's
per-tensor global scale follows llm-compressor's observers (``generate_gparam`` of the absolute maximum over a fused
group: q/k/v, or one expert's gate/up); for stacked experts it is computed per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA, FP8_E4M3_DATA, round_to_quantized_type_args
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

from .accelerator import piece_elements

__all__ = ["ActivationQuantizer", "WeightQuantizer", "QParams", "nvfp4_global_scale", "input_global_scale",
           "piece_elements", "row_pieces"]


@dataclass
class QParams:
    """Quantization parameters of one weight: ``scale`` and ``zero_point`` are ``[..., out, groups]``;
    ``global_scale`` is ``[1]`` (2-D weight), ``[E, 1, 1]`` (stacked experts) or ``None``."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    global_scale: torch.Tensor | None = None


class _RoundSTE(torch.autograd.Function):
    """compressed-tensors' clamp-and-round in the forward, identity gradient inside the range."""

    @staticmethod
    def forward(ctx, x, args, q_min, q_max):
        ctx.save_for_backward((x >= q_min) & (x <= q_max))
        return round_to_quantized_type_args(tensor=x, args=args, min=q_min, max=q_max)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def row_pieces(rows: int, size: int, device: torch.device) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``rows`` rows of ``size`` elements, a :func:`piece_elements` piece each."""
    step = max(1, piece_elements(device) // max(size, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _rounded(x, scale, zp, offset, args, q_min, q_max):
    """``(x / scale + zp + offset`` before rounding, its rounded value ``round(clamp(.))``) of weight rows (``offset``
    None: none added)."""
    scaled = x / scale
    if zp is not None:
        scaled = scaled + zp.to(scaled.dtype)
    if offset is not None:
        scaled = scaled + offset.to(scaled.dtype)
    return scaled, round_to_quantized_type_args(tensor=scaled, args=args, min=q_min, max=q_max)


def _centred(q, zp, dtype):
    """Rounded values ``q`` less the zero-point, in ``dtype`` (what the scale multiplies)."""
    dq = q.to(dtype)
    return dq if zp is None else dq - zp.to(dtype)


def _fake_rows(x, scale, zp, offset, args, q_min, q_max, out: torch.Tensor) -> torch.Tensor:
    """The learned-rounding fake quantization of weight rows ``x`` written into ``out`` (its dtype), in chunks."""
    for a, b in row_pieces(*x.shape, x.device):
        z = None if zp is None else zp[a:b]
        _, q = _rounded(x[a:b], scale[a:b], z, offset[a:b], args, q_min, q_max)
        out[a:b] = _centred(q, z, scale.dtype) * scale[a:b]
    return out


def _fake_rows_backward(grad, x, scale, zp, offset, args, q_min, q_max, need_scale: bool):
    """Gradients of :func:`_fake_rows` for the incoming float32 ``grad`` ``[R, g]`` (overwritten: it becomes the
    offset's gradient) and, with ``need_scale``, the scale's ``[R, 1]``; the rounding recomputed in chunks."""
    grad_scale = torch.empty_like(scale) if need_scale else None
    for a, b in row_pieces(*x.shape, x.device):
        s, z = scale[a:b], None if zp is None else zp[a:b]
        scaled, q = _rounded(x[a:b], s, z, offset[a:b], args, q_min, q_max)
        dq = _centred(q, z, scale.dtype)
        del q
        g = grad[a:b]
        if need_scale:
            from_product = (g * dq).sum(-1, keepdim=True)
        inside = (scaled >= q_min) & (scaled <= q_max)
        del scaled, dq
        g.mul_(s).mul_(inside)  # the gradient reaching the rounded value, then the offset
        if need_scale:
            from_division = (-g * ((x[a:b] / s) / s)).sum(-1, keepdim=True)
            grad_scale[a:b] = from_product + from_division
    return grad, grad_scale


class _OffsetFakeQuant(torch.autograd.Function):
    """Learned-rounding fake quantization of weight rows ``x`` ``[R, g]`` (one quantization group per row) with
    per-row ``scale`` ``[R, 1]`` (already divided by any global scale), integer ``zp`` ``[R, 1]`` or None and
    rounding ``offset`` ``[R, g]``:

        out = (round(clamp(x / scale + zp + offset)) - zp) * scale

    with a straight-through rounding (gradient 1 inside the clamp range, 0 outside). The values and gradients are
    those of that expression written as separate autograd operations (the division's gradient to ``scale``
    ``-grad * ((x / scale) / scale)``, the product's ``grad * dq``), computed in the same order, so they are equal bit
    for bit. Nothing of ``x``'s size is saved for the backward: it recomputes the rounding in chunks of rows
    (:func:`piece_elements`), and the offset's gradient is formed in the incoming gradient's buffer."""

    @staticmethod
    def forward(ctx, x, scale, zp, offset, args, q_min, q_max, out_dtype):
        ctx.save_for_backward(x, scale, offset, zp)
        ctx.args, ctx.q_min, ctx.q_max = args, q_min, q_max
        return _fake_rows(x, scale, zp, offset, args, q_min, q_max,
                          torch.empty(x.shape, dtype=out_dtype, device=x.device))

    @staticmethod
    def backward(ctx, grad):
        x, scale, offset, zp = ctx.saved_tensors
        # float32, contiguous (an expanded gradient gets storage of its own): the offset's gradient is formed in it
        grad = grad.to(torch.float32).contiguous()
        grad, grad_scale = _fake_rows_backward(grad, x, scale, zp, offset, ctx.args, ctx.q_min, ctx.q_max,
                                               ctx.needs_input_grad[1])
        return None, grad_scale, None, grad if ctx.needs_input_grad[3] else None, None, None, None, None


class _FakeQuantMatmul(torch.autograd.Function):
    """``tokens`` times every expert's learned-rounding fake-quantized weight, in one node: the fake quantization
    of :class:`_OffsetFakeQuant` (weight rows ``x`` of the stack ``shape`` ``[E, out, in]``) followed by the grouped
    GEMM over expert-sorted tokens ``[T, in]`` with jagged ``offsets`` (torch's ``_grouped_mm``), or with ``offsets``
    None the batched matmul over tokens padded per expert ``[E, C, in]``, in ``dtype``.

    The fake-quantized stack exists only inside the forward and again, recomputed, inside the backward: nothing of
    the weight's size is kept between them (a separate fake-quantization node would have the matmul keep it). The
    gradients are the ones torch's autograd gives the two operations (the same grouped GEMM calls), then
    :func:`_fake_rows_backward` in the weight gradient's buffer."""

    @staticmethod
    def forward(ctx, tokens, offsets, x, scale, zp, offset, args, q_min, q_max, shape, dtype):
        fw = _fake_rows(x, scale, zp, offset, args, q_min, q_max,
                        torch.empty(x.shape, dtype=dtype, device=x.device)).view(shape)
        ctx.save_for_backward(tokens, offsets, x, scale, zp, offset)
        ctx.args, ctx.q_min, ctx.q_max, ctx.shape, ctx.dtype = args, q_min, q_max, shape, dtype
        inp = tokens.to(dtype)
        if offsets is None:
            return torch.bmm(inp, fw.transpose(1, 2))
        return torch._grouped_mm(inp, fw.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad):
        tokens, offsets, x, scale, zp, offset = ctx.saved_tensors
        args, q_min, q_max, dtype = ctx.args, ctx.q_min, ctx.q_max, ctx.dtype
        grad = grad.to(dtype).contiguous()
        inp = tokens.to(dtype)
        grad_tokens = None
        if ctx.needs_input_grad[0]:
            fw = _fake_rows(x, scale, zp, offset, args, q_min, q_max,
                            torch.empty(x.shape, dtype=dtype, device=x.device)).view(ctx.shape)
            grad_tokens = (torch.bmm(grad, fw) if offsets is None
                           else torch._grouped_mm(grad, fw, offs=offsets)).to(tokens.dtype)
            del fw
        if offsets is None:
            grad_weight = torch.bmm(grad.transpose(1, 2), inp)
        else:
            grad_weight = torch._grouped_mm(grad.transpose(0, 1), inp, offs=offsets)
        grad_weight = grad_weight.reshape(x.shape).to(torch.float32).contiguous()
        grad_offset, grad_scale = _fake_rows_backward(grad_weight, x, scale, zp, offset, args, q_min, q_max,
                                                      ctx.needs_input_grad[3])
        return (grad_tokens, None, None, grad_scale, None, grad_offset if ctx.needs_input_grad[5] else None,
                None, None, None, None, None)


def _as_values(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` without gradient, rounded to ``dtype`` (None: as it is)."""
    t = t.detach()
    return t if dtype is None or dtype == t.dtype else t.to(dtype)


def _value_with_grad(exact: torch.Tensor, continuous: torch.Tensor) -> torch.Tensor:
    """``exact``'s value with ``continuous``'s gradient (exact when no gradient is taken)."""
    if not continuous.requires_grad:
        return exact
    return _Substitute.apply(continuous, exact)


class _Substitute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, continuous, exact):
        return exact.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def nvfp4_global_scale(absmax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` applied elementwise to absolute maxima: computed in the maxima's
    dtype (bf16 weights give a bf16-rounded scale, as llm-compressor's observers do), returned as float32."""
    absmax = absmax.clamp(min=torch.finfo(absmax.dtype).tiny)
    scale = FP8_E4M3_DATA.max * FP4_E2M1_DATA.max / absmax
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32)


def input_global_scale(absmax: torch.Tensor | float, where: str) -> torch.Tensor:
    """An NVFP4 ``input_global_scale`` (float32 ``[1]``) from the largest absolute input a module sees, with
    compressed-tensors' ``generate_gparam`` (what llm-compressor's observers write). ``generate_gparam`` turns a NaN
    maximum into the scale 1.0 and an infinite one into 0.0, both finite: a non-finite ``absmax`` is refused here,
    with an error naming ``where``, and so is a non-finite result. (An all-zero input gets compressed-tensors' 1.0: any scale
    represents zeros exactly.)"""
    from compressed_tensors.quantization.utils import generate_gparam

    from .validation import check_finite

    value = torch.as_tensor(absmax, dtype=torch.float32).reshape(1)
    check_finite(value, f"{where}: largest input (for the input global scale)")
    scale = generate_gparam(-value, value)
    check_finite(scale, f"{where}: input global scale")
    return scale


class WeightQuantizer:
    """Fake quantization of weights for one compressed-tensors weight ``QuantizationArgs``.

    Supported: int (2..8 bits) group or channel, symmetric or asymmetric (W4A16, W4A16_ASYM, W3A16, W2A16, W8A16);
    FP4 tensor-group (NVFP4, NVFP4A16).
    """

    def __init__(self, args: QuantizationArgs, full_range: bool = False):
        strategy = args.strategy
        if strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP,
                            QuantizationStrategy.CHANNEL):
            raise ValueError(f"weight strategy '{QuantizationStrategy(strategy).value}' is not supported by learned rounding "
                             "(supported: group, tensor_group, channel)")
        if args.type == QuantizationType.FLOAT and args.num_bits != 4:
            raise ValueError(f"float weights of {args.num_bits} bits are not supported (FP4 only)")
        self.args = args
        # full-range symmetric int grid (AutoRound's default, NNCF's signed scale): only symmetric int applies
        self.full_range = bool(full_range and args.symmetric and args.type == QuantizationType.INT)

    @property
    def is_fp4(self) -> bool:
        return self.args.type == QuantizationType.FLOAT and self.args.num_bits == 4

    @property
    def uses_global_scale(self) -> bool:
        return self.args.strategy == QuantizationStrategy.TENSOR_GROUP

    def group_size(self, in_features: int) -> int:
        if self.args.strategy == QuantizationStrategy.CHANNEL:
            return in_features
        size = int(self.args.group_size)
        if in_features % size:
            raise ValueError(f"group_size {size} does not divide the input dimension {in_features}")
        return size

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        size = self.group_size(w.shape[-1])
        return w.unflatten(-1, (w.shape[-1] // size, size))

    def group_minmax(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group minimum and maximum, ``[..., out, groups]``."""
        g = self._grouped(w)
        return g.amin(-1), g.amax(-1)

    def global_scale(self, *weights: torch.Tensor) -> torch.Tensor | None:
        """Shared NVFP4 global scale of a fused group of weights (``None`` for other schemes): ``[1]`` for 2-D
        weights, ``[E, 1, 1]`` per expert for stacked ``[E, out, in]`` weights."""
        if not self.uses_global_scale:
            return None
        dims = (-1, -2)
        absmax = torch.stack([w.detach().abs().amax(dim=dims) for w in weights]).amax(0)
        scale = nvfp4_global_scale(absmax)
        return scale.reshape(1) if weights[0].ndim == 2 else scale.reshape(-1, 1, 1)

    def qparams(self, wmin: torch.Tensor, wmax: torch.Tensor, global_scale: torch.Tensor | None = None,
                value_dtype: torch.dtype | None = None) -> QParams:
        """Scale and zero-point from (possibly clipped) group minima and maxima. Values are compressed-tensors'
        ``calculate_qparams`` (or, with ``full_range``, :meth:`full_range_qparams`); gradients flow to
        ``wmin``/``wmax`` through the continuous formula.

        ``value_dtype``: the values are computed from the minima and maxima rounded to it (the model's dtype: what
        llm-compressor's observers compute and what the checkpoint stores), returned in ``wmin``'s dtype. The
        tuning of a bf16 model then rounds to, and its written codes are dequantized with, one and the same scale
        (computed once in float32 and once in bf16, a full-range scale's sign flipped where the group's two ends
        were within bf16's precision: the whole group written negated)."""
        if self.full_range:
            return self.full_range_qparams(wmin, wmax, value_dtype)
        with torch.no_grad():
            vmin, vmax = _as_values(wmin, value_dtype), _as_values(wmax, value_dtype)
            # a per-expert global scale [E, 1, 1] broadcasts against [E, out, groups]
            scale, zero_point = calculate_qparams(vmin, vmax, self.args, global_scale)
            if vmin.dtype != wmin.dtype:
                scale = scale.to(wmin.dtype)
        if not (wmin.requires_grad or wmax.requires_grad):
            return QParams(scale, zero_point, global_scale)
        q_min, q_max = calculate_range(self.args, wmin.device)
        lo = torch.minimum(wmin, torch.zeros_like(wmin))
        hi = torch.maximum(wmax, torch.zeros_like(wmax))
        if self.args.symmetric:
            cont_scale = torch.maximum(lo.abs(), hi.abs()) / ((q_max - q_min).to(hi.dtype) / 2)
            cont_zp = None
        else:
            cont_scale = (hi - lo) / (q_max - q_min).to(hi.dtype)
            cont_zp = q_min - lo / cont_scale.clamp_min(torch.finfo(cont_scale.dtype).tiny)
        if global_scale is not None:
            cont_scale = global_scale * cont_scale
        scale = _value_with_grad(scale, cont_scale.to(scale.dtype))
        if cont_zp is not None:
            zero_point = _value_with_grad(zero_point, cont_zp.to(zero_point.dtype)) if zero_point.is_floating_point() \
                else zero_point
        return QParams(scale, zero_point, global_scale)

    def full_range_qparams(self, wmin: torch.Tensor, wmax: torch.Tensor,
                           value_dtype: torch.dtype | None = None) -> QParams:
        """Full-range symmetric int parameters: the scale is ``m / 2^(b-1)`` with ``m`` the group's largest
        magnitude, signed so that the extreme of that magnitude lands on the grid's end ``-2^(b-1)`` exactly
        (negative when the positive side dominates). compressed-tensors' symmetric grid divides ``m`` by
        ``(2^b - 1) / 2`` and leaves its ``-2^(b-1)`` level to the negative side alone; the full-range grid uses all
        ``2^b`` levels on the dominant side: a step 1/8 finer at 3 bits, 1/16 at 4 (AutoRound's ``int_sym``). The
        zero-point stays 0, so the checkpoint is an ordinary symmetric pack-quantized one: ``(q - 0) * scale``.
        ``value_dtype``: as :meth:`qparams` (the sign, too, is decided on the values in that dtype)."""
        lo = torch.minimum(wmin, torch.zeros_like(wmin))
        hi = torch.maximum(wmax, torch.zeros_like(wmax))
        levels = float(2 ** (int(self.args.num_bits) - 1))
        with torch.no_grad():
            vlo, vhi = _as_values(lo, value_dtype), _as_values(hi, value_dtype)
            vsign = torch.where(vlo.abs() >= vhi, 1.0, -1.0).to(vhi.dtype)
            value = vsign * torch.maximum(vlo.abs(), vhi.abs()) / levels
            # a zero group (all weights 0) gets the dtype's eps, as compressed-tensors replaces zero scales
            exact = torch.where(value == 0, torch.finfo(value.dtype).eps, value).to(hi.dtype)
            sign = vsign.to(hi.dtype)
        cont = sign * torch.maximum(lo.abs(), hi.abs()) / levels
        scale = _value_with_grad(exact, cont)
        zero_point = torch.zeros(scale.shape, device=scale.device, dtype=torch.int8)
        return QParams(scale, zero_point, None)

    def rtn_qparams(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> QParams:
        """Round-to-nearest parameters (llm-compressor's memoryless min/max observer)."""
        if global_scale is None:
            global_scale = self.global_scale(w)
        return self.qparams(*self.group_minmax(w.detach()), global_scale)

    def fake_quant(self, w: torch.Tensor, qp: QParams, offset: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Quantize-dequantize ``w`` (with an optional rounding ``offset`` added before rounding, in grid units).

        With ``offset=None`` the value equals compressed-tensors' ``fake_quantize(w, scale, zero_point, args,
        global_scale)`` bit for bit; gradients reach ``w`` and ``qp``'s scale/zero-point.

        With an ``offset`` (learned rounding) the result is float32 (``out_dtype``: cast to it at the end) and
        gradients reach ``offset`` and the scale (straight-through rounding) but not ``w``: one autograd node
        (:class:`_OffsetFakeQuant`) that keeps no tensor of ``w``'s size for the backward (it recomputes what it
        needs, in row chunks) and computes the same values and gradients, bit for bit, as the composition of
        elementwise operations it replaces. ``w`` may be in a lower precision than float32 (the division promotes
        it exactly)."""
        scale, zp = self._effective(qp)
        if offset is not None:
            return self._offset_fake_quant(w, scale, zp, offset, out_dtype)
        q_min, q_max = calculate_range(self.args, w.device)
        x = self._grouped(w)
        scaled = x / scale
        if zp is not None:
            scaled = scaled + zp.to(x.dtype)
        q = _RoundSTE.apply(scaled, self.args, q_min, q_max)
        dq = q.to(scale.dtype)
        if zp is not None:
            dq = dq - zp.to(scale.dtype)
        return (dq * scale).flatten(start_dim=-2).to(w.dtype)

    def _rows(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None):
        """``w`` as rows of one quantization group ``[R, g]`` with the per-row scale and zero-point ``[R, 1]``."""
        size = self.group_size(w.shape[-1])
        rows = w.numel() // size
        shape = (*w.shape[:-1], w.shape[-1] // size, 1)
        return (w.reshape(rows, size), scale.expand(*shape).reshape(rows, 1),
                None if zp is None else zp.expand(*shape).reshape(rows, 1))

    def _effective(self, qp: QParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scale under any global scale, and the zero-point, ``[..., groups, 1]``."""
        scale = qp.scale.unsqueeze(-1)
        zp = qp.zero_point.unsqueeze(-1) if qp.zero_point is not None else None
        if qp.global_scale is not None:
            gs = qp.global_scale if qp.global_scale.ndim <= 1 else qp.global_scale.unsqueeze(-1)
            scale = scale / gs
        return scale, zp

    def _learning_rows(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None):
        """``(q_min, q_max, rows, scale, zp)`` of :meth:`_rows` for learned rounding (integer zero-points only)."""
        if zp is not None and zp.is_floating_point() and zp.requires_grad:
            raise ValueError("learned rounding needs integer zero-points (no gradient to the zero-point)")
        return (*calculate_range(self.args, w.device), *self._rows(w, scale, zp))

    def _offset_fake_quant(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                           offset: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
        q_min, q_max, x, scale, zp = self._learning_rows(w, scale, zp)
        out = _OffsetFakeQuant.apply(x, scale, zp, offset.reshape(x.shape), self.args, q_min, q_max,
                                     out_dtype or torch.float32)
        return out.reshape(w.shape)

    def fake_quant_matmul(self, w: torch.Tensor, qp: QParams, offset: torch.Tensor, tokens: torch.Tensor,
                          offsets: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """``tokens`` times the stacked weights ``w`` ``[E, out, in]`` fake-quantized with ``offset`` (what
        :meth:`fake_quant` gives) in one autograd node that keeps no tensor of the weight's size
        (:class:`_FakeQuantMatmul`): a grouped GEMM over expert-sorted ``tokens`` ``[T, in]`` with jagged
        ``offsets``, or with ``offsets`` None a batched matmul over padded ``tokens`` ``[E, C, in]``, in ``dtype``."""
        q_min, q_max, x, scale, zp = self._learning_rows(w, *self._effective(qp))
        return _FakeQuantMatmul.apply(tokens, offsets, x, scale, zp, offset.reshape(x.shape), self.args, q_min,
                                      q_max, tuple(w.shape), dtype)

    @torch.no_grad()
    def codes(self, w: torch.Tensor, qp: QParams, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The integers (int) or FP4 values (NVFP4, as ``int8`` of twice the value) that :meth:`fake_quant` rounds
        ``w`` to: 1 byte per weight, exact, for keeping a rounding decision (:meth:`dequantize`)."""
        q_min, q_max = calculate_range(self.args, w.device)
        x, scale, zp = self._rows(w, *self._effective(qp))
        off = None if offset is None else offset.reshape(x.shape)
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        for a, b in row_pieces(*x.shape, x.device):
            _, q = _rounded(x[a:b], scale[a:b], None if zp is None else zp[a:b], None if off is None else off[a:b],
                            self.args, q_min, q_max)
            out[a:b] = q * 2 if self.is_fp4 else q
        return out.reshape(w.shape)

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in float32 (NVFP4: under the global scale), cast to ``dtype``: exactly
        what :meth:`fake_quant` returns for the weight and offset the codes were taken from."""
        c, scale, zp = self._rows(codes, *self._effective(qp))
        out = torch.empty(c.shape, dtype=dtype, device=c.device)
        for a, b in row_pieces(*c.shape, c.device):
            q = c[a:b].to(scale.dtype)
            out[a:b] = _centred(q / 2 if self.is_fp4 else q, None if zp is None else zp[a:b], scale.dtype) * scale[a:b]
        return out.reshape(codes.shape)


class ActivationQuantizer:
    """Dynamic (per token group) fake quantization of activations, e.g. NVFP4's FP4 inputs with FP8 group-16 scales
    under a static per-tensor ``global_scale``: compressed-tensors' own ``compute_dynamic_scales_and_zp`` and
    ``fake_quantize`` (what the quantized model computes at evaluation), with a straight-through gradient."""

    def __init__(self, args: QuantizationArgs, global_scale: torch.Tensor | None):
        if args.dynamic not in (True, "local") and getattr(args.dynamic, "value", None) != "local":
            raise ValueError("only dynamic activation quantization is simulated during tuning")
        self.args = args
        self.global_scale = global_scale

    def __call__(self, x: torch.Tensor, row_global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` fake-quantized (straight-through gradient). ``row_global_scale`` replaces the per-tensor global
        scale by one per row, a tensor broadcastable to ``x.shape[:-1]``: the tokens of several experts stacked
        (``[tokens]``) or padded (``[experts, 1]``), each under its expert's scale, in one call; every row gets
        exactly what its expert's own quantizer gives it (the group scales are per row)."""
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

        if x.numel() == 0:
            return x
        with torch.no_grad():
            if row_global_scale is not None:
                rows = row_global_scale.to(x.device)
                # [..., groups] group scales, [..., groups, 1] inside compressed-tensors' grouped fake quantization
                gs_scale, gs_quant = rows.unsqueeze(-1), rows.unsqueeze(-1).unsqueeze(-1)
            else:
                gs_scale = gs_quant = None if self.global_scale is None else self.global_scale.to(x.device)
            scale, zero_point = compute_dynamic_scales_and_zp(x.detach(), self.args, None, global_scale=gs_scale)
            q = fake_quantize(x.detach(), scale, zero_point, self.args, global_scale=gs_quant)
        return x + (q - x.detach())
