"""End-to-end routing evaluation of a quantized model against its reference.

Both models read the same token ids end to end, so routing errors accumulate across layers as in deployment. At
every MoE layer the routers' logits are tapped with forward hooks and turned into decisions by the layer's router
family (:mod:`routealign.routing`); :class:`~routealign.metrics.RoutingAgreement` accumulates the agreement.

With ``perfect_routing`` the quantized model is run a second time with every router's expert choice replaced by
the reference model's choice for the same token (combine weights still come from the quantized router's own
scores for those experts, as ExpertQuant's "perfect match" does): the perplexity gap that remains is the part of
the degradation that routing does not explain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import InputError
from .metrics import RoutingAgreement
from .routing import MoELayer, RouterTap, find_moe_layers

__all__ = ["RouterTap", "EvalResult", "evaluate", "MARGIN_THRESHOLDS"]

MARGIN_THRESHOLDS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class EvalResult:
    report: dict
    agreement: RoutingAgreement
    layers: list[MoELayer]


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    return float(F.cross_entropy(pred, target, reduction="sum")), target.numel()


def _margin_report(agreement: RoutingAgreement, layers: list[MoELayer]) -> dict:
    out = {}
    for layer in layers:
        margins, flipped = agreement.margins(layer.name)
        finite = margins[torch.isfinite(margins)]
        units = "score" if layer.family.bernoulli else "logit"
        below = {str(t): float((margins < t).double().mean()) for t in MARGIN_THRESHOLDS}
        flip_by_decile = []
        if finite.numel() >= 10:
            edges = torch.quantile(finite.double(), torch.linspace(0, 1, 11, dtype=torch.float64))
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (margins >= lo) & (margins <= hi)
                flip_by_decile.append({"margin_lo": float(lo), "margin_hi": float(hi),
                                       "tokens": int(sel.sum()), "flip_rate": float(flipped[sel].double().mean())})
        out[layer.name] = {
            "units": units,
            "median": float(finite.median()) if finite.numel() else math.inf,
            "fraction_below": below,
            "flip_rate": float(flipped.double().mean()),
            "flip_rate_by_margin_decile": flip_by_decile,
        }
    return out


@torch.no_grad()
def evaluate(
    reference: torch.nn.Module,
    quantized: torch.nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 4,
    perfect_routing: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Compare ``quantized`` with ``reference`` on ``input_ids`` (``[rows, seq_len]``)."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise InputError(f"input_ids must be [rows, seq_len >= 2], got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    ref_layers = find_moe_layers(reference)
    q_layers = find_moe_layers(quantized)
    if [l.router_name for l in ref_layers] != [l.router_name for l in q_layers]:
        raise InputError(
            "reference and quantized models have different MoE routers: "
            f"{[l.router_name for l in ref_layers]} vs {[l.router_name for l in q_layers]}"
        )
    vocab = reference.get_input_embeddings().num_embeddings
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise InputError(f"token ids must lie in [0, {vocab}) for this model")

    ref_device = next(reference.parameters()).device
    q_device = next(quantized.parameters()).device
    agreement = RoutingAgreement()
    nll = {"reference": 0.0, "quantized": 0.0}
    if perfect_routing:
        nll["quantized_perfect_routing"] = 0.0
    count = 0
    batches = list(torch.split(input_ids, batch_size))
    for ids in tqdm(batches, desc="routealign eval", unit="batch", disable=not progress):
        with RouterTap(ref_layers) as ref_tap:
            ref_logits = reference(input_ids=ids.to(ref_device)).logits
        with RouterTap(q_layers) as q_tap:
            q_logits = quantized(input_ids=ids.to(q_device)).logits
        s, n = _nll_sum(ref_logits, ids.to(ref_logits.device))
        nll["reference"] += s
        nll["quantized"] += _nll_sum(q_logits, ids.to(q_logits.device))[0]
        count += n
        forced = {}
        for ref_layer, q_layer in zip(ref_layers, q_layers):
            ref_routing = ref_tap.routing(ref_layer)
            agreement.add(ref_layer.name, ref_layer.family, ref_routing, q_tap.routing(q_layer))
            forced[q_layer.name] = ref_routing.indices
        if perfect_routing:
            with RouterTap(q_layers, force=forced):
                forced_logits = quantized(input_ids=ids.to(q_device)).logits
            nll["quantized_perfect_routing"] += _nll_sum(forced_logits, ids.to(forced_logits.device))[0]

    report = {
        "rows": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "predictions": count,
        "perplexity": {name: math.exp(total / count) for name, total in nll.items()},
        "routing": agreement.summary(),
        "margins": _margin_report(agreement, ref_layers),
        "layers": [layer.describe() for layer in ref_layers],
    }
    return EvalResult(report=report, agreement=agreement, layers=ref_layers)
