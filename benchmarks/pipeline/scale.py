"""Real MoE shapes, one layer at a time: seconds per layer, peak memory, the projected whole-model time, and the aten
operations and host reads per tuning iteration, for routealign's recipes and llm-compressor's GPTQModifier and
AutoRoundModifier, each in its own process on the same random-weight model and the same calibration tokens.

    # GPU: a Qwen3-30B-A3B-shaped model (its published config values), 2 decoder layers, 128 x 512 tokens
    python benchmarks/pipeline/scale.py --preset qwen3-30b-a3b --layers 2 --methods fast default gptq --out /tmp/scale
    # any config.json (its dimensions; weights random)
    python benchmarks/pipeline/scale.py --config path/to/config.json --layers 2 --out /tmp/scale
    # CPU, scaled dimensions (hidden 256, expert 128, 4 heads), the preset's experts and top-k
    python benchmarks/pipeline/scale.py --preset qwen3-30b-a3b --scaled --samples 16 --seq-len 64 --out /tmp/scale
    # operations and host reads per tuning iteration at 16 and 128 experts (CPU, scaled; no timing)
    python benchmarks/pipeline/scale.py --preset qwen3-30b-a3b --scaled --count --experts 16 128 --out /tmp/count

What is measured, per method (one process each, the model loaded before the clock starts):

- ``oneshot_s``: llm-compressor's ``oneshot`` wall time (the pipeline's own passes included);
- ``layer_s``: routealign's per-layer seconds (tuning, targets, propagation; from the modifier's report) and
  ``projected_min``: the slowest tuned layer times the real model's layer count (the ``--layers`` built here are
  all MoE layers of the preset's shape);
- ``peak_gpu_gib`` (``torch.cuda.max_memory_allocated``) or ``peak_rss_growth_gib`` (CPU: peak RSS minus RSS
  before ``oneshot``) and per tuned element of one layer (``bytes_per_tuned``);
- with ``--count``: dispatched aten operations (``TorchDispatchMode``, what the autograd engine and every call
  send to the kernels: on a GPU each is at least one kernel launch) and host reads (``item``/``float``/``int``,
  ``nonzero``, ``tolist``: on a GPU each waits for the device) per tuning iteration, from two whole ``oneshot``
  runs at ``--count-iters`` a and b (the difference divided by (b - a) and the layers). The held-out evaluations
  cancel out (both runs make the same number).

Nothing here is a test; ``benchmarks/RESULTS.md`` records what it printed, with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# published config.json values (the real model's layer count is `layers`; the model built has --layers of them)
PRESETS: dict[str, tuple[str, dict, int]] = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                        intermediate_size=6144, norm_topk_prob=True, vocab_size=151_936), 48),
    "glm-4.5-air": ("glm4_moe", dict(hidden_size=4096, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                                     n_routed_experts=128, num_experts_per_tok=8, moe_intermediate_size=1408,
                                     n_shared_experts=1, intermediate_size=10944, first_k_dense_replace=0, n_group=1,
                                     topk_group=1, partial_rotary_factor=0.5, routed_scaling_factor=1.0,
                                     norm_topk_prob=True, vocab_size=151_552), 46),
    "deepseek-v3": ("deepseek_v3", dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,
                                        n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048,
                                        n_shared_experts=1, intermediate_size=18432, first_k_dense_replace=0,
                                        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                        v_head_dim=128, head_dim=64, n_group=8, topk_group=4,
                                        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=False,
                                        vocab_size=129_280), 61),
}

# --scaled: dimensions a 2-core CPU affords, multiples of 128 where group-128 schemes need them; experts and top-k
# (what the operation counts depend on) stay the preset's
SCALED = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=64, moe_intermediate_size=128,
              intermediate_size=512, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
              v_head_dim=64, vocab_size=1024)

IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
METHODS = ("fast", "default", "plain", "gptq", "autoround")
RECIPES = {"fast": "vsraq_w4a16_fast.yaml", "default": "vsraq_w4a16.yaml", "plain": "autoround_w4a16.yaml"}
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "equal", "is_nonzero")


def build_config(args):
    from transformers import AutoConfig

    if args.config:
        raw = json.loads(Path(args.config).read_text())
        model_type, fields, real_layers = raw.pop("model_type"), raw, raw.get("num_hidden_layers", args.layers)
        fields.pop("architectures", None)
        fields.pop("quantization_config", None)
    else:
        model_type, fields, real_layers = PRESETS[args.preset]
        fields = dict(fields)
    if args.scaled:
        fields.update({k: v for k, v in SCALED.items() if k in fields or k in ("vocab_size",)})
        if model_type == "deepseek_v3":
            fields["num_key_value_heads"] = fields["num_attention_heads"] = 4
    if args.experts is not None:
        key = next(k for k in ("num_experts", "n_routed_experts", "num_local_experts") if k in fields)
        fields[key] = args.experts
        if "n_group" in fields and fields[key] % fields["n_group"]:
            fields["n_group"] = fields["topk_group"] = 1
    if args.vocab:
        fields["vocab_size"] = args.vocab
    for item in args.set or []:
        key, _, value = item.partition("=")
        fields[key] = json.loads(value)
    fields.update(num_hidden_layers=args.layers, max_position_embeddings=max(4096, args.seq_len),
                  tie_word_embeddings=False)
    if model_type == "glm4_moe":
        fields["first_k_dense_replace"] = 0
    return AutoConfig.for_model(model_type, **fields), real_layers


def build_model(args, folder: Path) -> dict:
    """A random-weight model of the config in ``folder`` (safetensors, a byte-level tokenizer), built once."""
    from transformers import AutoModelForCausalLM

    from routealign.tiny import byte_tokenizer

    config, real_layers = build_config(args)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # a router that prefers some experts, as trained ones do
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    info = {"model_type": config.model_type, "real_layers": real_layers, "layers": args.layers,
            "params": sum(p.numel() for p in model.parameters())}
    (folder / "scale.json").write_text(json.dumps(info))
    return info


def recipe_dir() -> Path:
    from routealign.recipes import path

    return path("vsraq_w4a16").parent


def modifiers(method: str, iters: int | None):
    """The recipe of ``method``: routealign's shipped recipe files, llm-compressor's modifiers at W4A16."""
    if method in RECIPES:
        import yaml

        from routealign import RouterAlignedRoundingModifier

        stage = yaml.safe_load((recipe_dir() / RECIPES[method]).read_text())["quant_stage"]["quant_modifiers"]
        fields = dict(stage["RouterAlignedRoundingModifier"])
        if iters is not None:
            fields["iters"] = iters
        return [RouterAlignedRoundingModifier(**fields)]
    from llmcompressor.modifiers.quantization import GPTQModifier

    if method == "gptq":
        return [GPTQModifier(scheme="W4A16", targets="Linear", ignore=IGNORE)]
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    return [AutoRoundModifier(scheme="W4A16", targets="Linear", ignore=IGNORE, iters=iters or 200,
                              enable_torch_compile=False)]


class Counter:
    """Counts dispatched aten operations and host reads (``TorchDispatchMode``; ``Tensor.tolist`` patched)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                name = func.__name__.split(".")[0]
                if name in SYNC_OPS:
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.ops = self.syncs = 0

    def __enter__(self):
        original = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs += 1
            return original(t)

        self._original = original
        torch.Tensor.tolist = tolist
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self._original


