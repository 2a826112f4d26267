"""Arithmetic floor of one learned-rounding iteration, and how far a measured run is from it.

    python benchmarks/tools/cost_model.py --model ../shared/models/tiny-qwen3_moe            # + measured matmul rate
    python benchmarks/tools/cost_model.py --preset qwen3-30b-a3b --preset glm-4.5-air         # on paper
    python benchmarks/tools/cost_model.py --preset qwen3-30b-a3b --preset glm-4.5-air --gpu h100 --gpu h200
                                                                                 # whole-run predictions per config
    python benchmarks/tools/cost_model.py --preset qwen3-30b-a3b --preset deepseek-v3 --gpu h100 --ranks 1 --ranks 8
                                                     # + data-parallel runs: time, all-reduce and memory per rank

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
    attn_params: int | None = None  # attention weights per layer when not q/k/v/o of heads x head_dim (MLA)
    total_params: float | None = None  # the whole model's parameters (host memory); None: layers x block


# published config.json values of two public MoEs (on paper; check against the real config before relying)
PRESETS = {
    "qwen3-30b-a3b": Shape("Qwen3-30B-A3B", 48, 48, 2048, 32, 4, 128, 128, 8, 768),
    "glm-4.5-air": Shape("GLM-4.5-Air (106B)", 46, 45, 4096, 96, 8, 128, 128, 8, 1408, shared_inter=1408,
                         vocab=151_552),
    # MLA attention per layer: q_a 7168x1536, q_b 1536x(128x192), kv_a 7168x576, kv_b 512x(128x256), o 16384x7168;
    # head_dim 192 (the query/key width, the larger of QK's 192 and AV's 128); 3 dense layers counted as MoE ones
    "deepseek-v3": Shape("DeepSeek-V3 (671B)", 61, 58, 7168, 128, 128, 192, 256, 8, 2048, shared_inter=2048,
                         vocab=129_280, attn_params=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
                         + 128 * 128 * 7168, total_params=671e9),
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


def attention_params(s: Shape) -> int:
    return s.attn_params or s.hidden * (s.heads * s.head_dim) * 2 + s.hidden * (s.kv_heads * s.head_dim) * 2


def iteration_cost(s: Shape, batch: int, seq_len: int, scope: str = "next") -> dict:
    n = batch * seq_len
    p_attn = attention_params(s)
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
    lm_head: bool = False  # decide_on lm_head: the arms are compared by the next-token KL at the LM head
    lm_head_iterations: bool = False  # iteration_on lm_head: every held-out evaluation runs the rest of the model
    ops: int = 1114  # aten operations per loop iteration (scale.py --count at 128 experts; 1471 with the router term)
    router_fraction: float = 1.0  # the second arm's iterations per iteration of the first (router_arm refine: 0.25)
    pipeline_passes: bool = False  # llm-compressor's calibration and propagation passes run the layers (before
    # issue 29; since, they skip them when every modifier of the recipe streams its own activations)

    @property
    def loops(self) -> float:
        """Tuning loops per layer, in iterations of ``iters``: the first arm and the second's fraction."""
        return 1.0 + (self.arms - 1.0) * self.router_fraction


CONFIGS = {
    "vsraq_w4a16.yaml (200 iters, both arms, LM-head decisions)": Config("default", 200, 2.0, "next", lm_head=True,
                                                                        ops=1471),
    "vsraq_w4a16.yaml with router_arm refine (a quarter of the iterations)": Config(
        "refine", 200, 2.0, "next", lm_head=True, ops=1471, router_fraction=0.25),
    "vsraq_w4a16.yaml before issue 29 (LM head at every held-out evaluation)": Config(
        "default-before", 200, 2.0, "next", lm_head=True, lm_head_iterations=True, ops=47800, pipeline_passes=True),
    "plain (autoround_w4a16.yaml: objective none, 200 iters)": Config("plain", 200, 1.0, "block"),
    "fast (vsraq_w4a16_fast.yaml: objective none, 50 iters, mse init)": Config("fast", 50, 1.0, "block"),
    "fast before issue 29 (one autograd chain and step per expert weight)": Config("fast-before", 50, 1.0, "block",
                                                                                   ops=38121, pipeline_passes=True),
    "fast + amp (bf16 autocast; not measured on a GPU)": Config("fast-amp", 50, 1.0, "block", dtype="bf16"),
}

