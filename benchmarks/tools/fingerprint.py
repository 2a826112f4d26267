"""Fingerprints of quantized checkpoints: a SHA-256 per saved tensor for a fixed set of small runs on tiny models
built from configs (no ../shared), so that a refactor can be checked to change no number.

    python benchmarks/tools/fingerprint.py --out before.json
    python benchmarks/tools/fingerprint.py --out after.json --compare before.json   # exit 1 on any difference

Runs (one thread, float32, 8 x 32 calibration tokens): plain rounding W4A16, gated VSRAQ W4A16 (next-router
decisions, headroom rule), VSRAQ with LM-head decisions W3A16, NVFP4 with smoothing first, ExpertQuant on a sigmoid
router, padded calibration rows, experts tuned in chunks, the router term balanced at the block output; on
qwen3_moe, glm4_moe, deepseek_v3 and nemotron_h as listed in RUNS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

RUNS = {
    "qwen_none_w4": ("qwen3_moe", [("round", {"objective": "none", "scheme": "W4A16"})]),
    "glm_vsraq_gated_w4": ("glm4_moe", [("round", {"objective": "vsraq", "scheme": "W4A16", "gate": {"z": 0.0}})]),
    "ds_vsraq_lm_w3": ("deepseek_v3", [("round", {"objective": "vsraq", "scheme": "W3A16",
                                                 "holdout": {"decide_on": "lm_head"},
                                                 "gate": {"z": 0.0, "headroom": False}})]),
    "qwen_smooth_nvfp4": ("qwen3_moe", [("smooth", {"mode": "search"}),
                                        ("round", {"objective": "vsraq", "scheme": "NVFP4", "gate": False})]),
    "glm_expertquant_nvfp4": ("glm4_moe", [("round", {"objective": "expertquant", "scheme": "NVFP4",
                                                      "holdout": {"decide_on": "lm_head"}, "gate": {"z": 0.0}})]),
    "nemotron_vsraq_w4": ("nemotron_h", [("round", {"objective": "vsraq", "scheme": "W4A16", "gate": False,
                                                    "router_scope": "both"})]),
    "qwen_padded_w4": ("qwen3_moe", [("round", {"objective": "vsraq", "scheme": "W4A16",
                                                "gate": {"headroom": False}})]),
    "qwen_chunked_vsraq_w4": ("qwen3_moe", [("round", {"objective": "vsraq", "scheme": "W4A16",
                                                       "memory": {"expert_chunk": 3},
                                                       "gate": {"z": 0.0, "headroom": False}})]),
    "glm_output_balance_w4": ("glm4_moe", [("round", {"objective": "vsraq", "scheme": "W4A16", "gate": False,
                                                      "loss": {"balance": "output"}})]),
}


def run(name: str, folder: Path) -> dict[str, str]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors import safe_open

    from routealign import ExpertAwareSmoothingModifier, RouterAlignedRoundingModifier
    from routealign.checkpoint import save_compressed
    from routealign.tiny import save_tiny
    from transformers import AutoModelForCausalLM

    family, steps = RUNS[name]
    save_tiny(family, folder / f"{name}-input", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(folder / f"{name}-input"), dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=g)
    mask = torch.ones_like(ids)
    if name == "qwen_padded_w4":
        for row, length in enumerate((32, 20, 32, 9, 32, 27, 32, 14)):
            mask[row, length:] = 0
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    recipe = []
    for kind, fields in steps:
        if kind == "smooth":
            recipe.append(ExpertAwareSmoothingModifier(**fields))
        else:
            holdout = {"fraction": 0.25, "every": 3, **fields.get("holdout", {})}
            recipe.append(RouterAlignedRoundingModifier(iters=12, batch_size=2, lr=0.01, targets="Linear",
                                                        ignore=["lm_head"], **{**fields, "holdout": holdout}))
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=8, max_seq_length=32)
    out = folder / name
    save_compressed(model, out)
    digests = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                digests[key] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16] \
                    if t.numel() else "empty"
    return digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, help="an earlier --out: report every tensor that differs")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: load-independent)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            result[name] = run(name, Path(tmp))
            print(f"{name}: {len(result[name])} tensors", flush=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    bad = 0
    for name in args.runs:
        old, new = before.get(name, {}), result[name]
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        bad += bool(diff)
        print(f"{name}: {'identical' if not diff else f'{len(diff)} tensors differ, e.g. ' + ', '.join(diff[:4])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
