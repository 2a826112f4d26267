"""Straight-through fake quantization equals compressed-tensors bit for bit, and passes gradients."""

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import generate_gparam

from routealign.schemes import WeightQuantizer

SCHEMES = ["W4A16", "W4A16_ASYM", "W3A16", "W2A16", "W8A16", "NVFP4", "NVFP4A16"]


def _args(name):
    return preset_name_to_scheme(name, ["Linear"]).weights


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[..., 3] = 0.9  # an outlier column, so groups differ in range
    w[..., 200:216] = 0.0  # an all-zero group (eps scale path)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SCHEMES)
def test_fake_quant_matches_compressed_tensors(name, dtype):
    quant = WeightQuantizer(_args(name))
    w = _weight((64, 256), dtype)
    qp = quant.rtn_qparams(w)
    ours = quant.fake_quant(w, qp)
    theirs = fake_quantize(w, qp.scale, qp.zero_point, quant.args, global_scale=qp.global_scale)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    # quantize-dequantize is idempotent with the same parameters (what a saved checkpoint relies on); in bf16 this
    # holds up to 4 bits (an 8-bit integer times a bf16 scale is not always representable in bf16)
    if quant.args.num_bits <= 4 or dtype == torch.float32:
        assert torch.equal(quant.fake_quant(ours, qp), ours)


@pytest.mark.parametrize("name", ["NVFP4", "W4A16_ASYM"])
def test_stacked_experts_equal_per_expert(name):
    quant = WeightQuantizer(_args(name))
    w = torch.stack([_weight((32, 256), torch.bfloat16, seed=s) * (s + 1) for s in range(3)])
    qp = quant.rtn_qparams(w)
    stacked = quant.fake_quant(w, qp)
    for e in range(3):
        single = quant.rtn_qparams(w[e])
        assert torch.equal(qp.scale[e], single.scale)
        assert torch.equal(stacked[e], quant.fake_quant(w[e], single))
        if single.global_scale is not None:
            assert torch.equal(qp.global_scale[e].reshape(1), single.global_scale)


def test_nvfp4_global_scale_is_llmcompressor_fused_rule():
    quant = WeightQuantizer(_args("NVFP4"))
    gate, up = _weight((32, 64), torch.float32, 1), _weight((32, 64), torch.float32, 2) * 3
    absmax = torch.maximum(gate.abs().max(), up.abs().max())
    expected = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
    assert torch.equal(quant.global_scale(gate, up), expected)
    assert WeightQuantizer(_args("W4A16")).global_scale(gate) is None


def test_gradients_reach_offset_and_clip():
    quant = WeightQuantizer(_args("W4A16_ASYM"))
    w = _weight((16, 128), torch.float32)
    wmin, wmax = quant.group_minmax(w)
    clip_lo = torch.ones_like(wmin, requires_grad=True)
    clip_hi = torch.ones_like(wmax, requires_grad=True)
    offset = torch.zeros_like(w, requires_grad=True)
    qp = quant.qparams(wmin * clip_lo, wmax * clip_hi)
    out = quant.fake_quant(w, qp, offset)
    # values at clip=1, offset=0 are exactly RTN
    assert torch.equal(out, quant.fake_quant(w, quant.rtn_qparams(w)))
    (out * torch.randn_like(out)).sum().backward()
    assert offset.grad.abs().sum() > 0 and clip_lo.grad.abs().sum() > 0 and clip_hi.grad.abs().sum() > 0


def test_offset_moves_rounding_by_one_step():
    quant = WeightQuantizer(_args("W4A16"))
    w = _weight((8, 128), torch.float32)
    qp = quant.rtn_qparams(w)
    base = quant.fake_quant(w, qp)
    step = qp.scale.repeat_interleave(128, dim=-1)
    up = quant.fake_quant(w, qp, offset=torch.full_like(w, 1.0))
    inside = (base + step) <= 7 * step  # not clamped at the top of the int4 range
    torch.testing.assert_close(up[inside], (base + step)[inside])


def test_unsupported_and_bad_group():
    with pytest.raises(ValueError, match="weight strategy 'block' is not supported"):
        WeightQuantizer(preset_name_to_scheme("FP8_BLOCK", ["Linear"]).weights)
    with pytest.raises(ValueError, match="group_size 128 does not divide the input dimension 96"):
        WeightQuantizer(_args("W4A16")).rtn_qparams(torch.randn(4, 96))


