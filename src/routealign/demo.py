"""``routealign demo``: the whole evaluation path on a tiny MoE, with nothing to download.

1. Build a tiny Qwen3-MoE (2 MoE layers, 8 experts, top-2) with a byte-level tokenizer and train it briefly on the
   bundled public-domain text, so that its router is trained (peaked, balanced) rather than random.
2. Quantize copies to W4A16 with llm-compressor's RTN (QuantizationModifier), with plain learned rounding
   (RouterAlignedRoundingModifier, objective none: the AutoRound baseline) and with VSRAQ (objective vsraq), and
   save them as compressed-tensors checkpoints.
3. Reload each checkpoint faithfully and evaluate routing agreement and perplexity against the reference on the
   held-out bundled text, with and without perfect routing; print a table and write reports.

The table explains itself: "routing headroom" is ppl minus the perplexity with every router forced to the
reference's expert choices (the most any router objective could gain), and "router term" says, per tuned block,
what VSRAQ's gate did with its router term (kept, dropped on held-out error, or not tried because forcing the
reference's experts gained nothing there).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from loguru import logger
from tqdm.auto import tqdm

from .checkpoint import save_compressed
from .errors import OutputExistsError

__all__ = ["run_demo", "train_tiny_moe", "bundled_text", "router_decisions"]

DEMO_METHODS = ("rtn", "none", "vsraq")
_LABELS = {"rtn": "RTN (llm-compressor QuantizationModifier)", "none": "learned rounding (objective none)",
           "vsraq": "VSRAQ (objective vsraq)"}


def bundled_text(name: str = "shakespeare.txt") -> Path:
    return Path(str(resources.files("routealign") / "data" / name))


def _byte_ids(path: Path) -> torch.Tensor:
    return torch.tensor(list(path.read_bytes()), dtype=torch.long) + 3  # byte_tokenizer(): ids 3..258


def train_tiny_moe(out_dir: Path, seed: int = 0, steps: int = 300, seq_len: int = 128, batch: int = 16):
    """Train a tiny Qwen3-MoE on the bundled text and save it with its tokenizer; returns the model."""
    from .tiny import byte_tokenizer, tiny_model

    torch.manual_seed(seed)
    model = tiny_model("qwen3_moe", seed=seed, router_aux_loss_coef=0.01)
    model.train()
    ids = _byte_ids(bundled_text())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="training the demo MoE", unit="step")
    for _ in bar:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    model.save_pretrained(str(out_dir))
    byte_tokenizer().save_pretrained(str(out_dir))
    return model


def router_decisions(report: list[dict] | None) -> str:
    """``"kept 1, not tried 1 (of 2 blocks)"`` from a RouterAlignedRoundingModifier report; ``"-"`` without a
    router objective."""
    decisions = [row["router"] for row in report or [] if row.get("router") not in (None, "none", "untuned")]
    if not decisions:
        return "-"
    counts = {d: decisions.count(d) for d in dict.fromkeys(decisions)}
    return ", ".join(f"{d.replace('_', ' ')} {n}" for d, n in counts.items()) + f" (of {len(decisions)} blocks)"


def _quantize(reference_dir: Path, out_dir: Path, method: str, calib: torch.Tensor, seed: int) -> tuple[float, str]:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    from .calibration import oneshot_windows
    from .modifiers import RouterAlignedRoundingModifier

    model = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32)
    if method == "rtn":
        recipe = QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])
    else:
        recipe = RouterAlignedRoundingModifier(objective=method, scheme="W4A16", targets="Linear",
                                               ignore=["lm_head"], iters=200, seed=seed)
    start = time.perf_counter()
    oneshot_windows(model, recipe, calib, moe_calibrate_all_experts=False)
    seconds = time.perf_counter() - start
    save_compressed(model, out_dir, overwrite=True)  # inside the demo's own folder (checked by run_demo)
    return seconds, router_decisions(getattr(recipe, "report", None))


def run_demo(out_dir: str | Path = "routealign-out", seed: int = 0, overwrite: bool = False) -> list[dict]:
    from .checkpoint import load_model
    from .evaluate import evaluate
    from .preflight import check_checkpoint
    from .report import write_report

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"demo output folder {out} already exists and is not empty; pass --overwrite to "
                                "replace its contents, or --out another folder")
    out.mkdir(parents=True, exist_ok=True)
    reference_dir = out / "reference"
    logger.info(f"demo: training a tiny MoE into {reference_dir}")
    train_tiny_moe(reference_dir, seed=seed)

    train_ids = _byte_ids(bundled_text())
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train_ids.numel() - 129, (32,), generator=gen)
    calib = torch.stack([train_ids[s : s + 128] for s in starts])
    eval_ids = _byte_ids(bundled_text("shakespeare_eval.txt"))
    eval_ids = eval_ids[: (eval_ids.numel() // 256) * 256].view(-1, 256)[:32]

    reference = load_model(reference_dir, dtype=torch.float32)
    rows = []
    for method in DEMO_METHODS:
        qdir = out / f"w4a16-{method}"
        seconds, decisions = _quantize(reference_dir, qdir, method, calib, seed)
        preflight = check_checkpoint(qdir)
        logger.info(f"routealign check {qdir}: {'PASS' if preflight.ok else 'FAIL'}")
        if not preflight.ok:
            raise RuntimeError(f"the demo's checkpoint {qdir} fails the vLLM pre-flight check:\n{preflight.table()}")
        quantized = load_model(qdir, dtype=torch.float32)
        result = evaluate(reference, quantized, eval_ids, batch_size=8, perfect_routing=True)
        write_report(result, out / f"eval-w4a16-{method}", title=f"routealign demo: W4A16 {_LABELS[method]}")
        ppl, mean = result.report["perplexity"], result.report["routing"]["mean"]
        rows.append({"method": f"W4A16 {_LABELS[method]}", "oneshot_s": seconds, "ppl_reference": ppl["reference"],
                     "ppl": ppl["quantized"], "ppl_perfect_routing": ppl["quantized_perfect_routing"],
                     "routing_headroom": ppl["quantized"] - ppl["quantized_perfect_routing"],
                     "router_term": decisions,
                     **{k: mean[k] for k in ("overlap_at_k", "jaccard", "exact_set", "match_score")}})

    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    header = ("| method | oneshot s | ppl (ref) | ppl | ppl, perfect routing | routing headroom | router term | "
              "overlap@k | Jaccard | exact set | Match Score |")
    lines = [header, "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['oneshot_s']:.2f} | {r['ppl_reference']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl_perfect_routing']:.3f} | {r['routing_headroom']:+.3f} | {r['router_term']} | "
                     f"{r['overlap_at_k']:.4f} | {r['jaccard']:.4f} | {r['exact_set']:.4f} | {r['match_score']:.4f} |")
    lines += ["", "routing headroom: ppl minus ppl with the reference's expert choices forced (the most a router "
              "objective can gain). router term: what VSRAQ's gate did per block (kept / dropped on held-out error / "
              "not tried: forcing the reference's experts gained nothing on held-out); where it is not kept, VSRAQ "
              "is plain learned rounding and the two rows match."]
    table = "\n".join(lines)
    (out / "demo.md").write_text(table + "\n")
    print("\n" + table + f"\n\nreports, checkpoints and plots in {out}/")
    return rows
