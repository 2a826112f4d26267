"""Command line: ``routealign eval``, ``routealign check`` and ``routealign demo``.

Errors on bad input print one line, ``routealign: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import RouteAlignError

__all__ = ["main"]

_DTYPES = ("bfloat16", "float16", "float32")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model, read_config
    from .textdata import encode_text, eval_rows, find_tokenizer
    from .evaluate import evaluate
    from .report import markdown_table, write_report

    # everything that can be checked cheaply is checked before the models load
    read_config(args.reference)
    read_config(args.quantized)
    tokenizer = find_tokenizer(args.reference, args.tokenizer)
    all_ids = encode_text(args.text, tokenizer)
    dtype = getattr(torch, args.dtype)
    device = _device(args.device)
    reference = load_model(args.reference, dtype=dtype, device=device)
    quantized = load_model(args.quantized, dtype=dtype, device=device)
    ids = eval_rows(all_ids, args.rows, args.seq_len,
                    vocab_size=reference.get_input_embeddings().num_embeddings, source=str(args.text))
    result = evaluate(reference, quantized, ids, batch_size=args.batch_size,
                      perfect_routing=args.perfect_routing, progress=not args.no_progress)
    result.report["paths"] = {"reference": str(args.reference), "quantized": str(args.quantized),
                              "text": str(args.text), "tokenizer": str(tokenizer)}
    result.report["settings"] = {"dtype": args.dtype, "device": device, "batch_size": args.batch_size}
    out = write_report(result, args.out)
    sys.stdout.write(markdown_table(result.report))
    sys.stdout.write(f"\nreport written to {out}/report.json, report.md and plots\n")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import json

    from .preflight import check_checkpoint

    report = check_checkpoint(args.checkpoint)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(report.table())
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, overwrite=args.overwrite)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routealign")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routealign", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"routealign {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="routing agreement and perplexity of a quantized model against its reference")
    ev.add_argument("--reference", required=True, type=Path, help="unquantized model folder")
    ev.add_argument("--quantized", required=True, type=Path, help="quantized (compressed-tensors) model folder")
    ev.add_argument("--text", required=True, type=Path, help="evaluation text file")
    ev.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the reference folder's)")
    ev.add_argument("--rows", type=int, default=64, help="number of rows of --seq-len tokens (default 64)")
    ev.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    ev.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default 4)")
    ev.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="compute dtype (default bfloat16)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ev.add_argument("--perfect-routing", action="store_true",
                    help="also run the quantized model with the reference model's expert choices forced")
    ev.add_argument("--out", type=Path, default=Path("routealign-eval"), help="report folder")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_eval)

    check = sub.add_parser("check", help="pre-flight: will this compressed-tensors checkpoint load in vLLM's MoE path? "
                                         "(exit 0: pass, 1: problems found, 2: not a readable checkpoint)")
    check.add_argument("checkpoint", type=Path, help="saved checkpoint folder")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser("demo", help="end-to-end demo on a tiny built-in MoE and bundled text")
    demo.add_argument("--out", type=Path, default=Path("routealign-out"), help="working folder")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the tiny model's training, the calibration windows and the tuning (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --out folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except RouteAlignError as exc:
        sys.stderr.write(f"routealign: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
