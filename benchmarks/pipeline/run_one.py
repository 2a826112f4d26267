"""Quantize one model with one method and evaluate it (one process per run, so that wall time and peak memory
belong to that run alone). Used by compare.py; runnable by hand:

    python benchmarks/pipeline/run_one.py --model ../shared/models/tiny-qwen3_moe --method vsraq --scheme W4A16 \
        --seed 0 --out /tmp/bench/vsraq-w4a16-s0

Methods: rtn (QuantizationModifier), gptq (GPTQModifier), autoround (llm-compressor's AutoRoundModifier), awq
(llm-compressor's AWQModifier + QuantizationModifier), and routealign's RouterAlignedRoundingModifier objectives
none | topk_mse | kl | vsraq | expertquant. ``--smooth MODE`` puts routealign's ExpertAwareSmoothingModifier first.
Protocol: ../shared/models/README.md (calibration: windows of wiki.train.tokens at offsets from
numpy default_rng(seed); evaluation: first 64 x 512 ids of wiki.test.tokens, bf16).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

OURS = ("none", "topk_mse", "kl", "vsraq", "expertquant")
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]


def recipe(method: str, scheme: str, iters: int, seed: int, extra: dict, smooth: str | None = None,
           smooth_extra: dict | None = None, ignore: list[str] | None = None, group_size: int | None = None):
    steps = []
    if smooth:
        from routealign import ExpertAwareSmoothingModifier

        steps.append(ExpertAwareSmoothingModifier(mode=smooth, **(smooth_extra or {})))
    steps.append(quantizer(method, scheme, iters, seed, extra, ignore or [], group_size))
    return steps


def scheme_fields(scheme: str, group_size: int | None = None) -> dict:
    """The modifier fields that select ``scheme`` for every Linear: the preset by name, or with ``group_size`` the
    preset's weight arguments at that group size (``config_groups``)."""
    if group_size is None:
        return {"scheme": scheme, "targets": "Linear"}
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = preset_name_to_scheme(scheme, ["Linear"])
    preset.weights = preset.weights.model_copy(update={"group_size": group_size})
    return {"config_groups": {"group_0": preset.model_dump(exclude_none=True)}}


def calibrate_all_experts(method: str, scheme: str, group_size: int | None, requested: bool) -> bool:
    """Whether ``oneshot`` runs with llm-compressor's ``moe_calibrate_all_experts``: as asked, and always for
    llm-compressor's own methods at a scheme that quantizes activations. Its activation observers leave an expert that
    calibration routed no token to with an uninitialised ``input_global_scale`` (negative, zero, NaN on a 64-expert
    model: RESULTS section 14d); routealign's modifiers calibrate every expert themselves."""
    if requested or method in OURS or group_size is not None:
        return requested
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(scheme, ["Linear"]).input_activations is not None


