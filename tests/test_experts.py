"""Issue 5.2: the batched experts forward equals llm-compressor's per-expert loop (values and gradients)."""

import contextlib

import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe

from routealign.experts import batched_experts, batched_forward, supports_batching
from routealign.routing import find_moe_layers
from routealign.tiny import tiny_model
from routealign.tuning import plain_forwards


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "nemotron_h", "deepseek_v3"])
def test_batched_experts_match_the_loop(model_type, padded, monkeypatch):
    import routealign.experts

    monkeypatch.setattr(routealign.experts, "PADDED", padded)
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
