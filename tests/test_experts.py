"""Issue 5.2: the batched experts forward equals llm-compressor's per-expert loop (values and gradients)."""

import contextlib

import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe

from routealign.experts import batched_experts, batched_forward, supports_batching
from routealign.routing import find_moe_layers
from routealign.tiny import tiny_model
from routealign.streams import plain_forwards


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "nemotron_h", "deepseek_v3"])
def test_batched_experts_match_the_loop(model_type, padded, monkeypatch):
    import routealign.accelerator

    monkeypatch.setattr(routealign.accelerator, "LAYOUT", "padded" if padded else "grouped")
    model = tiny_model(model_type, seed=4)
    linearize_moe(model)
    layer = find_moe_layers(model)[0]
    experts = layer.experts
    assert supports_batching(experts)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, experts[0].up_proj.in_features, generator=gen)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:2] for _ in range(37)])
    index[:, 0] = 1  # one expert gets every token, one none: uneven capacity
    index[:, 1] = torch.where(index[:, 1] == 1, torch.full_like(index[:, 1], 2), index[:, 1])
    index[index == 5] = 6
    weights = torch.rand(37, 2, generator=gen)

    def run(batched):
        for p in experts.parameters():
            p.grad = None
        h = hidden.clone().requires_grad_(True)
        with plain_forwards(experts), (batched_experts(experts) if batched else contextlib.nullcontext()):
            if batched:
                assert experts.forward.__func__ is batched_forward
            out = experts(h, index, weights)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), h.grad, {n: p.grad.clone() for n, p in experts.named_parameters() if p.grad is not None}

    wrapped = experts.__dict__.get("forward")  # compressed-tensors' offloading wrapper
    loop, batched = run(False), run(True)
    assert experts.__dict__.get("forward") is wrapped  # both patches are undone
    torch.testing.assert_close(batched[0], loop[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], loop[1], rtol=1e-5, atol=1e-6)
    assert batched[2].keys() == loop[2].keys()
    assert not any(batched[2][n].any() for n in batched[2] if n.startswith("5."))  # expert 5 got no token
    for name in loop[2]:
        torch.testing.assert_close(batched[2][name], loop[2][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared_gate_up", [True, False])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "nemotron_h"])
def test_batched_experts_apply_nvfp4_input_quantization_as_the_loop_hooks_do(model_type, shared_gate_up, padded,
                                                                             monkeypatch):
    """NVFP4 activation simulation: the loop quantizes each expert Linear's input in a hook under that expert's
    global scale; the batched forward quantizes the stacked tokens in one call. Same values and gradients."""
    from compressed_tensors.quantization import preset_name_to_scheme

    import routealign.accelerator
    from routealign.schemes import ActivationQuantizer

    monkeypatch.setattr(routealign.accelerator, "LAYOUT", "padded" if padded else "grouped")
    model = tiny_model(model_type, seed=4)
    linearize_moe(model)
    experts = find_moe_layers(model)[0].experts
    args = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    gen = torch.Generator().manual_seed(1)
    quantizers = {}
    for e in range(experts.num_experts):
        scale = 448 * 6 / (0.5 + 4 * torch.rand(1, generator=gen))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if hasattr(experts[e], proj):
                own = scale if proj != "down_proj" and shared_gate_up else 448 * 6 / (0.5 + torch.rand(1, generator=gen))
                quantizers[getattr(experts[e], proj)] = ActivationQuantizer(args, own)
    assert routealign.experts.input_quantizers(experts, quantizers) is not None
    hidden = 3 * torch.randn(29, experts[0].up_proj.in_features, generator=gen)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:2] for _ in range(29)])
    index[index == 3] = 4  # an expert without tokens
    weights = torch.rand(29, 2, generator=gen)

    def run(batched):
        for p in experts.parameters():
            p.grad = None
        h = hidden.clone().requires_grad_(True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(plain_forwards(experts))
            if batched:
                stack.enter_context(batched_experts(experts, routealign.experts.input_quantization_plans(
                    experts, quantizers)))
            else:
                for mod, quant in quantizers.items():
                    handle = mod.register_forward_pre_hook(lambda m, a, quant=quant: (quant(a[0]), *a[1:]))
                    stack.callback(handle.remove)
            out = experts(h, index, weights)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), h.grad, {n: p.grad.clone() for n, p in experts.named_parameters() if p.grad is not None}

    loop, batched = run(False), run(True)
    assert not hasattr(experts, "_routealign_input_quantizers")
    plain = experts(hidden, index, weights).detach()
    assert not torch.allclose(plain, loop[0], atol=1e-3)  # the quantization did something
    torch.testing.assert_close(batched[0], loop[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], loop[1], rtol=1e-5, atol=1e-6)
    for name in loop[2]:
        torch.testing.assert_close(batched[2][name], loop[2][name], rtol=1e-4, atol=1e-6)


def test_experts_with_quantizers_the_batched_forward_cannot_apply_keep_the_loop():
    from compressed_tensors.quantization import preset_name_to_scheme

    from routealign.experts import input_quantization_plans, input_quantizers
    from routealign.schemes import ActivationQuantizer

    model = tiny_model("qwen3_moe", seed=4)
    linearize_moe(model)
    experts = find_moe_layers(model)[0].experts
    nvfp4 = preset_name_to_scheme("NVFP4", ["Linear"]).input_activations
    token = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations  # per token: rows would mix experts
    one = torch.ones(1)
    only_first = {experts[0].down_proj: ActivationQuantizer(nvfp4, one)}
    per_token = {experts[e].down_proj: ActivationQuantizer(token, None) for e in range(experts.num_experts)}
    for quantizers in (only_first, per_token):
        assert input_quantizers(experts, quantizers) is None
        with batched_experts(experts, input_quantization_plans(experts, quantizers)):
            assert "forward" not in experts.__dict__ or experts.forward.__func__ is not batched_forward
