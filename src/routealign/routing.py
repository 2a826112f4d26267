"""Router families, described once.

Every MoE router in transformers 5 returns ``(logits, combine_weights, expert_indices)``, but the rule that turns
logits into a selection differs by family. This module is the one place that knows those rules; losses, metrics,
hooks and the evaluator all go through it.

Families
--------
``softmax_topk``
    Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral: top-k of ``softmax(z)``; combine weights are the top-k probabilities,
    renormalised when ``norm_topk_prob`` (always for Mixtral). The ranking space is the raw logits (softmax is
    monotone, so the order is the same and margins are log-probability gaps).
``sigmoid_bias_group_topk``
    DeepSeek-V3, GLM-4.5 (glm4_moe), Solar-Open, Nemotron-H: selection on ``sigmoid(z) + e_score_correction_bias``,
    restricted to the ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best
    experts); combine weights are the *uncorrected* ``sigmoid(z)`` of the chosen experts, renormalised when
    ``norm_topk_prob``, times ``routed_scaling_factor``. Logits are computed in float32.
``logits_topk_softmax``
    GPT-OSS: top-k of the raw logits (router bias included); combine weights are the softmax over the k chosen
    logits.

The same description holds before and after llm-compressor's ``linearize_moe`` (that only replaces the experts).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .errors import NotMoEError, UnsupportedRouterError

__all__ = [
    "Routing",
    "RouterFamily",
    "RouterClass",
    "MoELayer",
    "FAMILIES",
    "family_of",
    "find_moe_layers",
    "supported_router_classes",
    "RouterTap",
    "StopForward",
]

Selection = Literal["softmax", "sigmoid_bias", "logits"]


@dataclass
class Routing:
    """What one router decided for a batch of tokens (all tensors have ``T`` = tokens as first dim).

    ``logits``: float32 ``[T, E]`` raw router logits. ``rank_scores``: float32 ``[T, E]``, the space the model ranks
    experts in (``-inf`` for experts outside the chosen groups). ``indices``: ``[T, k]`` chosen experts, best first.
    ``weights``: ``[T, k]`` combine weights aligned with ``indices``, in the dtype the model itself uses.
    """

    logits: torch.Tensor
    rank_scores: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    def boundary_margin(self) -> torch.Tensor:
        """``[T]`` gap between the k-th and the (k+1)-th expert in ranking space (how flippable a token is).

        Experts masked out by group limiting are not candidates for the (k+1)-th place within the chosen groups;
        when all others are masked, the margin is ``inf``.
        """
        k = self.top_k
        top = torch.topk(self.rank_scores, k + 1, dim=-1).values
        return top[:, k - 1] - top[:, k]

    def dense_weights(self) -> torch.Tensor:
        """``[T, E]`` float32 combine weights, zero for experts that were not chosen."""
        dense = torch.zeros_like(self.logits)
        return dense.scatter(1, self.indices, self.weights.float())


@dataclass(frozen=True)
class RouterClass:
    """Per-class details inside a family.

    ``renormalize``: ``None`` reads the router's ``norm_topk_prob``; ``True`` always renormalises (Mixtral).
    ``weights_in_logits_dtype``: the model casts combine weights back to the logits' dtype.
    """

    renormalize: bool | None = None
    weights_in_logits_dtype: bool = True


@dataclass(frozen=True)
class RouterFamily:
    """One selection rule shared by several router classes. See the module docstring for the rules."""

    name: str
    selection: Selection
    classes: dict[str, RouterClass] = field(default_factory=dict)
    router_attr: str = "gate"

    # -- the model's own arithmetic -------------------------------------------------------------------------
    def logits(self, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits for ``hidden`` (``[..., H]``), computed as the model computes them (dtype included)."""
        hidden = hidden.reshape(-1, router.weight.shape[-1])
        if self.selection == "sigmoid_bias":
            return F.linear(hidden.float(), router.weight.float())
        return F.linear(hidden, router.weight, getattr(router, "bias", None))

    def rank_scores(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """float32 ``[T, E]`` scores whose order is the model's order (group-excluded experts are ``-inf``)."""
        z = logits.float()
        if self.selection != "sigmoid_bias":
            return z
        scores = z.sigmoid() + router.e_score_correction_bias.float()
        n_group, topk_group = int(router.num_group), int(router.topk_group)
        if n_group <= 1:
            return scores
        num_tokens, num_experts = scores.shape
        grouped = scores.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        return scores.masked_fill(~score_mask.bool(), float("-inf"))

    def select(self, router: torch.nn.Module, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` chosen experts, best first, ranked exactly as the model ranks them."""
        k = int(router.top_k)
        if self.selection == "softmax":
            # the model ranks float32 softmax probabilities; same order as the logits, same tie-breaking as it
            return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1).indices
        if self.selection == "logits":
            return torch.topk(logits, k, dim=-1).indices
        return torch.topk(scores, k, dim=-1).indices

    def weights_for(self, router: torch.nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Combine weights the model would give to ``indices`` (``[T, k]``) from these ``logits``.

        Also used to force a selection (perfect-routing evaluation): the weights are then the router's own
        weights for the forced experts.
        """
        opts = self.router_class(router)
        if self.selection == "logits":
            return torch.softmax(logits.gather(1, indices), dim=-1, dtype=logits.dtype)
        if self.selection == "softmax":
            weights = torch.softmax(logits.float(), dim=-1).gather(1, indices)
            renorm = opts.renormalize if opts.renormalize is not None else bool(router.norm_topk_prob)
            if renorm:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights.to(logits.dtype) if opts.weights_in_logits_dtype else weights
        weights = logits.float().sigmoid().gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor

    def route(self, router: torch.nn.Module, logits: torch.Tensor) -> Routing:
        """Everything the router decides, from its logits."""
        logits = logits.reshape(-1, logits.shape[-1])
        scores = self.rank_scores(router, logits)
        indices = self.select(router, logits, scores)
        return Routing(
            logits=logits.float(),
            rank_scores=scores,
            indices=indices,
            weights=self.weights_for(router, logits, indices),
        )

    def distribution(self, routing: Routing) -> torch.Tensor:
        """float32 ``[T, E]`` routing probabilities for KL: a softmax over experts, or per-expert sigmoids."""
        if self.selection == "sigmoid_bias":
            return routing.logits.sigmoid()
        return torch.softmax(routing.logits, dim=-1)

    @property
    def bernoulli(self) -> bool:
        """Sigmoid routers score each expert independently: their KL is a mean of per-expert Bernoulli KLs."""
        return self.selection == "sigmoid_bias"

    def router_class(self, router: torch.nn.Module) -> RouterClass:
        return self.classes[type(router).__name__]


FAMILIES: tuple[RouterFamily, ...] = (
    RouterFamily(
        name="softmax_topk",
        selection="softmax",
        classes={
            "Qwen3MoeTopKRouter": RouterClass(),
            "Qwen2MoeTopKRouter": RouterClass(),
            "OlmoeTopKRouter": RouterClass(),
            "MixtralTopKRouter": RouterClass(renormalize=True, weights_in_logits_dtype=False),
        },
    ),
    RouterFamily(
        name="sigmoid_bias_group_topk",
        selection="sigmoid_bias",
        classes={
            "DeepseekV3TopkRouter": RouterClass(),
            "Glm4MoeTopkRouter": RouterClass(),
            "SolarOpenTopkRouter": RouterClass(),
            "NemotronHTopkRouter": RouterClass(),
        },
    ),
    RouterFamily(
        name="logits_topk_softmax",
        selection="logits",
        classes={"GptOssTopKRouter": RouterClass()},
        router_attr="router",
    ),
)

_BY_CLASS: dict[str, RouterFamily] = {cls: fam for fam in FAMILIES for cls in fam.classes}


def supported_router_classes() -> list[str]:
    return sorted(_BY_CLASS)


def family_of(router: torch.nn.Module, where: str = "") -> RouterFamily:
    """The family describing ``router``; a clear error naming the class when none does."""
    name = type(router).__name__
    try:
        return _BY_CLASS[name]
    except KeyError:
        at = f" at '{where}'" if where else ""
        raise UnsupportedRouterError(
            f"unsupported MoE router class {name}{at}; supported: {', '.join(supported_router_classes())}"
        ) from None


@dataclass
class MoELayer:
    """One MoE block of a model and the parts routealign needs from it."""

    name: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    block: torch.nn.Module
    router_name: str
    router: torch.nn.Module
    family: RouterFamily
    experts_name: str
    experts: torch.nn.Module
    shared_expert_names: list[str]
    layer_index: int | None  # decoder layer index parsed from the path

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def num_experts(self) -> int:
        return int(self.router.num_experts)

    def route(self, hidden: torch.Tensor) -> Routing:
        """Route ``hidden`` (the block's input) exactly as the model would."""
        return self.family.route(self.router, self.family.logits(self.router, hidden))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "layer_index": self.layer_index,
            "router": self.router_name,
            "router_class": type(self.router).__name__,
            "family": self.family.name,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "experts": self.experts_name,
            "experts_class": type(self.experts).__name__,
            "shared_experts": self.shared_expert_names,
        }


_ROUTER_ATTRS = ("gate", "router")
_SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_expert_gate")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def _holds_experts(experts: torch.nn.Module) -> bool:
    """Fused (3-D ``down_proj``) or linearized (per-expert children with ``down_proj``) expert weights."""
    return hasattr(experts, "down_proj") or any(hasattr(c, "down_proj") for c in experts.children())


def find_moe_layers(model: torch.nn.Module, require: bool = True) -> list[MoELayer]:
    """Every MoE block of ``model`` in module order.

    A module is an MoE block when it holds an ``experts`` submodule and a router (``gate`` or ``router``). A router
    whose class no family describes, or expert weights without a router, raise :class:`UnsupportedRouterError`
    naming the class and module path. With
    ``require`` (the default), a model without MoE blocks raises :class:`NotMoEError`.
    """
    layers: list[MoELayer] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        router_attr = next(
            (a for a in _ROUTER_ATTRS if isinstance(getattr(module, a, None), torch.nn.Module)), None
        )
        if router_attr is None:
            if _holds_experts(experts):
                raise UnsupportedRouterError(
                    f"{name or type(model).__name__} holds experts but no router (looked for attributes "
                    f"{', '.join(repr(a) for a in _ROUTER_ATTRS)})"
                )
            continue
        router = getattr(module, router_attr)
        prefix = f"{name}." if name else ""
        family = family_of(router, where=f"{prefix}{router_attr}")
        match = _LAYER_RE.search(name)
        layers.append(
            MoELayer(
                name=name,
                block=module,
                router_name=f"{prefix}{router_attr}",
                router=router,
                family=family,
                experts_name=f"{prefix}experts",
                experts=experts,
                shared_expert_names=[
                    f"{prefix}{a}" for a in _SHARED_ATTRS if isinstance(getattr(module, a, None), torch.nn.Module)
                ],
                layer_index=int(match.group(1)) if match else None,
            )
        )
    if require and not layers:
        raise NotMoEError(
            f"{type(model).__name__} has no MoE layer (no module holds both `experts` and a `gate`/`router`)"
        )
    return layers


class StopForward(Exception):
    """Raised by a :class:`RouterTap` with ``stop_after`` once the routers it watches have run."""


class RouterTap(contextlib.AbstractContextManager):
    """Forward hooks on every router of ``layers``: records each router's logits per forward (detached unless
    ``detach=False``); when ``force`` maps a layer name to ``[T, k]`` indices, makes the router return those experts
    instead of its own; with ``stop_after``, raises :class:`StopForward` once the last router has run (the rest of
    the forward is not needed)."""

    def __init__(self, layers: list[MoELayer], force: dict[str, torch.Tensor] | None = None, detach: bool = True,
                 stop_after: bool = False):
        self.layers = layers
        self.force = force
        self.detach = detach
        self.stop_after = stop_after and bool(layers)
        self.logits: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: MoELayer):
        last = layer is self.layers[-1]

        def hook(module, args, output):
            logits = output[0]
            self.logits[layer.name] = logits.detach() if self.detach else logits
            if self.stop_after and last:
                raise StopForward
            if self.force is None:
                return None
            indices = self.force[layer.name].to(logits.device)
            weights = layer.family.weights_for(module, logits.reshape(-1, logits.shape[-1]), indices)
            return (logits, weights, indices)

        return hook

    def __enter__(self):
        self._handles = [layer.router.register_forward_hook(self._hook(layer)) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def routing(self, layer: MoELayer) -> Routing:
        return layer.family.route(layer.router, self.logits[layer.name])
