"""Does a router objective generalise beyond the calibration tokens? One decoder block, tuned with several
router-objective settings, then measured on held-out sequences: the block-output error, the next router's logit
error and top-k overlap, and the error at the output of the first routing layer downstream (the criterion
``router_gate`` uses), the layers in between unquantized.

    python benchmarks/diagnostics/router_heldout.py --model ../shared/models/tiny-qwen3_moe --layers 1 3 \
        --variants '{"none": {"objective": "none"}, "vsraq": {"objective": "vsraq"}}' --out /tmp/rh

The block's inputs are the causal unquantized stream (routealign.streams), for tuning and measuring alike.
Calibration windows come from ``wiki.train.tokens``: ``--train`` sequences to tune on, ``--held`` further ones to
measure on; no evaluation text is read. Each variant is tuned without held-out selection or gating
(``holdout: 0``), so what is measured is the objective itself. Writes ``--out``/router_heldout.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_VARIANTS = {"rtn": {"objective": "none", "iters": 0}, "none": {"objective": "none"},
                    "vsraq": {"objective": "vsraq"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[3] / "shared/models/tiny-qwen3_moe")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/wikitext-2")
    parser.add_argument("--layers", type=int, nargs="+", default=[2])
    parser.add_argument("--variants", default=json.dumps(DEFAULT_VARIANTS),
                        help="JSON: name -> RouterAlignedRoundingModifier fields (objective, router_weight, ...)")
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--held", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.utils.pytorch import infer_sequential_targets
    from transformers import AutoModelForCausalLM

    from routealign.metrics import overlap_at_k
    from routealign.routing import find_moe_layers
    from routealign.streams import BlockInputs, StreamEngine, run_block
    from routealign.textdata import calibration_windows, encode_text, find_tokenizer
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig

    variants = json.loads(args.variants)
    ids = calibration_windows(encode_text(args.data / "wiki.train.tokens", find_tokenizer(args.model)),
                              args.train + args.held, args.seq_len, args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    linearize_moe(model)
    classes = set(infer_sequential_targets(model, sequential_targets=None))
    names = [n for n, m in model.named_modules() if type(m).__name__ in classes]
    engine = StreamEngine(model, names)
    kwargs = engine.layer_kwargs(args.seq_len)
    h = torch.cat([engine.capture(ids[s : s + 8])[0] for s in range(0, ids.shape[0], 8)])

    def forward(name, x, layers=(), stop_after=False):
        block = model.get_submodule(name)
        params = dict(list(block.named_parameters()) + list(block.named_buffers()))
        outs, logits = [], {}
        with torch.no_grad():
            for s in range(0, x.shape[0], 8):
                y, lg = run_block(block, params, x[s : s + 8], kwargs[name], layers, stop_after=stop_after)
                outs.append(y)
                for k, v in lg.items():
                    logits.setdefault(k, []).append(v.reshape(-1, v.shape[-1]))
        return (torch.cat(outs) if outs[0] is not None else None), {k: torch.cat(v) for k, v in logits.items()}

    rows = []
    streams = {}
    current = h
    for index, name in enumerate(names):
        streams[name] = current
        if index == max(args.layers):
            break
        current, _ = forward(name, current)
    for layer in args.layers:
        name = names[layer]
        chain = []
        for later in names[layer + 1:]:
            chain.append(later)
            if find_moe_layers(model.get_submodule(later), require=False):
                break
        block = model.get_submodule(name)
        (next_moe,) = find_moe_layers(model.get_submodule(chain[-1]))
        train, held = streams[name][: args.train], streams[name][args.train :]
        routers = {l.router_name for l in find_moe_layers(block, require=False)}
        scheme = preset_name_to_scheme(args.scheme, ["Linear"])
        targets = {n: scheme.weights for n, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear) and f"{name}.{n}" not in routers
                   and not n.endswith("shared_expert_gate")}
        original = {k: v.clone() for k, v in block.state_dict().items()}

        def measure():
            y, _ = forward(name, held)
            x = y
            for later in chain[:-1]:
                x, _ = forward(later, x)
            down, logits = forward(chain[-1], x, [next_moe])
            return y, down, logits[next_moe.name]

        y_fp, d_fp, z_fp = measure()
        route = next_moe.family.route
        for label, fields in variants.items():
            block.load_state_dict(original)
            fields = {"iters": args.iters, "seed": args.seed, **fields}
            tuning = TuningConfig(**{k: v for k, v in fields.items() if k in TuningConfig.model_fields},
                                  holdout=0.0, rounding={"min_expert_tokens": 0})
            start = time.perf_counter()
            downstream = [model.get_submodule(n) for n in chain]
            with suspended_offloading(block, *downstream):
                tuner = BlockTuner(block, targets, tuning, downstream, name,
                                   next_kwargs=[kwargs[n] for n in chain])
                result = tuner.tune(BlockInputs(train, kwargs[name]), BlockInputs(train, kwargs[name]))
            result.write()
            y_q, d_q, z_q = measure()
            overlap = overlap_at_k(route(next_moe.router, z_fp).indices, route(next_moe.router, z_q).indices)
            rows.append({"layer": name, "variant": label, "fields": fields,
                         "train_loss_first": result.history[0] if result.history else None,
                         "train_loss_best": min(result.history) if result.history else None,
                         "router_scale": result.router_scale,
                         "held_block_mse": torch.nn.functional.mse_loss(y_q, y_fp).item(),
                         "held_downstream_mse": torch.nn.functional.mse_loss(d_q, d_fp).item(),
                         "held_next_logit_mse": (z_q - z_fp).pow(2).mean().item(),
                         "held_next_overlap": overlap.mean().item(),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
        block.load_state_dict(original)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "router_heldout.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    lines = ["| layer | variant | held-out block MSE | held-out downstream MSE | held-out next-router logit MSE | "
             "held-out next-router overlap@k | router/MSE grad-norm ratio | sign flips |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scale = r["router_scale"] or {}
        lines.append(f"| {r['layer']} | {r['variant']} | {r['held_block_mse']:.4g} | {r['held_downstream_mse']:.4g} | "
                     f"{r['held_next_logit_mse']:.4g} | {r['held_next_overlap']:.4f} | "
                     f"{scale.get('grad_norm_ratio', float('nan')):.3g} | {scale.get('sign_flip_fraction', float('nan')):.3f} |")
    (args.out / "router_heldout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
