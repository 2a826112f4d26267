"""Train a small DeepSeek-V3-family reference MoE on WikiText-2, on the CPU, within a time budget.

    python benchmarks/models/train_deepseek.py --minutes 28 --out ~/.cache/routealign/models/tiny-deepseek_v3

The architecture is the one benchmarks need and the shared models lack: MLA attention, 16 routed experts with top-4
selection on ``sigmoid(z) + e_score_correction_bias`` restricted to the 2 best of 4 expert groups,
``routed_scaling_factor`` 2.5, one shared expert, the first layer dense, tied embeddings, 6 layers, hidden 256.
The correction biases are trained as DeepSeek-V3 does (auxiliary-loss-free balancing: after each step a bias moves
by ``--bias-rate`` against the sign of its expert's load excess), so the routers are peaked and balanced.

Text: ``wiki.train.tokens`` (training) and ``wiki.valid.tokens`` (the validation perplexity written to
TRAINING.json) from ``../shared/data/wikitext-2``, tokenized with the shared tiny-qwen3_moe 8,192-token BPE (copied
beside the model). The model is written atomically (a staging folder renamed into place) outside the repository;
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def config(vocab: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=64, head_dim=32, rope_interleave=False, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "shared/data/wikitext-2")
    parser.add_argument("--tokenizer-from", type=Path, default=ROOT / "shared/models/tiny-qwen3_moe")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/routealign/models/tiny-deepseek_v3")
    parser.add_argument("--minutes", type=float, default=28.0, help="training time budget (wall clock)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bias-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM

    from routealign.routing import RouterTap, find_moe_layers
    from routealign.textdata import encode_text, eval_rows

    tokenizer = args.tokenizer_from / "tokenizer.json"
    train = encode_text(args.data / "wiki.train.tokens", tokenizer)
    valid = eval_rows(encode_text(args.data / "wiki.valid.tokens", tokenizer), 16, 512)
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    model = AutoModelForCausalLM.from_config(config(len(vocab)), dtype=torch.float32, attn_implementation="sdpa")
    layers = find_moe_layers(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"DeepSeek-V3-family model: {params / 1e6:.1f} M parameters, {len(layers)} MoE layers", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    log, step = [], 0
    est_steps = None
    while time.perf_counter() - start < budget:
        elapsed = time.perf_counter() - start
        # linear warm-up over 30 steps, then cosine decay over the time budget
        frac = min(elapsed / budget, 1.0)
        lr = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = max(lr, args.lr * 0.02)
        offsets = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[o : o + args.seq_len + 1] for o in offsets.tolist()])
        model.train()
        with RouterTap(layers) as tap:
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # DeepSeek-V3's auxiliary-loss-free balancing
            for layer in layers:
                load = torch.bincount(tap.routing(layer).indices.reshape(-1), minlength=layer.num_experts).float()
                layer.router.e_score_correction_bias -= args.bias_rate * torch.sign(load - load.mean())
        step += 1
        if step % 20 == 0 or step == 1:
            rate = step / (time.perf_counter() - start)
            log.append({"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": round(loss.item(), 4),
                        "lr": lr})
            print(json.dumps(log[-1]), f"({rate:.2f} steps/s)", flush=True)
    model.eval()
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(input_ids=valid[i : i + 4]).logits[:, :-1].flatten(0, 1),
                                                 valid[i : i + 4, 1:].flatten()) for i in range(0, valid.shape[0], 4)]
        ppl = math.exp(torch.stack(nll).mean().item())
        loads = []
        with RouterTap(layers) as tap:
            model(input_ids=valid[:4])
        for layer in layers:
            load = torch.bincount(tap.routing(layer).indices.reshape(-1), minlength=layer.num_experts).float()
            loads.append({"layer": layer.name, "max_over_mean_load": round(float(load.max() / load.mean()), 3)})
    print(f"validation ppl (16 x 512 of wiki.valid.tokens, fp32): {ppl:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.parent / f".{args.out.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (args.tokenizer_from / name).exists():
            shutil.copy(args.tokenizer_from / name, staging / name)
    (staging / "TRAINING.json").write_text(json.dumps(
        {"arch": "deepseek_v3", "params": params, "steps": step, "minutes": args.minutes, "batch": args.batch,
         "seq_len": args.seq_len, "valid_ppl": ppl, "router_load": loads, "log": log,
         "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, indent=2))
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
