"""Evaluation reports: JSON, a markdown table, and plots.

Plots need matplotlib (``pip install routealign[plots]``); without it the JSON and markdown are still written and
a log line says the plots were skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from loguru import logger

from .evaluate import EvalResult

__all__ = ["markdown_table", "write_report", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = (
    ("overlap_at_k", "overlap@k"),
    ("jaccard", "Jaccard"),
    ("exact_set", "exact set"),
    ("top1", "top-1"),
    ("match_score", "Match Score"),
    ("rank_weighted_jaccard", "RW-Jaccard"),
    ("routing_kl", "routing KL"),
    ("weights_l1", "weights L1"),
    ("load_drift", "load drift"),
)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def markdown_table(report: dict, title: str = "routealign eval") -> str:
    ppl = report["perplexity"]
    mean = report["routing"]["mean"]
    lines = [f"# {title}", ""]
    if "reference" in report.get("paths", {}):
        lines += [f"- reference: `{report['paths']['reference']}`", f"- quantized: `{report['paths']['quantized']}`"]
    lines += [f"- tokens: {report['rows']} x {report['seq_len']} ({report['predictions']} next-token predictions)", ""]
    lines += ["| model | perplexity |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {value:.3f} |" for name, value in ppl.items()]
    lines += ["", "## Routing agreement (mean over MoE layers)", ""]
    lines += ["| " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " |",
              "|" + "---|" * len(SUMMARY_COLUMNS),
              "| " + " | ".join(_fmt(mean[key]) for key, _ in SUMMARY_COLUMNS) + " |"]
    lines += ["", "## Per layer", ""]
    lines += ["| layer | " + " | ".join(label for _, label in SUMMARY_COLUMNS) + " | flip rate | median margin |",
              "|---|" + "---|" * (len(SUMMARY_COLUMNS) + 2)]
    for row in report["routing"]["per_layer"]:
        margin = report["margins"][row["layer"]]
        lines.append(
            f"| {row['layer']} | " + " | ".join(_fmt(row[key]) for key, _ in SUMMARY_COLUMNS)
            + f" | {_fmt(margin['flip_rate'])} | {_fmt(margin['median'])} ({margin['units']}) |"
        )
    gen = report.get("generation")
    if gen is not None:
        lines += ["", "## Greedy generation agreement", "",
                  f"{gen['prompts']} prompts of {gen.get('prompt_len', '?')} tokens, {gen['new_tokens']} generated "
                  "tokens each, both models greedy from the same prompt", "",
                  "| mean matched tokens (before the first divergence) | fully matched prompts | positional agreement "
                  "| teacher-forced top-1 |", "|---|---|---|---|",
                  f"| {gen['mean_matched']:.2f} / {gen['new_tokens']} | {gen['fully_matched']:.4f} "
                  f"| {gen['positional_agreement']:.4f} | {gen['teacher_forced_top1']:.4f} |", "",
                  "first divergence per prompt (index of the first differing generated token; - for none): "
                  + ", ".join("-" if row["first_divergence"] is None else str(row["first_divergence"])
                              for row in gen["per_prompt"])]
    return "\n".join(lines) + "\n"


def _plot_generation(generation: dict, out: Path, plt) -> list[str]:
    survival = generation["survival"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.step(range(len(survival)), survival, where="post")
    ax.set_xlabel("generated tokens t")
    ax.set_ylabel("prompts still identical after t tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Greedy continuations: quantized vs reference ({generation['prompts']} prompts)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "generation_agreement.png", dpi=120)
    plt.close(fig)
    return ["generation_agreement.png"]


def _plot(result: EvalResult, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: plots skipped (pip install 'routealign[plots]')")
        return []
    import torch

    written = []
    per_layer = result.report["routing"]["per_layer"]
    x = [layer.layer_index if layer.layer_index is not None else i for i, layer in enumerate(result.layers)]

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("jaccard", "Jaccard"), ("match_score", "Match Score"), ("overlap_at_k", "overlap@k"),
                       ("rank_weighted_jaccard", "rank-weighted Jaccard")):
        ax.plot(x, [row[key] for row in per_layer], marker="o", label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("agreement with reference")
    ax.set_title("Routing agreement per MoE layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "agreement_per_layer.png", dpi=120)
    plt.close(fig)
    written.append("agreement_per_layer.png")

    n = len(result.layers)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, layer, xi in zip(axes.flat, result.layers, x):
        conf = torch.tensor(result.report["routing"]["confusion"][layer.name])
        conf = conf / conf.sum(dim=1, keepdim=True).clamp_min(1)
        k = conf.shape[0]
        ax.imshow(conf.numpy(), vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(k + 1), [str(i + 1) for i in range(k)] + ["out"], fontsize=7)
        ax.set_yticks(range(k), [str(i + 1) for i in range(k)], fontsize=7)
        ax.set_title(f"layer {xi}", fontsize=9)
        ax.set_xlabel("quantized rank", fontsize=8)
        ax.set_ylabel("reference rank", fontsize=8)
    fig.suptitle("Where each reference top-k expert lands in the quantized ranking")
    fig.tight_layout()
    fig.savefig(out / "rank_confusion.png", dpi=120)
    plt.close(fig)
    written.append("rank_confusion.png")

    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, layer, xi in zip(axes.flat, result.layers, x):
        margins, flipped = result.agreement.margins(layer.name)
        keep = torch.isfinite(margins)
        margins, flipped = margins[keep].numpy(), flipped[keep].numpy()
        if margins.size == 0:
            continue
        bins = 40
        ax.hist(margins, bins=bins, color="0.7", label="all tokens")
        ax.hist(margins[flipped], bins=bins, range=(margins.min(), margins.max()), color="C3", label="set changed")
        ax.set_yscale("log")
        ax.set_title(f"layer {xi}", fontsize=9)
        ax.set_xlabel(f"k-th minus (k+1)-th ({result.report['margins'][layer.name]['units']})", fontsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Reference top-k boundary margin")
    fig.tight_layout()
    fig.savefig(out / "boundary_margin.png", dpi=120)
    plt.close(fig)
    written.append("boundary_margin.png")
    if result.report.get("generation") is not None:
        written += _plot_generation(result.report["generation"], out, plt)
    return written


def write_report(result: EvalResult, out_dir: str | Path, title: str = "routealign eval") -> Path:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot(result, out)
    result.report["plots"] = plots
    for name, text in (("report.json", json.dumps(result.report, indent=2)),
                       ("report.md", markdown_table(result.report, title))):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, out / name)
    return out
