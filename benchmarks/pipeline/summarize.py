"""Aggregate run_one.py rows (``*/row.json`` under a folder) into a markdown table (mean ± std over seeds), a JSON
summary and a plot of quality against wall time.

    python benchmarks/pipeline/summarize.py /tmp/bench/r --out /tmp/bench/summary
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

COLUMNS = ("oneshot_s", "peak_rss_mib", "ppl", "flip_rate", "overlap_at_k", "jaccard", "exact_set", "match_score",
           "valid_ppl", "gen_matched")


def label(row: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(row.get("extra", {}).items()))
    smooth = f"smoothing ({row['smooth']}) + " if row.get("smooth") else ""
    return f"{smooth}{row['method']}" + (f" ({extra})" if extra else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [json.loads(p.read_text()) for p in sorted(args.runs.glob("*/row.json"))]
    for row in rows:  # optional parts of a row, flattened into columns
        row["valid_ppl"] = (row.get("valid") or {}).get("ppl")
        row["gen_matched"] = (row.get("generation") or {}).get("mean_matched")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["scheme"], label(row))].append(row)

    summary = []
    for (model, scheme, name), runs in sorted(groups.items()):
        entry = {"model": model, "scheme": scheme, "method": name, "seeds": sorted(r["seed"] for r in runs)}
        for col in COLUMNS:
            values = [r[col] for r in runs if r.get(col) is not None]
            if values:
                entry[col] = statistics.mean(values)
                entry[col + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["ppl_reference"] = runs[0]["ppl_reference"]
        summary.append(entry)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| model | scheme | method | seeds | oneshot s | peak RSS MiB | ppl | flip rate | overlap@k | Jaccard "
             "| exact set | Match Score | valid ppl | generated tokens matched |", "|---" * 14 + "|"]
    for e in summary:
        def cell(col, fmt):
            if col not in e:
                return "-"
            return f"{e[col]:{fmt}}" + (f" ± {e[col + '_std']:{fmt}}" if len(e["seeds"]) > 1 else "")

        lines.append(f"| {e['model']} | {e['scheme']} | {e['method']} | {','.join(map(str, e['seeds']))} | "
                     f"{cell('oneshot_s', '.1f')} | {cell('peak_rss_mib', '.0f')} | {cell('ppl', '.3f')} | "
                     f"{cell('flip_rate', '.4f')} | {cell('overlap_at_k', '.4f')} | {cell('jaccard', '.4f')} | "
                     f"{cell('exact_set', '.4f')} | {cell('match_score', '.4f')} | {cell('valid_ppl', '.3f')} | "
                     f"{cell('gen_matched', '.2f')} |")
    table = "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(table)
    print(table)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for e in summary:
        for ax, col in zip(axes, ("ppl", "flip_rate")):
            ax.errorbar(e["oneshot_s"], e[col], xerr=e.get("oneshot_s_std", 0), yerr=e.get(col + "_std", 0),
                        marker="o", capsize=3, label=f"{e['model']} {e['method']}")
    for ax, title in zip(axes, ("test perplexity", "top-k flip rate (1 - overlap@k)")):
        ax.set_xscale("log")
        ax.set_xlabel("oneshot wall time (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "quality_vs_time.png", dpi=120)


if __name__ == "__main__":
    main()
