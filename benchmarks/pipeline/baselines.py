"""Reproduce rows of the baseline table in ../shared/models/README.md with llm-compressor's own modifiers.

Protocol (the README's): evaluation on the first 64 x 512 ids of wiki.test.tokens (each line encoded as line + "\\n"
with the model's tokenizer.json, no special tokens), model in bf16; calibration (for schemes that need it) on 128
windows of 512 ids at random offsets (numpy default_rng(0)) of wiki.train.tokens encoded the same way; targets
"Linear", ignore lm_head and the routers; defaults otherwise (moe_calibrate_all_experts=True).

    python benchmarks/pipeline/baselines.py --model ../shared/models/tiny-qwen3_moe --scheme W4A16 --out /tmp/bench

Writes, per scheme, the compressed checkpoint, routealign's eval report (JSON, markdown, plots) and a summary
row to ``baselines.json`` / ``baselines.md`` in --out, with machine, versions and thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def quantize(model_dir: Path, out_dir: Path, scheme: str, calib: torch.Tensor | None) -> float:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    from routealign.calibration import oneshot_windows

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head", "re:.*mlp.gate$"])
    start = time.perf_counter()
    if calib is None:
        oneshot(model=model, recipe=recipe)
    else:
        oneshot_windows(model, recipe, calib)
    seconds = time.perf_counter() - start
    model.save_pretrained(str(out_dir), save_compressed=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--scheme", nargs="+", default=["W4A16"])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/wikitext-2")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from routealign.checkpoint import load_model
    from routealign.evaluate import evaluate
    from routealign.report import write_report
    from routealign.textdata import calibration_windows, encode_text, eval_rows, find_tokenizer

    tokenizer = find_tokenizer(args.model)
    eval_ids = eval_rows(encode_text(args.data / "wiki.test.tokens", tokenizer), 64, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = load_model(args.model, dtype=torch.bfloat16, device=device)
    rows = []
    for scheme in args.scheme:
        needs_calibration = scheme.upper().startswith("NVFP4") and scheme.upper() != "NVFP4A16"
        calib = calibration_windows(encode_text(args.data / "wiki.train.tokens", tokenizer), 128, 512) \
            if needs_calibration else None
        qdir = args.out / f"{args.model.name}-rtn-{scheme.lower()}"
        seconds = quantize(args.model, qdir, scheme, calib)
        quantized = load_model(qdir, dtype=torch.bfloat16, device=device)
        result = evaluate(reference, quantized, eval_ids, batch_size=4, perfect_routing=True)
        write_report(result, args.out / f"eval-{args.model.name}-rtn-{scheme.lower()}")
        ppl, mean = result.report["perplexity"], result.report["routing"]["mean"]
        rows.append({"model": args.model.name, "method": f"RTN {scheme} (QuantizationModifier)",
                     "oneshot_s": round(seconds, 2), "ppl_reference": ppl["reference"], "ppl": ppl["quantized"],
                     "ppl_perfect_routing": ppl["quantized_perfect_routing"],
                     **{k: mean[k] for k in ("overlap_at_k", "jaccard", "exact_set", "top1", "match_score")}})
        del quantized

    import compressed_tensors
    import llmcompressor
    import transformers

    meta = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": args.threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__}
    (args.out / "baselines.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ("oneshot_s", "ppl_reference", "ppl", "ppl_perfect_routing", "overlap_at_k", "jaccard", "exact_set",
            "top1", "match_score")
    lines = ["| model | method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | "
                     + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    text = "\n".join(lines) + f"\n\n{json.dumps(meta)}\n"
    (args.out / "baselines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
