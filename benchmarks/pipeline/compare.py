"""One command for the side-by-side benchmark: every method in its own process, one after another on this
machine, then a table (JSON + markdown) and a quality-vs-time plot.

    python benchmarks/pipeline/compare.py --out /tmp/bench                                   # built-in tiny model (CPU: ~10 min)
    python benchmarks/pipeline/compare.py --model ../shared/models/tiny-qwen3_moe --out /tmp/bench-qwen \\
        --methods rtn gptq autoround none vsraq --schemes W4A16 NVFP4 --seeds 0 1 2

    python benchmarks/pipeline/compare.py --protocol w3a16-stress --model ../shared/models/tiny-qwen3_moe \
        --model ../shared/models/tiny-glm4_moe --out /tmp/stress           # the W3A16 stress protocol, one command

``--protocol quick``: 32 x 256 calibration windows, 50 iterations, float32 model, one thread per run, test ppl on 64 x
512 ids plus the same on wiki.valid.tokens, greedy generation agreement (16 prompts x 32 tokens), ``kv_b_proj``
ignored (MLA). ``--protocol w3a16-stress``: the quick protocol at W3A16 with AutoRoundModifier, plain learned
rounding and the shipped recipe's settings, seeds 0 1 2 (W3A16 is a stress regime: vLLM's MoE kernels serve 4 and 8
bits; it is where methods separate on tiny models). Explicit ``--methods/--schemes/--seeds/--iters/--threads`` win.

Default model: the demo's tiny MoE, trained on the bundled text (no ../shared needed), calibrated on 32 x 128 and
evaluated on 32 x 256 tokens of the bundled texts. With ``--model`` the protocol of ../shared/models/README.md is
used (128 x 512 calibration windows of wiki.train.tokens, 64 x 512 evaluation ids of wiki.test.tokens). Records
machine, device, versions and thread count in ``machine.json``. AutoRoundModifier NVFP4 crashes on MoEs in
llm-compressor 0.14.0.1 and is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine(threads: int) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for package in ("llmcompressor", "compressed_tensors", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # pragma: no cover - reporting only
            info[package] = None
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    return info


DATA = HERE.parents[2] / "shared/data/wikitext-2"
QUICK = ["--samples", "32", "--seq-len", "256", "--dtype", "float32", "--eval-rows", "64", "--valid-text",
         str(DATA / "wiki.valid.tokens"), "--ignore", "re:.*kv_b_proj$", "--generate", "32"]
PROTOCOLS = {
    "shared": {"methods": ["rtn", "gptq", "autoround", "none", "vsraq"], "schemes": ["W4A16"], "seeds": [0],
               "iters": 200, "threads": 2, "run_one": []},
    "quick": {"methods": ["autoround", "none", "vsraq"], "schemes": ["W4A16"], "seeds": [0, 1, 2], "iters": 50,
              "threads": 1, "run_one": QUICK},
    "w3a16-stress": {"methods": ["autoround", "none", "vsraq"], "schemes": ["W3A16"], "seeds": [0, 1, 2],
                     "iters": 50, "threads": 1, "run_one": QUICK},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append",
                        help="model folder, repeatable (default: the built-in tiny MoE)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), help="a preset (above)")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--schemes", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--smooth", choices=("expertquant", "search"), help="also run each routealign method "
                        "after ExpertAwareSmoothingModifier")
    parser.add_argument("--extra", default="{}", help="JSON of RouterAlignedRoundingModifier fields for every "
                        "routealign method (part of the run's name and label)")
    parser.add_argument("--iters", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    preset = PROTOCOLS.get(args.protocol, PROTOCOLS["shared"])
    for key in ("methods", "schemes", "seeds", "iters", "threads"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "machine.json").write_text(json.dumps(machine(args.threads), indent=2))

    common = ["--threads", str(args.threads), "--iters", str(args.iters), *preset["run_one"]]
    if args.model is None and args.protocol is not None:
        parser.error(f"--protocol {args.protocol} is a WikiText-2 protocol: give --model (e.g. ../shared/models/...)")
    models = args.model or [None]
    for model in models:
        run_model(args, model, common)
    subprocess.run([sys.executable, str(HERE / "summarize.py"), str(args.out / "runs"), "--out", str(args.out)],
                   check=True)


def run_model(args, model: Path | None, common: list[str]) -> None:
    """Every run of ``args`` on ``model`` (None: the built-in tiny MoE), each in its own process."""
    common = list(common)
    extra = json.loads(args.extra)
    tag = "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
    if model is None:
        from routealign.demo import bundled_text, train_tiny_moe

        model = args.out / "model"
        if not (model / "config.json").is_file():
            train_tiny_moe(model, seed=0)
        common += ["--train-text", str(bundled_text("shakespeare.txt")), "--test-text",
                   str(bundled_text("shakespeare_eval.txt")), "--samples", "32", "--seq-len", "128",
                   "--eval-rows", "32", "--eval-seq-len", "256"]
    runs = []
    for scheme in args.schemes:
        for method in args.methods:
            if method == "autoround" and scheme.startswith("NVFP4"):
                print(f"skipping autoround {scheme}: AutoRoundModifier crashes on NVFP4 MoEs in llm-compressor 0.14.0.1")
                continue
            seeds = args.seeds if method not in ("rtn", "gptq", "awq") else args.seeds[:1]
            smooths = [None] + ([args.smooth] if args.smooth and method not in ("rtn", "gptq", "autoround", "awq")
                                else [])
            for smooth in smooths:
                for seed in seeds:
                    ours = method not in ("rtn", "gptq", "autoround", "awq")
                    name = (f"{Path(model).name}-{method}-{scheme}-s{seed}" + (f"-smooth-{smooth}" if smooth else "")
                            + (tag if ours else ""))
                    cmd = [sys.executable, str(HERE / "run_one.py"), "--model", str(model), "--method", method,
                           "--scheme", scheme, "--seed", str(seed), "--out", str(args.out / "runs" / name), *common]
                    if ours and extra:
                        cmd += ["--extra", json.dumps(extra)]
                    if smooth:
                        cmd += ["--smooth", smooth]
                    runs.append((name, cmd))
    for i, (name, cmd) in enumerate(runs, 1):
        if (args.out / "runs" / name / "row.json").is_file():
            print(f"[{i}/{len(runs)}] {name}: done before, kept")
            continue
        print(f"[{i}/{len(runs)}] {name}", flush=True)
        (args.out / "runs" / name).mkdir(parents=True, exist_ok=True)
        with open(args.out / "runs" / name / "log.txt", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            print(f"  failed (exit {done.returncode}); see {args.out / 'runs' / name / 'log.txt'}")


if __name__ == "__main__":
    main()
