"""The commands behind ``routealign eval``, ``check``, ``quantize``, ``recipes`` and ``demo``.

The command's one entry point, its argument parser and its ``main()`` are :mod:`routealign_cli` (which imports
nothing heavy); :data:`COMMANDS` maps each subcommand to its function here and :func:`run` runs one.

Errors on bad input print one line, ``routealign: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InputError, RouteAlignError

__all__ = ["COMMANDS", "run"]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise InputError(f"--device {name}: no CUDA device is available (torch {torch.__version__}, {build}); "
                         f"use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return name


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model, read_config
    from .textdata import encode_text, eval_rows, find_tokenizer
    from .evaluate import evaluate
    from .report import markdown_table, write_report

    from .hub import resolve_model

    # everything that can be checked cheaply is checked before the models load
    device = _device(args.device)
    reference_dir = resolve_model(args.reference, "--reference")
    quantized_dir = resolve_model(args.quantized, "--quantized")
    read_config(reference_dir)
    read_config(quantized_dir)
    tokenizer = find_tokenizer(reference_dir, args.tokenizer)
    all_ids = encode_text(args.text, tokenizer)
    dtype = getattr(torch, args.dtype)
    reference = load_model(reference_dir, dtype=dtype, device=device)
    quantized = load_model(quantized_dir, dtype=dtype, device=device)
    ids = eval_rows(all_ids, args.rows, args.seq_len,
                    vocab_size=reference.get_input_embeddings().num_embeddings, source=str(args.text))
    result = evaluate(reference, quantized, ids, batch_size=args.batch_size,
                      perfect_routing=args.perfect_routing, progress=not args.no_progress)
    if args.generate:
        from .generation import generation_agreement

        if args.prompts < 1 or args.prompt_len < 2:
            raise InputError(f"--prompts must be >= 1 and --prompt-len >= 2 (got {args.prompts}, {args.prompt_len})")
        prompts = eval_rows(all_ids, args.prompts, args.prompt_len,
                            vocab_size=reference.get_input_embeddings().num_embeddings, source=str(args.text))
        generation = generation_agreement(reference, quantized, prompts, args.generate, batch_size=args.batch_size,
                                          progress=not args.no_progress)
        result.report["generation"] = {"prompt_len": args.prompt_len, **generation.summary()}
    result.report["paths"] = {"reference": str(args.reference), "quantized": str(args.quantized),
                              "text": str(args.text), "tokenizer": str(tokenizer)}
    result.report["settings"] = {"dtype": args.dtype, "device": device, "batch_size": args.batch_size}
    out = write_report(result, args.out)
    sys.stdout.write(markdown_table(result.report))
    sys.stdout.write(f"\nreport written to {out}/report.json, report.md and plots\n")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import json

    from .hub import resolve_model
    from .preflight import check_checkpoint

    report = check_checkpoint(resolve_model(args.checkpoint, "checkpoint"))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(report.table())
    return 0 if report.ok else 1


def _cmd_recipes(args: argparse.Namespace) -> int:
    from . import recipes

    chosen = {name: scheme for scheme, name in recipes.SCHEMES.items()}
    width = max(len(n) for n in recipes.names())
    for name, text in recipes.describe().items():
        mark = f"  [--scheme {chosen[name]}]" if name in chosen else ""
        sys.stdout.write(f"{name:<{width}}  {text}{mark}\n")
    sys.stdout.write("\nroutealign quantize MODEL --recipe NAME (or a YAML file) ...; from Python: "
                     "routealign.recipes.path(NAME)\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed, overwrite=args.overwrite)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; a :class:`RouteAlignError` becomes one ``routealign: error:`` line and status 2."""
    try:
        return args.func(args)
    except RouteAlignError as exc:
        sys.stderr.write(f"routealign: error: {exc}\n")
        return 2


