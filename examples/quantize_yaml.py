"""Quantize with a YAML recipe (compose routealign's modifier with llm-compressor's own in one file).

    python examples/quantize_yaml.py --model ../shared/models/tiny-glm4_moe --recipe vsraq_nvfp4 \
        --text ../shared/data/wikitext-2/wiki.train.tokens --out glm-vsraq-nvfp4

`import routealign` must come before `oneshot`: llm-compressor resolves YAML modifier names only through its
ModifierFactory, where routealign registers RouterAlignedRoundingModifier.
"""

import argparse

import torch
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

import routealign  # noqa: F401
from routealign import recipes
from routealign.calibration import windows_dataset
from routealign.checkpoint import save_compressed
from routealign.preflight import check_checkpoint
from routealign.textdata import calibration_windows, encode_text, find_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--recipe", required=True)
parser.add_argument("--text", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
args = parser.parse_args()

ids = encode_text(args.text, find_tokenizer(args.model))
calib = calibration_windows(ids, n=128, seq_len=512, seed=0)
dataset = windows_dataset(calib)  # input_ids + attention_mask columns, as oneshot(dataset=...) takes
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
oneshot(model=model, dataset=dataset, recipe=str(recipes.resolve(args.recipe)), num_calibration_samples=128, max_seq_length=512,
        moe_calibrate_all_experts=False)
# written to a staging folder and renamed into place when complete; refuses to replace --out without --overwrite
save_compressed(model, args.out, tokenizer=AutoTokenizer.from_pretrained(args.model), overwrite=args.overwrite)
report = check_checkpoint(args.out)  # the vLLM pre-flight check (also: `routealign check OUT`)
print(report.table())