def quantizer(method: str, scheme: str, iters: int, seed: int, extra: dict, ignore: list[str] = (),
              group_size: int | None = None):
    """The quantizing modifier(s) of ``method``; ``ignore``: extra modules every method leaves unquantized."""
    IGNORE = [*globals()["IGNORE"], *ignore]
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    fields = scheme_fields(scheme, group_size)

    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(**fields, ignore=IGNORE)]
    if method == "rtn":
        return QuantizationModifier(**fields, ignore=IGNORE)
    if method == "gptq":
        return GPTQModifier(**fields, ignore=IGNORE)
    if method == "autoround":
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        return AutoRoundModifier(**fields, ignore=IGNORE, iters=iters,
                                 enable_torch_compile=False)
    from routealign import RouterAlignedRoundingModifier

    return RouterAlignedRoundingModifier(objective=method, **fields, ignore=["lm_head", *ignore],
                                         iters=iters, seed=seed, **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--method", required=True, choices=("rtn", "gptq", "autoround", "awq") + OURS)
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--group-size", type=int, help="the scheme's weights at this group size (e.g. W2A16 at 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/wikitext-2")
    parser.add_argument("--train-text", type=Path, help="calibration text (default: DATA/wiki.train.tokens)")
    parser.add_argument("--test-text", type=Path, help="evaluation text (default: DATA/wiki.test.tokens)")
    parser.add_argument("--valid-text", type=Path,
                        help="also evaluate on this text (e.g. DATA/wiki.valid.tokens) and store it as row['valid']: "
                             "choose hyperparameters on it, never on the test text")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="also decode N tokens greedily with both models from --prompts prompts of the test text "
                             "(routealign.generation) and store the agreement as row['generation']")
    parser.add_argument("--perfect-routing", action="store_true",
                        help="also evaluate the quantized model with the reference's expert choices forced "
                             "(row['ppl_perfect_routing']: what routing alone costs)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--extra", default="{}", help="JSON of extra RouterAlignedRoundingModifier fields")
    parser.add_argument("--smooth", choices=("expertquant", "search"), help="ExpertAwareSmoothingModifier first")
    parser.add_argument("--smooth-extra", default="{}", help="JSON of extra ExpertAwareSmoothingModifier fields")
    parser.add_argument("--moe-calibrate-all-experts", action="store_true",
                        help="llm-compressor's default; off here unless given (routealign does not need it), "
                             "and on for llm-compressor's methods at schemes that quantize activations (NVFP4)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype the model is loaded in for quantization (evaluation is always bf16)")
    parser.add_argument("--ignore", action="append", default=[],
                        help="also leave this module pattern unquantized, every method (e.g. 're:.*kv_b_proj$' "
                             "for MLA models whose kv_b_proj input does not fit group 128); repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import routealign  # noqa: F401  (registers the modifiers)
    from transformers import AutoModelForCausalLM

    from routealign.calibration import oneshot_windows
    from routealign.checkpoint import load_model, save_compressed
    from routealign.evaluate import evaluate
    from routealign.textdata import calibration_windows, encode_text, eval_rows, find_tokenizer

    tokenizer = find_tokenizer(args.model)
    train_text = args.train_text or args.data / "wiki.train.tokens"
    test_text = args.test_text or args.data / "wiki.test.tokens"
    calib = calibration_windows(encode_text(train_text, tokenizer), args.samples, args.seq_len,
                                args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.method == "awq":
        # llm-compressor 0.14.0.1's AWQModifier pins its activation cache (pin_memory needs an accelerator);
        # pinning only speeds up host-to-device copies, so on a CPU-only machine it is skipped
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=getattr(torch, args.dtype))
    steps = recipe(args.method, args.scheme, args.iters, args.seed, json.loads(args.extra), args.smooth,
                   json.loads(args.smooth_extra), ignore=args.ignore, group_size=args.group_size)
    flat = [m for step in steps for m in (step if isinstance(step, list) else [step])]
    mod = flat[-1]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    all_experts = calibrate_all_experts(args.method, args.scheme, args.group_size, args.moe_calibrate_all_experts)
    if all_experts and not args.moe_calibrate_all_experts:
        print(f"{args.method} at {args.scheme} calibrates activations: --moe-calibrate-all-experts on "
              "(llm-compressor's default)", flush=True)
    start = time.perf_counter()
    oneshot_windows(model, flat, calib, moe_calibrate_all_experts=all_experts)
    seconds = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    qdir = args.out / "checkpoint"
    save_compressed(model, qdir, overwrite=True)
    del model

    ids = eval_rows(encode_text(test_text, tokenizer), args.eval_rows, args.eval_seq_len)
    reference = load_model(args.model, dtype=torch.bfloat16, device=device)
    quantized = load_model(qdir, dtype=torch.bfloat16, device=device)
    result = evaluate(reference, quantized, ids, batch_size=4, progress=False, perfect_routing=args.perfect_routing)
    mean = result.report["routing"]["mean"]
    valid = None
    if args.valid_text is not None:
        vids = eval_rows(encode_text(args.valid_text, tokenizer), args.eval_rows, args.eval_seq_len)
        vres = evaluate(reference, quantized, vids, batch_size=4, progress=False)
        vmean = vres.report["routing"]["mean"]
        valid = {"text": args.valid_text.name, "ppl_reference": vres.report["perplexity"]["reference"],
                 "ppl": vres.report["perplexity"]["quantized"], "overlap_at_k": vmean["overlap_at_k"],
                 "flip_rate": 1 - vmean["overlap_at_k"], "match_score": vmean["match_score"]}
    generation = None
    if args.generate:
        from routealign.generation import generation_agreement

        prompts = eval_rows(encode_text(test_text, tokenizer), args.prompts, args.prompt_len)
        generation = generation_agreement(reference, quantized, prompts, args.generate, progress=False).summary()
        generation["prompt_len"] = args.prompt_len
    row = {"model": args.model.name, "method": args.method, "scheme": args.scheme, "group_size": args.group_size,
           "seed": args.seed,
           "iters": args.iters if args.method not in ("rtn", "gptq", "awq") else None,
           "smooth": args.smooth, "smooth_extra": json.loads(args.smooth_extra), "ignore": args.ignore,
           "smoothing": getattr(flat[0], "report", None) if args.smooth else None,
           "extra": json.loads(args.extra), "moe_calibrate_all_experts": all_experts, "dtype": args.dtype,
           "samples": args.samples, "seq_len": args.seq_len,
           "eval_text": Path(test_text).name, "eval_rows": args.eval_rows, "oneshot_s": round(seconds, 2),
           "peak_rss_mib": round(peak_rss), "peak_gpu_mib": None if peak_gpu is None else round(peak_gpu),
           "ppl_reference": result.report["perplexity"]["reference"], "ppl": result.report["perplexity"]["quantized"],
           "ppl_perfect_routing": result.report["perplexity"].get("quantized_perfect_routing"),
           **{k: mean[k] for k in ("overlap_at_k", "jaccard", "exact_set", "top1", "match_score",
                                   "rank_weighted_jaccard", "routing_kl")},
           "flip_rate": 1 - mean["overlap_at_k"],
           "per_layer": [{"layer": r["layer"], "jaccard": r["jaccard"], "exact_set": r["exact_set"],
                          "flip_rate": 1 - r["overlap_at_k"]} for r in result.report["routing"]["per_layer"]],
           "valid": valid, "generation": generation,
           "layers": getattr(mod, "report", None), "device": device, "torch": torch.__version__}
    (args.out / "row.json").write_text(json.dumps(row, indent=2))
    print(json.dumps({k: v for k, v in row.items() if k != "layers"}))


if __name__ == "__main__":
    sys.exit(main())
