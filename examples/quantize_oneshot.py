"""Quantize an MoE with VSRAQ W4A16 from Python and save a vLLM-ready compressed-tensors checkpoint.

    python examples/quantize_oneshot.py --model ../shared/models/tiny-qwen3_moe --text ../shared/data/wikitext-2/wiki.train.tokens --out qwen-vsraq-w4a16

Any local transformers MoE folder works (Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V3, GLM-4.5, ...). Calibration here is
128 windows of 512 tokens of a local text file, tokenized with the model's own tokenizer.
"""

import argparse

import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

import routealign  # noqa: F401  (registers RouterAlignedRoundingModifier with llm-compressor)
from routealign import RouterAlignedRoundingModifier
from routealign.calibration import windows_dataset
from routealign.checkpoint import save_compressed
from routealign.preflight import check_checkpoint
from routealign.textdata import calibration_windows, encode_text, find_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--text", required=True, help="calibration text")
parser.add_argument("--out", required=True)
parser.add_argument("--scheme", default="W4A16", help="W4A16, W4A16_ASYM, W3A16, NVFP4, NVFP4A16")
parser.add_argument("--objective", default="vsraq", help="none, topk_mse, kl, vsraq, expertquant")
parser.add_argument("--samples", type=int, default=128)
parser.add_argument("--seq-len", type=int, default=512)
parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
args = parser.parse_args()

ids = encode_text(args.text, find_tokenizer(args.model))
calib = calibration_windows(ids, n=args.samples, seq_len=args.seq_len, seed=0)
dataset = windows_dataset(calib)  # input_ids + attention_mask columns, as oneshot(dataset=...) takes

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
recipe = RouterAlignedRoundingModifier(objective=args.objective, scheme=args.scheme, targets="Linear",
                                       ignore=["lm_head"], iters=200)
# routealign's tuning routes each expert its own tokens; llm-compressor's all-experts calibration is not needed
oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=args.samples,
        max_seq_length=args.seq_len, moe_calibrate_all_experts=False)
# written to a staging folder and renamed into place when complete; refuses to replace --out without --overwrite
save_compressed(model, args.out, tokenizer=AutoTokenizer.from_pretrained(args.model), overwrite=args.overwrite)
report = check_checkpoint(args.out)  # the vLLM pre-flight check (also: `routealign check OUT`)
print(report.table())
for row in recipe.report:
    print(row["layer"], f"loss {row['loss_first']:.4g} -> {row['loss_best']:.4g}", f"{row['seconds']} s")
