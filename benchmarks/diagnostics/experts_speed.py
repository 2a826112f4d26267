"""Seconds per tuning iteration with llm-compressor's per-expert loop vs routealign's batched experts, on one
decoder block of a model (default: the shared tiny-qwen3_moe), same data, same settings.

    python benchmarks/diagnostics/experts_speed.py --model ../shared/models/tiny-qwen3_moe --iters 20 [--scheme NVFP4]

With ``--scheme NVFP4`` the tuning forward also simulates the input-activation quantization (as the modifier does):
the loop applies it in hooks on every expert Linear, the batched forward to the stacked tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[3] / "shared/models/tiny-qwen3_moe")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scheme", default="W4A16", help="compressed-tensors preset (W4A16, NVFP4, ...)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators (loop)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    from routealign.streams import BlockInputs
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).to(device)
    linearize_moe(model)
    layers = model.model.layers
    block, nxt = layers[args.layer], layers[args.layer + 1]
    scheme = preset_name_to_scheme(args.scheme, ["Linear"])
    targets = {n: scheme.weights for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    activations = {n: scheme.input_activations for n in targets} if scheme.input_activations is not None else {}
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(args.seq_len, device=device)[None]
        q = BlockInputs(h, {"position_embeddings": model.model.rotary_emb(h, pos), "attention_mask": None})
    rows = {}
    for batched in (False, True, False, True):
        with suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets,
                               TuningConfig(objective="vsraq", iters=args.iters, batch_size=args.batch, memory={"batched_experts": batched}, holdout=0.0), nxt,
                               activations=activations)
            tuner.reference(q)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tuner.tune(q, q)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        key = "batched" if batched else "loop"
        rows.setdefault(key, []).append(seconds / args.iters)
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "threads": args.threads,
              "scheme": args.scheme, "activations_simulated": bool(activations),
              "tokens_per_iter": args.batch * args.seq_len,
              **{f"{k}_s_per_iter": min(v) for k, v in rows.items()}}
    result["speedup"] = result["loop_s_per_iter"] / result["batched_s_per_iter"]
    print(json.dumps(result, indent=1))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets,
                               TuningConfig(objective="vsraq", iters=5, batch_size=args.batch, memory={"batched_experts": False}, holdout=0.0), nxt,
                               activations=activations)
            tuner.reference(q)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                tuner.tune(q, q)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
