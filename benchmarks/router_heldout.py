"""Does a router objective generalise beyond the calibration tokens? One decoder block, tuned with several router
weights (lambda), then measured on held-out sequences: the block-output error and the next router's logit error and
top-k overlap (the next block unquantized, as in ``router_scope: next``).

    python benchmarks/router_heldout.py --model ../shared/models/tiny-qwen3_moe --layer 2 --lambdas 0 1 10 100

Calibration windows come from ``wiki.train.tokens`` (``--train`` sequences to tune on, ``--held`` further ones to
measure on; no evaluation text is read). Writes ``--out``/router_heldout.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _out(value):
    return value[0] if isinstance(value, tuple) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "shared/models/tiny-qwen3_moe")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wikitext-2")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0, 1, 10, 100])
    parser.add_argument("--objective", default="vsraq")
    parser.add_argument("--scope", default="next", choices=("block", "next", "both"))
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--held", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    from routealign.losses import RouterLossConfig
    from routealign.metrics import overlap_at_k
    from routealign.routing import RouterTap, StopForward, find_moe_layers
    from routealign.textdata import calibration_windows, encode_text, find_tokenizer
    from routealign.tuning import BlockInputs, BlockTuner, TuningConfig, suspended_offloading

    ids = calibration_windows(encode_text(args.data / "wiki.train.tokens", find_tokenizer(args.model)),
                              args.train + args.held, args.seq_len, 0)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    linearize_moe(model)
    layers = model.model.layers
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        kwargs = {"position_embeddings": model.model.rotary_emb(h, torch.arange(args.seq_len)[None]),
                  "attention_mask": None}
        for i in range(args.layer):
            h = torch.cat([_out(layers[i](h[s : s + 8], **kwargs)) for s in range(0, h.shape[0], 8)])
    train, held = h[: args.train], h[args.train :]
    block, nxt = layers[args.layer], layers[args.layer + 1]
    (next_layer,) = find_moe_layers(nxt)
    scheme = preset_name_to_scheme(args.scheme, ["Linear"])
    targets = {n: scheme.weights for n, m in block.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not find_moe_layers(block)[0].router}
    original = {k: v.clone() for k, v in block.state_dict().items()}

    @torch.no_grad()
    def measure():
        y = torch.cat([_out(block(held[s : s + 8], **kwargs)) for s in range(0, held.shape[0], 8)])
        with RouterTap([next_layer], detach=True, stop_after=True) as tap:
            try:
                nxt(y, **kwargs)
            except StopForward:
                pass
        return y, tap.logits[next_layer.name]

    y_fp, z_fp = measure()
    rows = []
    for lam in [None] + list(args.lambdas):  # None: RTN
        block.load_state_dict(original)
        start = time.perf_counter()
        iters = 0 if lam is None else args.iters
        with suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets, RouterLossConfig(args.objective),
                               TuningConfig(iters=iters, batch_size=8, router_weight=lam or 0.0,
                                            router_scope=args.scope, min_expert_tokens=0), nxt)
            tuner.tune(BlockInputs(train, kwargs), BlockInputs(train, kwargs))
        tuner.apply()
        y_q, z_q = measure()
        route = next_layer.family.route
        overlap = overlap_at_k(route(next_layer.router, z_fp).indices, route(next_layer.router, z_q).indices)
        rows.append({"method": "rtn" if lam is None else f"{args.objective} lambda={lam:g}",
                     "lambda": lam, "train_loss_first": tuner.history[0] if tuner.history else None,
                     "train_loss_best": min(tuner.history) if tuner.history else None,
                     "held_block_mse": torch.nn.functional.mse_loss(y_q, y_fp).item(),
                     "held_next_logit_mse": (z_q - z_fp).pow(2).mean().item(),
                     "held_next_overlap": overlap.mean().item(),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "router_heldout.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    lines = ["| method | train loss first -> best | held-out block MSE | held-out next-router logit MSE | "
             "held-out next-router overlap@k |", "|---|---|---|---|---|"]
    for r in rows:
        train_loss = "-" if r["train_loss_first"] is None else f"{r['train_loss_first']:.4g} -> {r['train_loss_best']:.4g}"
        lines.append(f"| {r['method']} | {train_loss} | {r['held_block_mse']:.4g} | {r['held_next_logit_mse']:.4g} | "
                     f"{r['held_next_overlap']:.4f} |")
    (args.out / "router_heldout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
