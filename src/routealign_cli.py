"""The ``routealign`` console command's entry point.

It lives outside the ``routealign`` package on purpose: importing the package imports llm-compressor (several
seconds, and log lines that llm-compressor's logger writes to stdout). Here ``--help`` and ``--version`` answer
without that import, and the package is imported with stdout pointed at stderr, so llm-compressor's log sink is
stderr and stdout carries only the command's output (``routealign check --json`` is parseable).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

__all__ = ["main", "parser"]

DESCRIPTION = "Router-stable MoE quantization: quantize, check for vLLM, evaluate routing; recipes and a demo."
_DTYPES = ("bfloat16", "float16", "float32")



def _objective_names() -> tuple[str, ...]:
    """The router objectives, one module each in ``routealign/losses`` (read from the folder: the entry point imports
    nothing heavy)."""
    import importlib.util

    spec = importlib.util.find_spec("routealign")
    folder = Path(next(iter(spec.submodule_search_locations))) / "losses"
    found = sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base", "config")
                   and not p.stem.startswith("_"))
    return tuple(sorted(found, key=lambda n: (n != "none", n)))

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routealign")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="routealign", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"routealign {_version()}")
    sub = top.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="routing agreement and perplexity of a quantized model against its reference")
    ev.add_argument("--reference", required=True, help="unquantized model: a folder or a hub id (org/name)")
    ev.add_argument("--quantized", required=True, help="quantized (compressed-tensors) model: a folder or a hub id")
    ev.add_argument("--text", required=True, type=Path,
                    help="evaluation text: a text file, or a .jsonl file (the 'text' field of each record)")
    ev.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the reference folder's)")
    ev.add_argument("--rows", type=int, default=64, help="number of rows of --seq-len tokens (default 64)")
    ev.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    ev.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default 4)")
    ev.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="compute dtype (default bfloat16)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    ev.add_argument("--perfect-routing", action="store_true",
                    help="also run the quantized model with the reference model's expert choices forced")
    ev.add_argument("--generate", type=int, default=0, metavar="N",
                    help="also decode N tokens greedily with both models from --prompts prompts and report how long "
                         "the continuations agree (matched tokens, first divergence per prompt)")
    ev.add_argument("--prompts", type=int, default=16, help="prompts for --generate (default 16)")
    ev.add_argument("--prompt-len", type=int, default=64, help="tokens per --generate prompt (default 64)")
    ev.add_argument("--out", type=Path, default=Path("routealign-eval"), help="report folder")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    check = sub.add_parser("check", help="pre-flight: will this compressed-tensors checkpoint load in vLLM's MoE path? "
                                         "(exit 0: pass, 1: problems found, 2: not a readable checkpoint)")
    check.add_argument("checkpoint", help="saved checkpoint: a folder or a hub id (org/name)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    qz = sub.add_parser("quantize", help="oneshot a model with a recipe on calibration data, save it compressed "
                                         "(atomically) and check it for vLLM (exit 0: written and passes check, 1: "
                                         "written, check found problems, 2: bad input, nothing written)")
    qz.add_argument("model", help="unquantized model: a folder or a hub id (org/name[@revision]; never written to)")
    how = qz.add_mutually_exclusive_group()
    how.add_argument("--recipe", help="a shipped recipe's name (routealign recipes) or a recipe YAML file (a path wins)")
    how.add_argument("--scheme", help="W4A16 or NVFP4: the recipe recommended for it (the default: W4A16)")
    qz.add_argument("--iters", type=int, help="override the recipe's tuning iterations")
    qz.add_argument("--objective", choices=_objective_names(), help="override the recipe's router objective")
    data = qz.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path,
                      help="calibration text: a text file or .jsonl ('text' field); cut into --samples windows")
    data.add_argument("--dataset", help="a datasets.load_dataset name (e.g. HuggingFaceH4/ultrachat_200k), folder, or "
                                        "json/jsonl/parquet/csv file; chat 'messages' go through the chat template")
    qz.add_argument("--dataset-config", help="the dataset's configuration name")
    qz.add_argument("--split", default="train", help="the dataset's split (default train)")
    qz.add_argument("--column", help="the dataset's column (default: messages if present, else text)")
    qz.add_argument("--packing", action="store_true",
                    help="with --dataset: concatenate the samples and cut windows (default: each sample truncated "
                         "to --seq-len on its own, as llm-compressor's examples do)")
    qz.add_argument("--out", required=True, type=Path, help="output checkpoint folder")
    qz.add_argument("--samples", type=int, default=128, help="calibration windows or samples (default 128)")
    qz.add_argument("--seq-len", type=int, default=512, help="tokens per window, or the most per sample (default 512)")
    qz.add_argument("--seed", type=int, default=0, help="seed of the window offsets and of torch (default 0)")
    qz.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="dtype the model is loaded in")
    qz.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the model folder's)")
    qz.add_argument("--eval-text", type=Path, help="text to suggest for routealign eval (default: --data)")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    sub.add_parser("recipes", help="the shipped recipes, with what each does")

    demo = sub.add_parser("demo", help="end-to-end demo on a tiny built-in MoE and bundled text")
    demo.add_argument("--out", type=Path, default=Path("routealign-out"), help="working folder")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the tiny model's training, the calibration windows and the tuning (default 0)")
    demo.add_argument("--overwrite", action="store_true", help="replace the contents of an existing --out folder")
    return top


def main(argv: list[str] | None = None) -> int:
    """The ``routealign`` command: parse, import the package with stdout pointed at stderr, run the command."""
    args = parser().parse_args(argv)  # --help, --version and usage errors exit here, before any heavy import
    with contextlib.redirect_stdout(sys.stderr):
        from routealign import cli
    args.func = cli.COMMANDS[args.command]
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