def _cmd_quantize(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from . import recipes
    from .checkpoint import check_output_folder, check_weight_files, read_config, save_compressed
    from .validation import check_group_divisibility
    from .hub import resolve_model
    from .preflight import check_checkpoint
    from .textdata import calibration_windows, dataset_rows, encode_text, find_tokenizer, load_calibration_dataset

    # every cheap check before the model loads: model, recipe, output folder, tokenizer, calibration data
    model_dir = resolve_model(args.model, "model")
    config = read_config(model_dir)
    check_weight_files(model_dir)
    recipe_spec = args.recipe or recipes.for_scheme(args.scheme or "W4A16")
    _check_recipe(recipes.text(recipe_spec), recipe_spec)  # an unknown modifier or field named before any override
    recipe_text = recipes.text(recipe_spec, iters=args.iters, objective=args.objective)
    _check_recipe(recipe_text, recipe_spec)
    check_group_divisibility(config, recipe_text, f"{model_dir / 'config.json'}", f"recipe {recipe_spec}")
    # what save_compressed checks, before loading; no input may lie in (or be) the folder an overwrite replaces
    inputs = [model_dir, args.data, args.tokenizer, args.eval_text, recipes.resolve(recipe_spec)]
    if args.dataset is not None and Path(args.dataset).exists():
        inputs.append(args.dataset)
    out = check_output_folder(args.out, args.overwrite, *inputs)
    if args.samples < 1 or args.seq_len < 2:
        raise InputError(f"--samples must be >= 1 and --seq-len >= 2 (got {args.samples}, {args.seq_len})")
    longest = read_config(model_dir).get("max_position_embeddings")
    if isinstance(longest, int) and args.seq_len > longest:
        sys.stderr.write(f"routealign: warning: --seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"{longest} ({model_dir}/config.json): positions past {longest} were never trained; "
                         "calibration statistics from them may not be the model's\n")
    if args.dataset is None and (args.column or args.packing or args.dataset_config):
        raise InputError("--column, --packing and --dataset-config go with --dataset")
    tokenizer_file = find_tokenizer(model_dir, args.tokenizer)
    if args.data is not None:
        windows = calibration_windows(encode_text(args.data, tokenizer_file), args.samples, args.seq_len, args.seed)
    else:
        from transformers import AutoTokenizer

        try:
            calib_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_file.parent))
        except Exception as exc:
            raise InputError(f"tokenizer of {args.model} ({tokenizer_file.parent}): transformers cannot load it "
                             f"({exc}); --dataset needs it (chat templates)") from None
        dataset = load_calibration_dataset(args.dataset, args.split, args.dataset_config)
        windows = dataset_rows(dataset, calib_tokenizer, args.samples, args.seq_len, args.seed, args.column,
                               packing=args.packing, source=f"dataset {args.dataset} (split {args.split})")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration import oneshot_windows
    from .distributed import init_distributed, rank

    # under torchrun: llm-compressor's data-parallel flow (docs/guides/big_models_and_distributed): rank 0 loads the
    # weights into CPU memory the ranks share, every rank gets the same windows and oneshot splits them
    distributed = init_distributed()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    if distributed:
        from compressed_tensors.offload import load_offloaded_model

        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map="auto_offload")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(recipe_text)
        oneshot_windows(model, str(recipe_file), windows)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_file.parent))
    except Exception as exc:  # a tokenizer.json transformers cannot wrap: the checkpoint is still complete
        sys.stderr.write(f"routealign: tokenizer not saved with the checkpoint ({exc})\n")
        tokenizer = None
    save_compressed(model, out, tokenizer=tokenizer, overwrite=args.overwrite, input_dir=model_dir)
    if rank() != 0:
        return 0
    report = check_checkpoint(out)
    sys.stdout.write(report.table())
    text = args.eval_text or args.data or "HELD_OUT_TEXT"
    sys.stdout.write(f"\ncheckpoint written to {out}\nnext: routealign eval --reference {args.model} --quantized {out} "
                     f"--text {text}\n")
    if args.eval_text is None and args.data is not None:
        sys.stdout.write(f"      ({text} is the calibration text: for a held-out number pass text the calibration "
                         "did not see, e.g. a validation split, to --text)\n")
    return 0 if report.ok else 1


def _check_recipe(text: str, name) -> None:
    """Build the recipe's modifiers once, before any model loads: an unknown or mistyped field is one clear error
    naming the field and the recipe, not a traceback after loading."""
    import yaml
    from pydantic import ValidationError

    import routealign  # noqa: F401  (registers the modifiers with llm-compressor's factory)
    from llmcompressor.recipe import Recipe

    try:
        Recipe.create_instance(text)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InputError(f"recipe {name}: {exc.title}: {fields}") from None
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise InputError(f"recipe {name}: {exc}") from None


COMMANDS = {"eval": _cmd_eval, "check": _cmd_check, "demo": _cmd_demo, "quantize": _cmd_quantize,
            "recipes": _cmd_recipes}
