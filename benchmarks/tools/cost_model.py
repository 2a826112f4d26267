"""Arithmetic floor of one learned-rounding iteration, and how far a measured run is from it.

    python benchmarks/tools/cost_model.py --model ../shared/models/tiny-qwen3_moe            # + measured matmul rate
    python benchmarks/tools/cost_model.py --preset qwen3-30b-a3b --preset glm-4.5-air         # on paper
    python benchmarks/tools/cost_model.py --preset qwen3-30b-a3b --preset glm-4.5-air --gpu h100 --gpu h200
                                                                                 # whole-run predictions per config

One iteration of RouterAlignedRoundingModifier on one decoder block, ``batch`` sequences of ``seq_len`` tokens
(N = batch * seq_len tokens), router_scope ``next``:

- forward of the tuned block: attention projections (2 N P_attn), attention scores (2 N T/2 d_h H_q for QK and the
  same for AV, causal), router (2 N h E), routed experts (2 N k P_expert) and shared experts;
- the next block's attention and router, on the tuned block's output (scope ``next``; stops after the router);
- backward: about 2x the forward of the tuned block (weight and input gradients), 1x the next block's part (input
  gradients only);
- fake quantization: a few elementwise passes over every tuned weight (FLOPs negligible; bytes: float32 weight,
  offset, dequantized copy and gradients, ~10 passes of 4 bytes per weight).

The floor is FLOPs / peak rate. Measured: this machine's float32 matmul rate (square matmuls of the block's sizes,
``--measure``), and a run's oneshot seconds divided by layers x iterations if given.

``--gpu`` predicts a whole run on one GPU for each configuration in :data:`CONFIGS` (the default recipe, the fast
one): per layer the tuning iterations, the held-out evaluations, and the one-off passes over all calibration
tokens (unquantized targets, routed-token counts, the propagated quantized stream), each at
``max(FLOPs / float32 peak, bytes / memory bandwidth)``, times an overhead factor (measured wall time over the
floor; ``--overhead``, default the CPU's measured 2.4x: no GPU run has measured it).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Shape:
    name: str
    layers: int
    moe_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_inter: int
    shared_inter: int = 0
    gated: bool = True
    vocab: int = 151_936


# published config.json values of two public MoEs (on paper; check against the real config before relying)
PRESETS = {
    "qwen3-30b-a3b": Shape("Qwen3-30B-A3B", 48, 48, 2048, 32, 4, 128, 128, 8, 768),
    "glm-4.5-air": Shape("GLM-4.5-Air (106B)", 46, 45, 4096, 96, 8, 128, 128, 8, 1408, shared_inter=1408,
                         vocab=151_552),
}


def from_config(path: Path) -> Shape:
    c = json.loads((path / "config.json").read_text())
    layers = c["num_hidden_layers"]
    dense = c.get("first_k_dense_replace", 0)
    heads = c["num_attention_heads"]
    return Shape(path.name, layers, layers - dense, c["hidden_size"], heads, c.get("num_key_value_heads", heads),
                 c.get("head_dim") or c["hidden_size"] // heads,
                 c.get("num_experts") or c.get("n_routed_experts") or c.get("num_local_experts"),
                 c["num_experts_per_tok"], c.get("moe_intermediate_size") or c["intermediate_size"],
                 shared_inter=(c.get("n_shared_experts") or 0) * (c.get("moe_intermediate_size") or 0),
                 vocab=c["vocab_size"])


def iteration_cost(s: Shape, batch: int, seq_len: int, scope: str = "next") -> dict:
    n = batch * seq_len
    p_attn = s.hidden * (s.heads * s.head_dim) * 2 + s.hidden * (s.kv_heads * s.head_dim) * 2
    scores = 2 * 2 * n * (seq_len / 2) * s.head_dim * s.heads  # QK and AV, causal half
    mult = 3 if s.gated else 2
    p_expert = mult * s.hidden * s.expert_inter
    p_shared = mult * s.hidden * s.shared_inter
    router = 2 * n * s.hidden * s.experts
    fwd_block = 2 * n * p_attn + scores + router + 2 * n * s.top_k * p_expert + 2 * n * p_shared
    fwd_next = (2 * n * p_attn + scores + router) if scope in ("next", "both") else 0
    flops = 3 * fwd_block + 2 * fwd_next
    tuned_params = p_attn + s.experts * p_expert + p_shared
    weight_bytes = tuned_params * 4 * 10
    act_bytes = n * s.hidden * 4 * 30  # residual stream and intermediates kept for backward, rough
    return {"tokens": n, "flops": flops, "bytes": weight_bytes + act_bytes, "tuned_params": tuned_params,
            "expert_share": 3 * 2 * n * s.top_k * p_expert / flops}


# datasheet peaks (dense): float32 on CUDA cores (the tuning runs in float32; TF32 is off for matmuls by default in
# torch), HBM bandwidth. On paper, not measured here.
GPUS = {
    "h100": {"name": "H100 SXM", "fp32": 67e12, "bf16": 989e12, "hbm": 3.35e12},
    "h200": {"name": "H200 SXM", "fp32": 67e12, "bf16": 989e12, "hbm": 4.8e12},
}


@dataclass
class Config:
    name: str
    iters: int
    arms: float  # tuning loops per block: 2 when a router objective is gated against plain rounding everywhere
    scope: str  # next: the router objective runs the next block to its router
    holdout: float = 0.125
    holdout_every: int = 10
    dtype: str = "fp32"  # bf16: ``amp`` (tuning matmuls on bf16 tensor cores)
    lm_head: bool = False  # decide_on lm_head: each held-out evaluation runs the rest of the model and the LM head


CONFIGS = {
    "default (vsraq_w4a16.yaml: 200 iters, gated router arm)": Config("default", 200, 2.0, "next"),
    "plain (autoround_w4a16.yaml: objective none, 200 iters)": Config("plain", 200, 1.0, "block"),
    "fast (vsraq_w4a16_fast.yaml: objective none, 50 iters, mse init)": Config("fast", 50, 1.0, "block"),
    "fast + amp (bf16 autocast; not measured on a GPU)": Config("fast-amp", 50, 1.0, "block", dtype="bf16"),
    "decide_on lm_head (200 iters, both arms, decisions at the LM head)": Config("lm-head", 200, 2.0, "next",
                                                                                  lm_head=True),
}


def run_cost(s: Shape, c: Config, samples: int, seq_len: int, batch: int, all_experts: bool = False) -> dict:
    """FLOPs and bytes of a whole run: per layer, ``arms`` tuning loops of ``iters`` iterations on ``batch``
    sequences, held-out evaluations (forward of the held-out sequences every ``holdout_every`` iterations), three
    one-off forwards over every calibration token (targets, counts, propagation), and llm-compressor's sequential
    pipeline's own two passes over every token (calibration and propagation; with ``moe_calibrate_all_experts``
    every expert runs on every token)."""
    step = iteration_cost(s, batch, seq_len, c.scope)
    fwd_seq = iteration_cost(s, 1, seq_len, "block")["flops"] / 3  # one sequence, forward of the block only
    held = max(int(samples * c.holdout), 0)
    evals = c.iters // c.holdout_every + 1
    mult = 3 if s.gated else 2
    inflation = 2 * seq_len * (s.experts - s.top_k) * mult * s.hidden * s.expert_inter if all_experts else 0
    pipeline = 2 * samples * (fwd_seq + inflation)
    # decide_on lm_head: every held-out evaluation also runs the remaining layers (L/2 on average, a sequence's
    # forward each) and the LM head (2 T h V) on each held-out sequence
    tail = (s.layers / 2 * fwd_seq + 2 * seq_len * s.hidden * s.vocab) if c.lm_head else 0
    flops = s.layers * (c.arms * (c.iters * step["flops"] + evals * held * (fwd_seq + tail)) + 3 * samples * fwd_seq
                        + pipeline)
    bytes_ = s.layers * c.arms * c.iters * step["bytes"]
    return {"flops": flops, "bytes": bytes_}


def measure_matmul(size: int, dtype=torch.float32, device: str = "cpu", repeats: int = 5) -> float:
    """GFLOP/s of ``size``-square matmuls on this machine (best of ``repeats``)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append", default=[])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--scope", default="next")
    parser.add_argument("--rate", type=float, help="peak GFLOP/s to use instead of measuring")
    parser.add_argument("--measured-s", type=float, help="a measured oneshot wall time to compare with the floor")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpu", choices=sorted(GPUS), action="append", default=[],
                        help="predict whole runs on this GPU (datasheet peaks) for each configuration")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (for --gpu)")
    parser.add_argument("--all-experts", action="store_true",
                        help="llm-compressor's moe_calibrate_all_experts=True in the pipeline's passes (for --gpu)")
    parser.add_argument("--overhead", type=float, default=2.4,
                        help="measured wall time / arithmetic floor applied to the GPU floor (default: the CPU's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    shapes = [from_config(p) for p in args.model] + [PRESETS[p] for p in args.preset]
    if args.gpu and not args.rate:
        shapes_here = []  # predictions only: no measurement of this machine
    else:
        shapes_here = shapes
        rate = args.rate or measure_matmul(1024, device=device)
        print(f"float32 matmul rate on this {device}: {rate:.1f} GFLOP/s ({args.threads} threads)")
    for shape in shapes_here:
        cost = iteration_cost(shape, args.batch, args.seq_len, args.scope)
        per_iter = cost["flops"] / (rate * 1e9)
        total = per_iter * args.iters * shape.layers
        rows.append({"model": shape.name, "GFLOP/iter": cost["flops"] / 1e9, "MB/iter": cost["bytes"] / 1e6,
                     "expert share": cost["expert_share"], "floor s/iter": per_iter,
                     "floor s (all layers)": total})
        print(f"| {shape.name} | {cost['flops'] / 1e9:.1f} GFLOP/iter | {cost['bytes'] / 1e6:.0f} MB/iter | experts "
              f"{cost['expert_share']:.0%} of FLOPs | floor {per_iter * 1e3:.1f} ms/iter | "
              f"{args.iters} iters x {shape.layers} layers: {total:.0f} s |")
        if args.measured_s:
            print(f"  measured {args.measured_s:.0f} s = {args.measured_s / total:.1f}x the floor")
    predictions = []
    for gpu in args.gpu:
        spec = GPUS[gpu]
        for shape in shapes:
            for label, config in CONFIGS.items():
                cost = run_cost(shape, config, args.samples, args.seq_len, args.batch, args.all_experts)
                floor = max(cost["flops"] / spec[config.dtype], cost["bytes"] / spec["hbm"])
                predictions.append({"gpu": spec["name"], "model": shape.name, "config": label,
                                    "PFLOP": cost["flops"] / 1e15, "floor_min": floor / 60,
                                    "predicted_min": floor * args.overhead / 60})
    if predictions:
        print(f"\n| GPU | model | configuration | PFLOP | arithmetic floor | predicted (x{args.overhead} overhead) |")
        print("|---|---|---|---|---|---|")
        for p in predictions:
            print(f"| {p['gpu']} | {p['model']} | {p['config']} | {p['PFLOP']:.1f} | {p['floor_min']:.1f} min | "
                  f"{p['predicted_min']:.1f} min |")
    print(json.dumps({"per_iteration": rows, "predictions": predictions}, indent=1))


if __name__ == "__main__":
    main()
