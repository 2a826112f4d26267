"""Train a small reference MoE on WikiText-2 on the CPU (or a GPU), reproducibly, and report its router statistics.

    python benchmarks/models/train_moe.py --arch qwen3_moe_64x8 --steps 1100 --seed 0 \\
        --out ~/.cache/routealign/models/tiny-qwen3_moe-64x8

Architectures (``--arch``):

- ``qwen3_moe_64x8``: the many-expert shape of the papers' models (OLMoE, Qwen3-MoE): 64 routed experts, top-8 with
  ``norm_topk_prob``, 8 MoE layers, hidden 256, expert intermediate 128 (the smallest that W4A16's group of 128
  divides, as serving kernels require), 4 heads x 64 (GQA 2 kv heads), tied embeddings. Balanced by the Switch-style
  load-balancing loss Qwen3-MoE trains with (``router_aux_loss_coef`` 0.01 on ``aux_loss``).
- ``deepseek_v3``: MLA attention, 16 routed experts with top-4 selection on ``sigmoid(z) + e_score_correction_bias``
  restricted to the 2 best of 4 expert groups, ``routed_scaling_factor`` 2.5, one shared expert, the first layer
  dense, tied embeddings, 6 layers, hidden 256. Balanced as DeepSeek-V3 does (auxiliary-loss-free: after each step a
  correction bias moves by ``--bias-rate`` against the sign of its expert's load excess).

Reproducibility: with ``--steps`` the learning-rate schedule (30-step warm-up, cosine to 2% over the steps) and the
batches (offsets from a generator seeded by ``--seed``) depend on the step count only, so the same command, torch
build and ``--threads`` remake the same weights bit for bit (torch's deterministic algorithms; before they were
set, two 2-thread runs differed in float noise, so the 64x8 model of RESULTS §14 is remade to that noise only).
``--minutes`` instead schedules by wall clock (not
reproducible; kept for the DeepSeek-V3 model's recorded runs).

Text: ``wiki.train.tokens`` (training) and ``wiki.valid.tokens`` (validation, 16 x 512) from
``../shared/data/wikitext-2``, tokenized with the shared tiny-qwen3_moe 8,192-token BPE (copied beside the model).
``TRAINING.json`` records the curve, the settings, and the router statistics of the trained model on the validation
rows: per layer the top-k boundary margin distribution (k-th minus (k+1)-th selection score), the normalised load
entropy, and the RTN W4A16 / W3A16 (symmetric int, group 128) Jaccard with the unquantized choices and perplexity.
The model is written atomically (a staging folder renamed into place) outside the repository; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def _qwen3_moe_64x8(vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True,
        router_aux_loss_coef=0.01, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _deepseek_v3(vocab: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=64, head_dim=32, rope_interleave=False, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )


# arch -> (config builder, balancing: "aux_loss" or "bias")
ARCHS = {"qwen3_moe_64x8": (_qwen3_moe_64x8, "aux_loss"), "deepseek_v3": (_deepseek_v3, "bias")}


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 4) -> float:
    model.eval()
    nll = [torch.nn.functional.cross_entropy(model(input_ids=rows[i : i + batch]).logits[:, :-1].flatten(0, 1),
                                             rows[i : i + batch, 1:].flatten()) for i in range(0, rows.shape[0], batch)]
    return math.exp(torch.stack(nll).mean().item())


def _rtn_copy(model, scheme: str):
    """A copy of ``model`` with every expert and attention weight fake-quantized round-to-nearest under ``scheme``
    (routers, embeddings and the LM head untouched, as the recipes ignore them; so is a weight whose input dimension
    the group size does not divide, such as MLA's ``kv_b_proj``, which a recipe for that model must ignore too)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from routealign.routing import find_moe_layers
    from routealign.schemes import WeightQuantizer

    quantizer = WeightQuantizer(preset_name_to_scheme(scheme, ["Linear"]).weights)
    rtn = copy.deepcopy(model)
    routers = {id(layer.router) for layer in find_moe_layers(rtn)}
    skip = {id(rtn.get_input_embeddings()), id(rtn.get_output_embeddings())} | routers
    with torch.no_grad():
        for module in rtn.modules():
            if id(module) in skip:
                continue
            for name, p in module.named_parameters(recurse=False):
                if p.ndim < 2:  # biases, norms, correction biases
                    continue
                w = p.data.float()  # [out, in] or stacked experts [E, out, in]
                if quantizer.args.group_size and w.shape[-1] % int(quantizer.args.group_size):
                    continue
                p.data.copy_(quantizer.fake_quant(w, quantizer.rtn_qparams(w, quantizer.global_scale(w))))
    return rtn


@torch.no_grad()
def router_statistics(model, rows: torch.Tensor) -> dict:
    """Per-layer margin distribution, load entropy and top-1 share on ``rows``, and RTN W4A16/W3A16 agreement."""
    from routealign.evaluate import evaluate
    from routealign.routing import RouterTap, find_moe_layers

    model.eval()
    layers = find_moe_layers(model)
    stats = []
    with RouterTap(layers) as tap:
        model(input_ids=rows)
    for layer in layers:
        routing = tap.routing(layer)
        margin = routing.boundary_margin().float()
        load = torch.bincount(routing.indices.reshape(-1), minlength=layer.num_experts).double()
        p = load / load.sum()
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(layer.num_experts))
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        stats.append({
            "layer": layer.name, "experts": layer.num_experts, "top_k": layer.top_k,
            "margin_quantiles_10_25_50_75_90": [round(float(v), 4) for v in torch.quantile(margin, q)],
            "margin_below_0.05": round(float((margin < 0.05).double().mean()), 4),
            "load_entropy": round(entropy, 4), "max_over_mean_load": round(float(load.max() / load.mean()), 3),
        })
    rtn = {}
    for scheme in ("W4A16", "W3A16"):
        result = evaluate(model, _rtn_copy(model, scheme), rows, batch_size=4, progress=False)
        per_layer = result.report["routing"]["per_layer"]
        rtn[scheme] = {"ppl": round(result.report["perplexity"]["quantized"], 3),
                       "ppl_reference": round(result.report["perplexity"]["reference"], 3),
                       "jaccard_per_layer": [round(row["jaccard"], 4) for row in per_layer],
                       "flip_rate_per_layer": [round(1 - row["exact_set"], 4) for row in per_layer]}
    return {"layers": stats, "rtn": rtn}