# host time per dispatched operation of the tuning loop on a GPU (launch-bound), fitted to the one GPU measurement:
# the fast recipe on one H200 at a788e10 took 0.69 s per iteration of a Qwen3-30B-A3B layer, whose arithmetic floor
# is ~35 ms, with 38,121 operations per iteration (scale.py --count at 128 experts): (0.69 - 0.035) / 38,121
SECONDS_PER_OP = 17.2e-6


def run_cost(s: Shape, c: Config, samples: int, seq_len: int, batch: int, all_experts: bool = False) -> dict:
    """FLOPs and bytes of a whole run: per layer, ``arms`` tuning loops of ``iters`` iterations on ``batch``
    sequences, held-out evaluations (forward of the held-out sequences every ``holdout_every`` iterations), three
    one-off forwards over every calibration token (targets, counts, propagation), and llm-compressor's sequential
    pipeline's own two passes over every token (calibration and propagation; with ``moe_calibrate_all_experts``
    every expert runs on every token)."""
    # the plain arm runs the block only; the router arm (and an ungated router objective) also the next block's
    # attention and router
    plain = iteration_cost(s, batch, seq_len, "block")
    routed = iteration_cost(s, batch, seq_len, c.scope)
    if c.arms > 1:
        loop_flops = c.iters * (plain["flops"] + c.router_fraction * routed["flops"])
        loop_bytes = c.iters * (plain["bytes"] + c.router_fraction * routed["bytes"])
    else:
        loop_flops, loop_bytes = c.iters * routed["flops"], c.iters * routed["bytes"]
    fwd_seq = iteration_cost(s, 1, seq_len, "block")["flops"] / 3  # one sequence, forward of the block only
    held = max(int(samples * c.holdout), 0)
    evals = c.iters // c.holdout_every + 1
    mult = 3 if s.gated else 2
    inflation = 2 * seq_len * (s.experts - s.top_k) * mult * s.hidden * s.expert_inter if all_experts else 0
    pipeline = 2 * samples * (fwd_seq + inflation) if c.pipeline_passes else 0
    # the LM head: a held-out sequence through the remaining layers (L/2 on average, a sequence's forward each) and
    # the LM head (2 T h V); at every held-out evaluation (iteration_on lm_head), or for the arm decision only (the
    # unquantized side once, each arm's kept decision once)
    tail = (s.layers / 2 * fwd_seq + 2 * seq_len * s.hidden * s.vocab) if c.lm_head else 0
    tail_evals = c.arms * evals if c.lm_head_iterations else (c.arms + 1 if c.lm_head else 0)
    flops = s.layers * (loop_flops + c.loops * evals * held * fwd_seq + tail_evals * held * tail
                        + 3 * samples * fwd_seq + pipeline)
    bytes_ = s.layers * loop_bytes
    # launch-bound host time of the tuning loops (the GPU waits on it when it exceeds the arithmetic)
    launch = s.layers * c.loops * c.iters * c.ops * SECONDS_PER_OP
    return {"flops": flops, "bytes": bytes_, "launch_s": launch}


# data-parallel calibration (llm-compressor's torchrun oneshot, routealign's reductions). Link bandwidths are
# on paper: NCCL all-reduce bus bandwidth seen in public nccl-tests on 8-GPU NVLink/NVSwitch nodes (H100/H200 ~360-
# 480 GB/s), PCIe gen5 x16 peer-to-peer ~25 GB/s; not measured here.
LINKS = {"nvlink": 360e9, "pcie": 25e9}
GROUP = 128  # W4A16 group size: two clip parameters per group of a tuned weight


