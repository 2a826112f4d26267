"""Tiny random MoE models of every supported family, built from transformers configs (no downloads).

Used by the test suite, the demo and the benchmarks' default. Every linear layer's input dimension is a multiple
of 128 so that group-128 W4A16 and group-16 NVFP4 schemes apply to every targeted layer.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

__all__ = ["TINY_FAMILIES", "tiny_config", "tiny_model", "byte_tokenizer", "save_tiny"]

_COMMON = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_SPECIFIC: dict[str, dict] = {
    "qwen3_moe": dict(num_hidden_layers=2, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "qwen2_moe": dict(num_hidden_layers=2, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=256, norm_topk_prob=False),
    "olmoe": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, intermediate_size=128),
    "mixtral": dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=128),
    "deepseek_v3": dict(num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, n_shared_experts=1, moe_intermediate_size=128,
                        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=128, kv_lora_rank=128,
                        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, head_dim=32,
                        rope_interleave=False, num_key_value_heads=2),
    "glm4_moe": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                     n_group=1, topk_group=1, n_shared_experts=1, moe_intermediate_size=128,
                     routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5),
    "solar_open": dict(num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=2,
                       n_group=1, topk_group=1, n_shared_experts=1, moe_intermediate_size=128,
                       routed_scaling_factor=1.5, norm_topk_prob=True),
    "gpt_oss": dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=128,
                    layer_types=["full_attention", "full_attention"], sliding_window=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "nemotron_h": dict(layers_block_type=["full_attention", "moe", "full_attention", "moe"], n_routed_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
                       n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                       mlp_hidden_act="relu2"),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_SPECIFIC)


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` (one of :data:`TINY_FAMILIES`), with ``overrides`` applied."""
    if model_type not in _SPECIFIC:
        raise ValueError(f"no tiny config for model type '{model_type}'; known: {', '.join(TINY_FAMILIES)}")
    kwargs = {**_COMMON, **_SPECIFIC[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def _spread_router_biases(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Random models start with zero correction biases and zero router biases; give them values so the tests
    exercise the bias paths."""
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.05)
        if type(module).__name__ == "GptOssTopKRouter":
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)


@torch.no_grad()
def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A tiny random model of ``model_type``; routers get a larger init so that routing is not near-uniform."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("TopKRouter", "TopkRouter")):
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2)
    _spread_router_biases(model, generator)
    model.eval()
    return model


def byte_tokenizer():
    """A byte-level tokenizer (ids 3..258 are the 256 bytes; 0/1/2 are pad/bos/eos) that needs no download.

    Returned as a transformers ``PreTrainedTokenizerFast`` so llm-compressor can use it as the processor and
    ``save_pretrained`` writes a ``tokenizer.json`` that ``routealign eval`` reads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = {_byte_of(c): c for c in pre_tokenizers.ByteLevel.alphabet()}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({byte_to_char[b]: 3 + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    # a minimal chat template, so chat datasets (a ``messages`` column) calibrate tiny models as they do real ones
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    return fast


def _byte_of(char: str) -> int:
    """GPT-2's bytes_to_unicode inverse: printable bytes map to themselves, the rest to 256 + n in order."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def save_tiny(model_type: str, folder, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Write a tiny random model of ``model_type`` and the byte tokenizer to ``folder``; returns the model."""
    model = tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return model
