"""Quantize an MoE with a routealign recipe under llm-compressor's data-parallel oneshot (torchrun).

    torchrun --nproc_per_node N examples/quantize_ddp.py --model DIR --recipe vsraq_w4a16 \
        --data FILE.txt --samples 128 --seq-len 512 --out OUT

llm-compressor's flow (docs/guides/big_models_and_distributed/distributed_oneshot.md): every rank joins the process
group, rank 0 loads the weights into CPU memory the ranks share (``load_offloaded_model``, ``device_map=
"auto_offload"``), every rank builds the same calibration windows and ``oneshot`` gives each rank its part of them;
every rank calls the save, rank 0 writes the checkpoint (atomically: ``OUT`` is absent or complete). Without an
accelerator the ranks join with gloo (compressed-tensors 0.19.0's ``init_dist()`` needs one). With
``--nproc_per_node 1`` this is the single-process run. ``routealign quantize`` does the same when started by torchrun.
"""

import argparse
import time
from pathlib import Path

import torch
from compressed_tensors.offload import load_offloaded_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import routealign  # noqa: F401  (registers the modifiers with llm-compressor)
from routealign import recipes
from routealign.calibration import oneshot_windows
from routealign.checkpoint import save_compressed
from routealign.distributed import init_distributed, rank, world_size
from routealign.preflight import check_checkpoint
from routealign.textdata import calibration_windows, encode_text, find_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--recipe", required=True, help="a shipped recipe's name or a YAML file")
    ap.add_argument("--data", required=True, type=Path, help="calibration text (.txt, or .jsonl with a 'text' field)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: torch's default)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    init_distributed()  # a no-op when not started by torchrun
    start = time.perf_counter()
    tokenizer_file = find_tokenizer(args.model)
    windows = calibration_windows(encode_text(args.data, tokenizer_file), args.samples, args.seq_len, args.seed)
    torch.manual_seed(args.seed)
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=getattr(torch, args.dtype),
                                                     device_map="auto_offload")
    oneshot_windows(model, str(recipes.resolve(args.recipe)), windows)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_file.parent))
    save_compressed(model, args.out, tokenizer=tokenizer, input_dir=args.model)
    seconds = time.perf_counter() - start
    if rank() != 0:
        return 0
    report = check_checkpoint(args.out)
    print(report.table())
    print(f"{world_size()} rank(s): quantized and saved in {seconds:.1f} s -> {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