def expected_max_share(samples: int, ranks: int, batch: int, holdout: float, draws: int = 400) -> float:
    """Mean over minibatches of the most sequences any rank holds of one minibatch: llm-compressor's contiguous
    partition of the (canonically ordered) calibration set, a random held-out part, minibatches drawn over the rest
    (``CyclicBatches``). Every step waits for the busiest rank."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(samples, generator=g)
    train = perm[int(samples * holdout):]
    owner = torch.tensor([next(r for r in range(ranks) if (samples * (r + 1)) // ranks > i) for i in range(samples)])
    worst = []
    while len(worst) < draws:
        order = train[torch.randperm(train.numel(), generator=g)]
        for i in range(0, order.numel() - batch + 1, batch):
            worst.append(int(torch.bincount(owner[order[i:i + batch]], minlength=ranks).max()))
    return sum(worst[:draws]) / draws


def ddp_run_cost(s: Shape, c: Config, samples: int, seq_len: int, batch: int, ranks: int, spec: dict,
                 link: float, overhead: float) -> dict:
    """Per rank, one whole run with ``ranks`` data-parallel ranks: time, all-reduce traffic and memory.

    - Time: the tuning steps' matmuls scale with the busiest rank's share of each minibatch
      (:func:`expected_max_share`); the held-out evaluations, the one-off passes and llm-compressor's pipeline split
      evenly; the per-weight work of fake quantization and the signed step does not split (every rank steps every
      parameter). The gradients' all-reduce adds ``2 (R-1)/R x bytes / link`` per step (ring), not overlapped.
    - Traffic per step: the rounding offsets' gradients (one float32 per tuned weight) and the clip parameters' (two
      per group of 128); twice that when the router term is balanced (``router_balance``: the MSE and router
      gradients are reduced apart), plus a few scalars (losses, token counts).
    - GPU memory: the tuned block's tuning state per weight from ``routealign.modifiers.rounding.memory`` (the
      formula the modifier plans chunks with, measured in tests/test_memory.py), plus, under more than one rank with
      the router term balanced, the MSE and router gradients reduced apart (two more float32 sets: 8 bytes; not
      measured), the next block's weights (scope next), the activations of this rank's share of a minibatch. Host memory: the model
      in bfloat16 once per node (compressed-tensors' shared CPU offload) and per rank its calibration streams
      (quantized and unquantized inputs, unquantized outputs: 3 x S/R x T x h float32).
    """
    step = iteration_cost(s, batch, seq_len, c.scope)
    tuned = step["tuned_params"]
    share = expected_max_share(samples, ranks, batch, c.holdout) / batch
    one_rank = run_cost(s, c, samples, seq_len, batch)
    per_weight = s.layers * c.arms * c.iters * tuned * 4 * 10  # fake quant and step: bytes, every rank
    matmul_flops = one_rank["flops"] - 0  # all FLOPs are matmul/attention work on tokens
    step_flops = s.layers * c.arms * c.iters * step["flops"]
    rest_flops = matmul_flops - step_flops
    compute = (step_flops * share + rest_flops / ranks) / spec[c.dtype]
    memory_time = per_weight / spec["hbm"]
    balanced = c.arms > 1 or c.scope == "next"
    grad_floats = (tuned + 2 * tuned // GROUP) * (2 if balanced else 1)
    step_bytes = grad_floats * 4
    ring = 2 * (ranks - 1) / ranks * step_bytes if ranks > 1 else 0.0
    comm = s.layers * c.arms * c.iters * ring / link
    seconds = (max(compute, memory_time)) * overhead + comm
    next_block = (attention_params(s) + s.hidden * s.experts) * 4 if c.scope == "next" else 0
    act = step["bytes"] - tuned * 4 * 10  # activation bytes of the whole minibatch
    from routealign.modifiers.rounding.memory import bytes_per_tuned

    gpu = tuned * (bytes_per_tuned(2, c.arms, balanced) + (8 if balanced and ranks > 1 else 0)) + next_block \
        + act * share
    total_params = s.total_params or s.layers * (tuned + s.hidden * s.experts) + 2 * s.vocab * s.hidden
    host_node = total_params * 2
    host_rank = 3 * (samples / ranks) * seq_len * s.hidden * 4
    return {"seconds": seconds, "compute_s": compute * overhead, "memory_s": memory_time * overhead,
            "allreduce_s": comm, "allreduce_MB_per_step": step_bytes / 1e6, "sent_MB_per_step": ring / 1e6,
            "busiest_share": share, "gpu_GB": gpu / 1e9, "host_GB_node": host_node / 1e9,
            "host_GB_rank": host_rank / 1e9}


def memory_rows(s: Shape, budgets: tuple[float, ...] = (80, 141)) -> list[dict]:
    """Tuning memory of one MoE layer (bf16 model) from ``routealign.modifiers.rounding.memory`` (the formula the
    modifier plans ``max_tuning_gib`` chunks with), beside the layer's own bf16 weights, which are onloaded while it
    is tuned, and the largest expert chunk that fits each GPU memory budget (GB) with them."""
    from routealign.modifiers.rounding.memory import GIB, layer_bytes

    mult = 3 if s.gated else 2
    per_expert = mult * s.hidden * s.expert_inter
    other = attention_params(s) + mult * s.hidden * s.shared_inter
    layer_weights = 2 * (per_expert * s.experts + other)
    rows = []
    for label, arms, router in (("plain (one arm)", 1, False), ("fast (router term, one arm)", 1, True),
                                ("default (both arms)", 2, True)):
        whole = layer_bytes(per_expert, s.experts, other, 2, arms, router=router)
        fits = {}
        for budget in budgets:
            room = budget * 1e9 - layer_weights
            fits[budget] = next((k for k in range(s.experts, 0, -1)
                                 if layer_bytes(per_expert, s.experts, other, 2, arms, k, router) <= room), 0)
        rows.append({"model": s.name, "config": label, "tuning_GB": whole / 1e9, "layer_weights_GB": layer_weights / 1e9,
                     "chunk_fits": fits, "max_tuning_gib": {b: (b * 1e9 - layer_weights) / GIB for b in budgets}})
    return rows


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
    parser.add_argument("--ranks", type=int, action="append", default=[],
                        help="with --gpu: predict data-parallel runs with this many ranks (one GPU each)")
    parser.add_argument("--link", choices=sorted(LINKS), default="nvlink", help="with --ranks: the GPUs' interconnect")
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
                                    "launch_min": cost["launch_s"] / 60,
                                    "predicted_min": max(floor * args.overhead, cost["launch_s"]) / 60})
    if predictions:
        print(f"\n| GPU | model | configuration | PFLOP | arithmetic floor | launches (x {SECONDS_PER_OP * 1e6:.1f} us) "
              f"| predicted (max of x{args.overhead} floor, launches) |")
        print("|---|---|---|---|---|---|---|")
        for p in predictions:
            print(f"| {p['gpu']} | {p['model']} | {p['config']} | {p['PFLOP']:.1f} | {p['floor_min']:.1f} min | "
                  f"{p['launch_min']:.1f} min | {p['predicted_min']:.1f} min |")
    memory = [row for shape in shapes for row in memory_rows(shape)] if args.gpu else []
    if memory:
        print("\n| model | configuration | tuning state, all experts at once (GB) | the layer's bf16 weights (GB) | "
              "largest expert_chunk within 80 GB / 141 GB |")
        print("|---|---|---|---|---|")
        for m in memory:
            fits = " / ".join(str(m["chunk_fits"][b] or "none") for b in (80, 141))
            print(f"| {m['model']} | {m['config']} | {m['tuning_GB']:.1f} | {m['layer_weights_GB']:.1f} | {fits} |")
    ddp = []
    for gpu in args.gpu:
        spec = GPUS[gpu]
        for shape in shapes:
            for ranks in args.ranks:
                for label, config in CONFIGS.items():
                    if config.name not in ("default", "plain"):
                        continue
                    cost = ddp_run_cost(shape, config, args.samples, args.seq_len, args.batch, ranks, spec,
                                        LINKS[args.link], args.overhead)
                    ddp.append({"gpu": spec["name"], "model": shape.name, "ranks": ranks, "config": config.name,
                                **cost})
    if ddp:
        print(f"\n| GPU | model | ranks | config | predicted h per rank | all-reduce per step (sent) | all-reduce h "
              f"({args.link}) | busiest share | GPU GB per rank | host GB (node + per rank) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for d in ddp:
            fits = "" if d["gpu_GB"] <= 141 else " (over 141)"
            print(f"| {d['gpu']} | {d['model']} | {d['ranks']} | {d['config']} | {d['seconds'] / 3600:.1f} | "
                  f"{d['allreduce_MB_per_step']:.0f} MB ({d['sent_MB_per_step']:.0f} MB) | "
                  f"{d['allreduce_s'] / 3600:.2f} | {d['busiest_share']:.2f} | {d['gpu_GB']:.1f}{fits} | "
                  f"{d['host_GB_node']:.0f} + {d['host_GB_rank']:.1f} |")
    print(json.dumps({"per_iteration": rows, "predictions": predictions, "memory": memory, "data_parallel": ddp},
                     indent=1))


if __name__ == "__main__":
    main()