def main(argv: list[str] | None = None, default_arch: str = "qwen3_moe_64x8") -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default=default_arch)
    parser.add_argument("--data", type=Path, default=ROOT / "shared/data/wikitext-2")
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "shared/models/tiny-qwen3_moe")
    parser.add_argument("--out", type=Path, help="default ~/.cache/routealign/models/tiny-ARCH")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps (reproducible schedule)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget (schedule by time; not reproducible)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bias-rate", type=float, default=1e-3, help="deepseek_v3: correction-bias step")
    parser.add_argument("--eval-every", type=int, default=200, help="validation perplexity every N steps (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps is None and args.minutes is None:
        args.steps = 1100
    out = args.out or Path.home() / f".cache/routealign/models/tiny-{args.arch}"
    torch.set_num_threads(args.threads)
    # run to run bit for bit at the same --threads: without it two 2-thread runs of 3 steps differed by up to 2e-6
    # (CPU thread-parallel reductions; RESULTS §14a); with it they were identical. cuBLAS needs the workspace setting
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM

    from routealign.routing import RouterTap, find_moe_layers
    from routealign.textdata import encode_text, eval_rows

    tokenizer = args.tokenizer_from / "tokenizer.json"
    train = encode_text(args.data / "wiki.train.tokens", tokenizer)
    valid = eval_rows(encode_text(args.data / "wiki.valid.tokens", tokenizer), 16, 512)
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    build, balancing = ARCHS[args.arch]
    cfg = build(len(vocab))
    extra = {"experts_implementation": "grouped_mm"} if args.arch == "qwen3_moe_64x8" else {}
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa", **extra)
    layers = find_moe_layers(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {params / 1e6:.1f} M parameters, {len(layers)} MoE layers, "
          f"{layers[0].num_experts} experts top-{layers[0].top_k}, {train.numel():,} training tokens", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    log, step = [], 0

    def progress() -> float:
        if args.steps is not None:
            return step / args.steps
        return (time.perf_counter() - start) / (args.minutes * 60)

    while progress() < 1.0:
        # linear warm-up over 30 steps, then cosine decay to 2%
        lr = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(progress(), 1.0)))
        for group in opt.param_groups:
            group["lr"] = max(lr, args.lr * 0.02)
        offsets = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[o : o + args.seq_len + 1] for o in offsets.tolist()])
        model.train()
        with RouterTap(layers) as tap:
            output = model(input_ids=ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), ids[:, 1:].flatten())
        total = loss
        if balancing == "aux_loss":
            total = loss + cfg.router_aux_loss_coef * output.aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if balancing == "bias":
            with torch.no_grad():  # DeepSeek-V3's auxiliary-loss-free balancing
                for layer in layers:
                    load = torch.bincount(tap.routing(layer).indices.reshape(-1), minlength=layer.num_experts).float()
                    layer.router.e_score_correction_bias -= args.bias_rate * torch.sign(load - load.mean())
        step += 1
        if step % 20 == 0 or step == 1:
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": round(loss.item(), 4),
                     "lr": round(lr, 6)}
            if balancing == "aux_loss":
                entry["aux_loss"] = round(output.aux_loss.item(), 4)
            if args.eval_every and step % args.eval_every == 0:
                entry["valid_ppl_8x512"] = round(perplexity(model, valid[:8]), 3)
            log.append(entry)
            print(json.dumps(entry), f"({step / (time.perf_counter() - start):.3f} steps/s)", flush=True)
    minutes = (time.perf_counter() - start) / 60
    ppl = perplexity(model, valid)
    print(f"validation ppl (16 x 512 of wiki.valid.tokens, fp32): {ppl:.3f} after {step} steps, {minutes:.1f} min",
          flush=True)
    stats = router_statistics(model, valid)
    print(json.dumps({"rtn": {s: v["ppl"] for s, v in stats["rtn"].items()}}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    model.config.output_router_logits = False
    model.save_pretrained(str(staging))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (args.tokenizer_from / name).exists():
            shutil.copy(args.tokenizer_from / name, staging / name)
    (staging / "TRAINING.json").write_text(json.dumps(
        {"arch": args.arch, "params": params, "steps": step, "minutes": round(minutes, 1), "batch": args.batch,
         "seq_len": args.seq_len, "valid_ppl": ppl, "router": stats, "log": log, "torch": torch.__version__,
         "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