def test_matches_llmcompressor_rtn_in_a_quantized_model(tmp_path):
    """The scales llm-compressor's QuantizationModifier stores are the ones rtn_qparams computes, and the layer's
    fake-quantized weight is ours."""
    from routealign.tiny import save_tiny

    from .conftest import calibration_ids, quantize_with_llmcompressor

    save_tiny("qwen3_moe", tmp_path / "ref", seed=4)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref"), dtype=torch.float32)
    quantize_with_llmcompressor(tmp_path / "ref", tmp_path / "q", "NVFP4", calibration_ids(rows=2, seq_len=32))
    from routealign.checkpoint import load_model

    reloaded = load_model(tmp_path / "q", dtype=torch.float32)
    quant = WeightQuantizer(_args("NVFP4"))
    layer = original.model.layers[0]
    experts = layer.mlp.experts  # fused [E, 2I, H] in the unquantized model
    inter = experts.gate_up_proj.shape[1] // 2
    for e in (0, 5):
        gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
        gs = quant.global_scale(gate, up)
        for name, w in (("gate_proj", gate), ("up_proj", up)):
            mod = reloaded.model.layers[0].mlp.experts[e].__getattr__(name)
            assert torch.equal(mod.weight_global_scale, gs)
            assert torch.equal(mod.weight, quant.fake_quant(w, quant.rtn_qparams(w, gs)))


def test_activation_quantizer_is_compressed_tensors_dynamic_nvfp4_with_identity_gradient():
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.utils import generate_gparam

    from routealign.schemes import ActivationQuantizer

    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    gs = generate_gparam(-x.abs().amax().reshape(1), x.abs().amax().reshape(1))
    module = torch.nn.Linear(64, 8)
    module.input_global_scale = torch.nn.Parameter(gs, requires_grad=False)
    from compressed_tensors.quantization import QuantizationStatus

    module.quantization_status = QuantizationStatus.FROZEN
    expected = forward_quantize(module, x, "input", args)
    xg = x.clone().requires_grad_(True)
    got = ActivationQuantizer(args, gs)(xg)
    assert torch.equal(got.detach(), expected) and not torch.equal(expected, x)
    got.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["W4A16", "W3A16", "W2A16"])
def test_full_range_grid(name, dtype):
    """AutoRound's full-range symmetric grid: |scale| = group max magnitude / 2^(b-1), signed so that the dominant
    extreme lands on -2^(b-1) exactly; compressed-tensors dequantizes the saved (scale, zero-point) to the same
    values, and the weight error is below compressed-tensors' own grid's."""
    args = _args(name)
    quant = WeightQuantizer(args, full_range=True)
    w = _weight((64, 256), dtype)
    w[:32, 0] = -1.3  # groups whose negative side dominates, beside the positive outlier column 3
    qp = quant.rtn_qparams(w)
    levels = 2 ** (args.num_bits - 1)
    groups = w.float().unflatten(-1, (2, 128))
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    magnitude = torch.maximum(lo.abs(), hi)
    expected = torch.where(lo.abs() >= hi, magnitude, -magnitude) / levels
    expected = torch.where(expected == 0, torch.finfo(dtype).eps, expected)
    assert torch.equal(qp.scale.float(), expected.to(dtype).float())
    assert bool((qp.scale < 0).any()) and bool((qp.scale > 0).any())
    assert qp.zero_point.dtype == torch.int8 and not bool(qp.zero_point.any())
    ours = quant.fake_quant(w, qp)
    theirs = fake_quantize(w, qp.scale, qp.zero_point, args)
    assert torch.equal(ours, theirs)
    assert torch.equal(quant.fake_quant(ours, qp), ours)
    # the dominant extreme of every group is reconstructed exactly
    dq = ours.float().unflatten(-1, (2, 128))
    extreme = torch.where(lo.abs() >= hi, lo, hi)
    hit = (dq == extreme.unsqueeze(-1)).any(-1)
    assert bool(hit[magnitude > 0].all())
    restricted = WeightQuantizer(args)
    err_full = (ours.float() - w.float()).pow(2).mean()
    err_ct = (restricted.fake_quant(w, restricted.rtn_qparams(w)).float() - w.float()).pow(2).mean()
    assert err_full < err_ct


@pytest.mark.parametrize("name", ["W4A16_ASYM", "NVFP4", "NVFP4A16"])
def test_full_range_leaves_other_schemes_alone(name):
    w = _weight((64, 256), torch.float32)
    plain, full = WeightQuantizer(_args(name)), WeightQuantizer(_args(name), full_range=True)
    assert not full.full_range
    a, b = plain.rtn_qparams(w), full.rtn_qparams(w)
    assert torch.equal(a.scale, b.scale) and torch.equal(plain.fake_quant(w, a), full.fake_quant(w, b))


def test_full_range_clip_gradients_reach_the_clip_factors():
    quant = WeightQuantizer(_args("W3A16"), full_range=True)
    w = _weight((16, 256), torch.float32)
    wmin, wmax = quant.group_minmax(w)
    c_lo = torch.ones_like(wmin, requires_grad=True)
    c_hi = torch.ones_like(wmax, requires_grad=True)
    qp = quant.qparams(wmin * c_lo, wmax * c_hi)
    (quant.fake_quant(w, qp) - w).pow(2).sum().backward()
    # each group's scale depends on the dominant side only: that side's factor gets the gradient
    dominant_hi = wmax > wmin.abs()
    assert bool((c_hi.grad[dominant_hi] != 0).any()) and bool((c_lo.grad[~dominant_hi & (wmin < 0)] != 0).any())
    assert bool((c_hi.grad[~dominant_hi] == 0).all())