def worker(args) -> dict:
    """One method, one process: ``oneshot`` on the model in ``--model-dir``; a JSON row."""
    torch.set_num_threads(args.threads)
    import routealign  # noqa: F401
    from transformers import AutoModelForCausalLM

    from routealign.calibration import oneshot_windows

    info = json.loads((args.model_dir / "scale.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    first = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
    # the layer's weight matrices (fused 3-D experts included: linearized inside oneshot), routers left out
    tuned = sum(p.numel() for n, p in first.named_parameters() if p.ndim >= 2
                and not n.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "router.weight")))
    del first
    mods = modifiers(args.worker, args.iters)
    memory = LayerMemory()
    if args.worker in RECIPES:
        from routealign import RouterAlignedRoundingModifier

        memory.wrap(RouterAlignedRoundingModifier)
    all_experts = args.worker in ("gptq", "autoround") and not args.routed_only
    row = {"method": args.worker, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "threads": args.threads, "dtype": args.dtype, "samples": args.samples,
           "seq_len": args.seq_len, "layers": info["layers"], "real_layers": info["real_layers"],
           "tuned_per_layer": tuned, "moe_calibrate_all_experts": all_experts}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_gib()
    counter = Counter() if args.count_run else None
    start = time.perf_counter()
    if counter is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, counter:
            oneshot_windows(model, mods, ids, moe_calibrate_all_experts=all_experts)
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        row["profiler_aten"] = len(events)  # every aten call torch.profiler records, nested ones included
        row["profiler_aten_top"] = sum(1 for e in events if not _aten_parent(e))  # called from Python
    else:
        oneshot_windows(model, mods, ids, moe_calibrate_all_experts=all_experts)
    if device == "cuda":
        torch.cuda.synchronize()
    row["oneshot_s"] = round(time.perf_counter() - start, 3)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["bytes_per_tuned"] = round(peak * 2**30 / tuned, 2)
    else:
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - rss0
        row["peak_rss_growth_gib"] = round(growth, 3)
        row["bytes_per_tuned"] = round(growth * 2**30 / tuned, 2)
    report = getattr(mods[-1], "report", None)
    if report:
        row["layer_s"] = [r["seconds"] for r in report]
        row["router"] = [r["router"] for r in report]
        # the last layer has no next router (no router arm): the first is the representative one
        row["projected_min"] = round(row["layer_s"][0] * info["real_layers"] / 60, 2)
        row["loops"] = sum(max(len(r.get("arms") or {}), 1) for r in report)  # tuning loops run, all layers
    else:
        row["projected_min"] = round(row["oneshot_s"] / info["layers"] * info["real_layers"] / 60, 2)
    if counter is not None:
        row["ops"], row["syncs"] = counter.ops, counter.syncs
    if memory.rows:
        row["tuning_memory"] = memory.rows
        row["tuning_bytes_per_tuned"] = max(r["bytes_per_tuned"] for r in memory.rows)
    return row


