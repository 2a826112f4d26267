"""Routing headroom of run_one.py rows (run with ``--perfect-routing``): per method and scheme, the held-out
perplexity, the share of the gap to the unquantized model that forcing the reference's expert choices removes, the
flip rate per layer and its growth with depth, and greedy-generation agreement (``--generate``).

    python benchmarks/pipeline/headroom.py /tmp/i31/runs --out /tmp/i31/headroom

Rows are found under RUNS at any depth (``row.json`` files) and grouped by model, scheme and method.

Definitions (test text, 64 x 512 tokens): gap = ppl - ppl_reference; perfect-routing share = (ppl -
ppl_perfect_routing) / gap; a router objective's recovered headroom = (ppl_plain - ppl) / (ppl_plain -
ppl_perfect_routing of plain), on the same seed: meaningless where plain's headroom is within the seed spread, so
the held-out difference to plain on the same seeds is printed beside it, with its standard error over the seeds
(within about two of them of zero: seed noise). Held-out = sqrt(test ppl x valid ppl).
Flip rate per layer = 1 - overlap@k; depth slope = least-squares slope of the flip rate over the layer index.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def label(row: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(row.get("extra", {}).items()))
    smooth = f"smoothing ({row['smooth']}) + " if row.get("smooth") else ""
    experts = " (all experts calibrated)" if row.get("moe_calibrate_all_experts") else ""
    return f"{smooth}{row['method']}{experts}" + (f" ({extra})" if extra else "")


def paired(differences: list[float]) -> tuple[float | None, float | None]:
    """Mean of same-seed differences and its standard error (None with fewer than 2 seeds): a difference within about
    two standard errors of zero is seed noise."""
    if not differences:
        return None, None
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, None
    return mean, statistics.stdev(differences) / math.sqrt(len(differences))


def slope(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def metrics(row: dict) -> dict:
    gap = row["ppl"] - row["ppl_reference"]
    perfect = row.get("ppl_perfect_routing")
    flips = [layer["flip_rate"] for layer in row.get("per_layer", [])]
    gen = row.get("generation") or {}
    return {
        "heldout": math.sqrt(row["ppl"] * row["valid"]["ppl"]) if row.get("valid") else None,
        "ppl": row["ppl"], "ppl_reference": row["ppl_reference"], "ppl_perfect_routing": perfect,
        "gap": gap, "perfect_share": (row["ppl"] - perfect) / gap if perfect is not None and gap > 0 else None,
        "flip_rate": row["flip_rate"], "flip_per_layer": flips, "flip_slope": slope(flips),
        "gen_mean_matched": gen.get("mean_matched"), "gen_positional": gen.get("positional_agreement"),
        "oneshot_s": row["oneshot_s"], "seed": row["seed"],
        "router_kept": sum(1 for layer in row.get("layers") or [] if layer.get("router") in ("kept", "ungated")),
        "blocks": len(row.get("layers") or []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [json.loads(p.read_text()) for p in sorted(args.runs.rglob("row.json")) if p.is_file()]
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["scheme"], label(row))].append(metrics(row))
    plain = {(model, s, m["seed"]): m for (model, s, lab), ms in groups.items() if lab == "none" for m in ms}
    table = ["| model | scheme | method | seeds | held-out ppl | test ppl | perfect routing | share of gap removed by "
             "perfect routing | flip rate | flip rate per layer | depth slope | held-out - plain's ± s.e. (same seeds) | "
             "headroom "
             "recovered vs plain (same seed) | "
             "greedy tokens matched (of 32) | router term kept | oneshot s |", "|---" * 16 + "|"]
    summary = []
    for (model, scheme, lab), ms in sorted(groups.items()):
        ms.sort(key=lambda m: m["seed"])

        def mean(key):
            vals = [m[key] for m in ms if m[key] is not None]
            return statistics.fmean(vals) if vals else None

        recovered, versus_plain = [], []
        for m in ms:
            p = plain.get((model, scheme, m["seed"]))
            if p is None or lab == "none":
                continue
            if p["heldout"] is not None and m["heldout"] is not None:
                versus_plain.append(m["heldout"] - p["heldout"])
            if p["ppl_perfect_routing"] is not None and p["ppl"] - p["ppl_perfect_routing"] > 0:
                recovered.append((p["ppl"] - m["ppl"]) / (p["ppl"] - p["ppl_perfect_routing"]))
        per_layer = [statistics.fmean(v) for v in zip(*[m["flip_per_layer"] for m in ms])] if ms[0]["flip_per_layer"] \
            else []
        entry = {"model": model, "scheme": scheme, "method": lab, "seeds": [m["seed"] for m in ms],
                 **{k: mean(k) for k in ("heldout", "ppl", "ppl_perfect_routing", "perfect_share", "flip_rate",
                                         "flip_slope", "gen_mean_matched", "oneshot_s")},
                 "heldout_per_seed": [m["heldout"] for m in ms], "flip_per_layer": per_layer,
                 "headroom_recovered": statistics.fmean(recovered) if recovered else None,
                 "heldout_vs_plain": paired(versus_plain)[0], "heldout_vs_plain_se": paired(versus_plain)[1],
                 "seeds_vs_plain": len(versus_plain),
                 "router_kept": [f"{m['router_kept']}/{m['blocks']}" for m in ms]}
        summary.append(entry)

        def fmt(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        table.append(
            f"| {model} | {scheme} | {lab} | {len(ms)} | {' / '.join(fmt(v) for v in entry['heldout_per_seed'])} "
            f"({fmt(entry['heldout'])}) | {fmt(entry['ppl'])} | {fmt(entry['ppl_perfect_routing'])} | "
            f"{fmt(entry['perfect_share'], '.1%')} | {fmt(entry['flip_rate'], '.4f')} | "
            f"{' '.join(f'{v:.3f}' for v in per_layer)} | {fmt(entry['flip_slope'], '+.4f')} | "
            f"{fmt(entry['heldout_vs_plain'], '+.3f')}"
            f"{'' if entry['heldout_vs_plain_se'] is None else ' ± ' + fmt(entry['heldout_vs_plain_se'])} "
            f"({entry['seeds_vs_plain']}) | "
            f"{fmt(entry['headroom_recovered'], '.1%')} | {fmt(entry['gen_mean_matched'], '.1f')} | "
            f"{', '.join(entry['router_kept'])} | {fmt(entry['oneshot_s'], '.0f')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headroom.json").write_text(json.dumps(summary, indent=2))
    (args.out / "headroom.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
