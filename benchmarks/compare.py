"""One command for the side-by-side benchmark: every method in its own process, one after another on this
machine, then a table (JSON + markdown) and a quality-vs-time plot.

    python benchmarks/compare.py --out /tmp/bench                                   # built-in tiny model (CPU: ~10 min)
    python benchmarks/compare.py --model ../shared/models/tiny-qwen3_moe --out /tmp/bench-qwen \\
        --methods rtn gptq autoround none vsraq --schemes W4A16 NVFP4 --seeds 0 1 2

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the built-in tiny MoE)")
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "autoround", "none", "vsraq"])
    parser.add_argument("--schemes", nargs="+", default=["W4A16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--smooth", choices=("expertquant", "search"), help="also run each routealign method "
                        "after ExpertAwareSmoothingModifier")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "machine.json").write_text(json.dumps(machine(args.threads), indent=2))

    common = ["--threads", str(args.threads), "--iters", str(args.iters)]
    if args.model is None:
        from routealign.demo import bundled_text, train_tiny_moe

        model = args.out / "model"
        if not (model / "config.json").is_file():
            train_tiny_moe(model, seed=0)
        common += ["--train-text", str(bundled_text("shakespeare.txt")), "--test-text",
                   str(bundled_text("shakespeare_eval.txt")), "--samples", "32", "--seq-len", "128",
                   "--eval-rows", "32", "--eval-seq-len", "256"]
    else:
        model = args.model
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
                    name = f"{method}-{scheme}-s{seed}" + (f"-smooth-{smooth}" if smooth else "")
                    cmd = [sys.executable, str(HERE / "run_one.py"), "--model", str(model), "--method", method,
                           "--scheme", scheme, "--seed", str(seed), "--out", str(args.out / "runs" / name), *common]
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
    subprocess.run([sys.executable, str(HERE / "summarize.py"), str(args.out / "runs"), "--out", str(args.out)],
                   check=True)


if __name__ == "__main__":
    main()