def _aten_parent(event) -> bool:
    """Whether a profiler event runs inside another aten operation (e.g. aten::mm inside aten::linear)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


class LayerMemory:
    """Peak memory of each layer's tuning above what was allocated when it started: CUDA's allocator statistics, or
    on the CPU the resident set sampled every millisecond (the worker runs with glibc's mmap threshold at 64 KiB, so
    freed tensors leave the resident set at once and it follows the live tensors)."""

    def __init__(self):
        self.rows = []

    def wrap(self, modifier_cls):
        original = modifier_cls._tune_layer
        monitor = self

        def tune_layer(mod, model, block):
            tuned = sum(m.weight.numel() for n, m in block.named_modules()
                        if isinstance(m, torch.nn.Linear) and not n.endswith(("mlp.gate", "shared_expert_gate")))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
                original(mod, model, block)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - start
            else:
                import threading

                start, peak, done = _rss_bytes(), [0], threading.Event()

                def sample():
                    while not done.is_set():
                        peak[0] = max(peak[0], _rss_bytes())
                        done.wait(0.001)

                thread = threading.Thread(target=sample, daemon=True)
                thread.start()
                try:
                    original(mod, model, block)
                finally:
                    done.set()
                    thread.join()
                peak = max(peak[0], _rss_bytes()) - start
            monitor.rows.append({"tuned": tuned, "peak_bytes": peak, "bytes_per_tuned": round(peak / tuned, 2)})

        modifier_cls._tune_layer = tune_layer


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_worker(args, method: str, model_dir: Path, out: Path, iters: int | None = None, count: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--model-dir", str(model_dir), "--samples",
           str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--dtype", args.dtype,
           "--seed", str(args.seed), "--row", str(out)]
    if iters is not None:
        cmd += ["--iters", str(iters)]
    if count:
        cmd.append("--count-run")
    if args.routed_only:
        cmd.append("--routed-only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if count:  # the operations a GPU run dispatches: its chunking of the elementwise passes over tuned weights
        env["ROUTEALIGN_PIECE_ELEMENTS"] = str(1 << 26)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.exists():
        return {"method": method, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(out.read_text())


def table(rows: list[dict], count: bool) -> str:
    if count:
        head = ("| method | experts | tuning loops | dispatched ops per loop iteration | torch.profiler aten calls "
                "(all / called from Python) | host reads per loop iteration |\n|---|---|---|---|---|---|\n")
        return head + "\n".join(f"| {r['method']} | {r.get('experts')} | {r.get('loops', '-')} | "
                                f"{r.get('ops_per_iter', r.get('error', '-')[-80:])} | "
                                f"{r.get('profiler_aten_per_iter', '-')} / {r.get('profiler_top_per_iter', '-')} | "
                                f"{r.get('syncs_per_iter', '-')} |" for r in rows)
    head = ("| method | oneshot s | s per layer | projected whole model, min | peak memory GiB | "
            "bytes per tuned element (whole run) | tuning peak, bytes per tuned element |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        mem = r.get("peak_gpu_gib", r.get("peak_rss_growth_gib"))
        per_layer = ", ".join(f"{s:.1f}" for s in r.get("layer_s", [])) or "-"
        lines.append(f"| {r['method']} | {r['oneshot_s']:.1f} | {per_layer} | {r['projected_min']} | {mem} | "
                     f"{r['bytes_per_tuned']} | {r.get('tuning_bytes_per_tuned', '-')} |")
    return head + "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    parser.add_argument("--config", help="a config.json instead of a preset (its dimensions; random weights)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (all MoE)")
    parser.add_argument("--scaled", action="store_true", help="CPU dimensions (hidden 256, expert 128, 4 heads)")
    parser.add_argument("--experts", type=int, nargs="*", help="override the number of experts (several: one model "
                                                               "each, e.g. --count --experts 16 128)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (0: the preset's); only the LM head "
                                                                "and embedding depend on it")
    parser.add_argument("--set", action="append", metavar="KEY=JSON",
                        help="override a config field, e.g. --set hidden_size=512 --set moe_intermediate_size=256")
    parser.add_argument("--methods", nargs="+", default=["fast", "default", "gptq"], choices=METHODS)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iters", type=int, help="override the recipes' iterations")
    parser.add_argument("--count", action="store_true", help="operations and host reads per tuning iteration")
    parser.add_argument("--count-iters", type=int, nargs=2, default=(2, 4))
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--routed-only", action="store_true",
                        help="llm-compressor's baselines without moe_calibrate_all_experts (default: with it, as "
                             "its MoE examples run them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.worker:
        row = worker(args)
        args.row.write_text(json.dumps(row, indent=1))
        return 0
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for experts in (args.experts or [None]):
        args_e = argparse.Namespace(**{**vars(args), "experts": experts})
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            folder = Path(tmp) / "model"
            info = build_model(args_e, folder)
            print(f"model: {info}", flush=True)
            for method in args.methods:
                if args.count:
                    a, b = args.count_iters
                    runs = [run_worker(args, method, folder, args.out / f"{method}-{experts}-{i}.json", i, count=True)
                            for i in (a, b)]
                    if any("error" in r for r in runs):
                        row = next(r for r in runs if "error" in r)
                    else:
                        # per iteration of one tuning loop (a layer of the default recipe runs two: both arms)
                        loops = runs[1].get("loops") or info["layers"]
                        per = lambda key, digits=0: round((runs[1][key] - runs[0][key]) / (b - a) / loops,  # noqa: E731
                                                          digits or None)
                        row = {"method": method, "experts": experts or "preset", "loops": loops,
                               "ops_per_iter": per("ops"), "syncs_per_iter": per("syncs", 2),
                               "profiler_aten_per_iter": per("profiler_aten"),
                               "profiler_top_per_iter": per("profiler_aten_top"), "runs": runs}
                else:
                    row = run_worker(args, method, folder, args.out / f"{method}-{experts}.json", args.iters)
                    row["experts"] = experts or "preset"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1))
    text = table(rows, args.count)
    (args.out / "scale.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
