"""Routing agreement and perplexity of a quantized checkpoint against its reference (Python API of
`routealign eval`).

    python examples/evaluate.py --reference ../shared/models/tiny-qwen3_moe --quantized qwen-vsraq-w4a16 \
        --text ../shared/data/wikitext-2/wiki.test.tokens --out eval-qwen-vsraq
"""

import argparse

import torch

from routealign import evaluate, load_model
from routealign.report import markdown_table, write_report
from routealign.textdata import encode_text, eval_rows, find_tokenizer

parser = argparse.ArgumentParser()
parser.add_argument("--reference", required=True)
parser.add_argument("--quantized", required=True)
parser.add_argument("--text", required=True)
parser.add_argument("--out", default="routealign-eval")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
reference = load_model(args.reference, dtype=torch.bfloat16, device=device)
quantized = load_model(args.quantized, dtype=torch.bfloat16, device=device)  # decompressed faithfully
ids = eval_rows(encode_text(args.text, find_tokenizer(args.reference)), rows=64, seq_len=512)
result = evaluate(reference, quantized, ids, perfect_routing=True)
write_report(result, args.out)
print(markdown_table(result.report))
