"""Where the default recipe's time goes, beside plain learned rounding, on one model (issue 44, item 9).

    python benchmarks/tools/profile_default.py --model MODEL_DIR --scheme W3A16 --iters 50 --samples 32 \
        --seq-len 256 --out /tmp/profile.json [--recipe vsraq_w4a16 --recipe autoround_w4a16] [--extra '{...}']

Each recipe runs ``oneshot`` once under cProfile in this process (one after the other, same threads, same windows):
its wall time, and the cumulative seconds of routealign's tuning functions (the loop, its minibatch losses, the sign
step, the held-out losses and decisions, the next-layer forwards). Prints a table and writes JSON. A model without
a tokenizer folder is fine: the windows are random token ids (a cost profile, not a quality measurement); with
``--data`` they are windows of that text.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
import yaml

WATCH = {  # reported name -> (file suffix, function)
    "loop (all iterations, per arm)": ("rounding/loop.py", "run_arm"),
    "minibatch forwards + losses": ("rounding/tune.py", "minibatch_losses"),
    "router loss": ("rounding/tune.py", "_router_loss"),
    "sign step (backward + update)": ("rounding/tune.py", "step"),
    "held-out tuning loss": ("rounding/heldout.py", "loss"),
    "held-out lm_head errors": ("rounding/heldout.py", "lm_head_errors"),
    "held-out downstream errors": ("rounding/heldout.py", "downstream_errors"),
    "headroom rule": ("rounding/arms.py", "headroom_rule"),
    "next layer forwards": ("routealign/runner.py", "run_next"),
    "reference outputs": ("rounding/tune.py", "reference"),
    "tune (whole layer)": ("rounding/tune.py", "tune"),
}


def _recipe(name: str, scheme: str, iters: int, extra: dict) -> dict:
    import routealign.recipes

    recipe = yaml.safe_load(Path(routealign.recipes.resolve(name)).read_text())
    for stage in recipe.values():
        for modifiers in stage.values():
            for key, fields in modifiers.items():
                if key == "RouterAlignedRoundingModifier":
                    fields.update({"iters": iters, "scheme": scheme, **extra})
    return recipe


def _modifiers(recipe: dict) -> list:
    from llmcompressor.modifiers.factory import ModifierFactory

    import routealign  # noqa: F401  (registers the modifiers)

    ModifierFactory.refresh()
    return [ModifierFactory.create(key, allow_registered=True, allow_experimental=True, **fields)
            for stage in recipe.values() for modifiers in stage.values() for key, fields in modifiers.items()]


def run(model_dir: Path, recipe: dict, ids: torch.Tensor) -> tuple[float, dict, list]:
    from transformers import AutoModelForCausalLM

    from routealign import oneshot_windows

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    modifiers = _modifiers(recipe)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    oneshot_windows(model, modifiers, ids)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile).stats
    seconds = {}
    for label, (suffix, func) in WATCH.items():
        seconds[label] = round(sum(v[3] for (file, _, fn), v in stats.items() if file.endswith(suffix) and fn == func), 2)
    report = [row for m in modifiers for row in getattr(m, "report", [])]
    return wall, seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--recipe", action="append",
                        help="shipped recipe names or YAML files (default: vsraq_w4a16, autoround_w4a16)")
    parser.add_argument("--data", type=Path, help="calibration windows from this text with the model's tokenizer "
                                                  "(default: random token ids)")
    parser.add_argument("--scheme", default="W3A16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--extra", default="{}", help="JSON of RouterAlignedRoundingModifier fields for every recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = json.loads((args.model / "config.json").read_text())
    if args.data:
        from routealign.textdata import calibration_windows, encode_text, find_tokenizer

        ids = calibration_windows(encode_text(args.data, find_tokenizer(args.model)), args.samples, args.seq_len)
    else:
        ids = torch.randint(3, config["vocab_size"], (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    rows = {}
    for name in args.recipe or ["vsraq_w4a16", "autoround_w4a16"]:
        wall, seconds, report = run(args.model, _recipe(name, args.scheme, args.iters, json.loads(args.extra)), ids)
        decisions = [r.get("router") for r in report]
        rows[name] = {"wall_s": round(wall, 2), "functions_s": seconds, "router": decisions}
        print(f"{name}: {wall:.1f} s; router decisions {decisions}", flush=True)
    base = list(rows)[-1]
    print("\n| function (cumulative s) | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| wall | " + " | ".join(f"{r['wall_s']:.1f} ({r['wall_s'] / rows[base]['wall_s']:.2f}x)" for r in rows.values()) + " |")
    for label in WATCH:
        print(f"| {label} | " + " | ".join(f"{r['functions_s'][label]:.1f}" for r in rows.values()) + " |")
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
