"""ExpertAwareSmoothingModifier: llm-compressor lifecycle glue for :mod:`routealign.smoothing`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from compressed_tensors.quantization.utils import is_module_quantized
from loguru import logger
from pydantic import Field, PrivateAttr

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.pytorch import infer_sequential_targets

from ..errors import InputError, NotMoEError
from ..routing import MoELayer, find_moe_layers
from ..schemes import WeightQuantizer
from ..smoothing import (
    MAPPINGS,
    FoldPlan,
    Mapping,
    aggregate_scales,
    attention_inputs,
    attention_pairs,
    column_absmax,
    expert_fold_power,
    expert_hidden,
    fold_norm_into_consumers,
    fold_up_down,
    fold_v_o,
    expand_kv,
    input_norm_of,
    mlp_pairs,
    reconstruction_error,
    reduce_to_kv,
    search_alpha,
    smooth_scales,
)
from ..calibration import CalibrationTokens, calibration_tokens
from ..streams import StreamEngine, run_block
from ..distributed import world_size

__all__ = ["ExpertAwareSmoothingModifier"]


class _Stats:
    """Running statistics of one mapping site: per-channel absolute maxima (per expert for MoE blocks), routed
    token counts, and a bounded sample of input tokens for the search."""

    def __init__(self, budget: int):
        self.budget = budget
        self.max: torch.Tensor | None = None
        self.extra_max: torch.Tensor | None = None  # MoE blocks: over all tokens (shared experts)
        self.hmax: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.sample: list[torch.Tensor] = []
        self.sample_idx: list[torch.Tensor] = []
        self.kept = 0
        self.checked = False

    def observe(self, x: torch.Tensor) -> None:
        """Per-channel maximum and sample of ``x`` (``[tokens, channels]``, float32)."""
        self.max = _update_max(self.max, x.abs().amax(0).cpu())
        self.keep(x)

    def keep(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        room = self.budget - self.kept
        if room <= 0:
            return
        self.sample.append(x[:room].detach().float().cpu())
        if idx is not None:
            self.sample_idx.append(idx[:room].cpu())
        self.kept += min(room, x.shape[0])


@dataclass
class _Site:
    """One fold site: its name and mapping, the scale for a migration strength ``a`` (``candidate``), the quantized
    reconstruction error under a scale or none (``error``), and the fold itself (``apply``: folds the scale, returns
    ``(module, input scale)`` for every module whose input it rescaled)."""

    where: str
    mapping: str
    candidate: Callable[[float], torch.Tensor]
    error: Callable[[torch.Tensor | None], float]
    apply: Callable[[torch.Tensor], list[tuple[torch.nn.Module, torch.Tensor]]]
    extra: dict = field(default_factory=dict)


def _fold_up_down(up, down, scale, power):
    fold_up_down(up, down, scale, power)
    return [(down, scale)]


def _fold_v_o(v, o, scale, head_dim):
    fold_v_o(v, o, scale, head_dim)
    return [(o, expand_kv(scale, o.in_features, head_dim))]


def _update_max(current: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if current is None else torch.maximum(current, value)


class ExpertAwareSmoothingModifier(Modifier):
    """ExpertQuant's Expert-Aware Scale, folded exactly into the weights so that the checkpoint stays a standard
    compressed-tensors checkpoint that stock vLLM serves. Statistics come from the tokens the router really sends
    to each expert (llm-compressor's all-experts calibration shows every expert every token; those are not used).
    Put it before the quantizing modifier in the same recipe.

    Sample yaml:

    ```yaml
    quant_stage:
      quant_modifiers:
        ExpertAwareSmoothingModifier:
          mode: search                 # search | expertquant
          mappings: [moe_input, expert_down, attention_vo, mlp_down]
        RouterAlignedRoundingModifier:
          objective: vsraq
          scheme: NVFP4
          targets: [Linear]
          ignore: [lm_head]
    ```

    Lifecycle:

    - on_initialize
        - find the MoE blocks, their input norms, attention v/o pairs and dense/shared MLPs of every decoder layer;
          say which folds are not exact for this model (logged and in ``report``)
        - draw the calibration sequences (:mod:`routealign.calibration`, shared with the rounding modifier: whole
          rows, any length, padding removed) and check them; refuse a later llm-compressor modifier that calibrates activation
          quantization (its statistics would predate the smoothing)
    - on_calibration_start
        - hooks: MoE block input (routed per expert with the model's own router; expert intermediates computed on
          routed tokens only), input norm output (checked equal to the block input), ``o_proj`` and dense/shared
          ``down_proj`` inputs; they record only while the modifier runs a layer on its own causal stream, each
          sequence cut to its real length (no padded position reaches a statistic)
    - on_sequential_epoch_end (per decoder layer, before the quantizing modifier's)
        - run the layer on the modifier's causal stream (:mod:`routealign.streams`: the model's own masks and
          attention; llm-compressor's propagated activations are bidirectional and are not used) to collect the
          statistics
        - choose scales (``expertquant``: eq. 4 with ``alpha``; ``search``: best ``alpha`` on ``grid`` or none by
          the quantized reconstruction error on routed tokens), fold them, rescale GPTQ Hessians of the modules
          whose inputs were rescaled
        - run the folded layer on the causal stream: the next layer's input
    - on_calibration_end
        - remove hooks

    :param mode: ``search`` or ``expertquant``
    :param alpha: migration strength ``a`` of ``expertquant`` mode (paper: 0.6)
    :param grid: candidate ``a`` values of ``search`` mode (no smoothing is always a candidate)
    :param mappings: which folds to apply (see :mod:`routealign.smoothing`)
    :param s_min: lower clip of every scale
    :param s_max: upper clip of every scale
    :param search_tokens: calibration tokens kept per mapping site for the search
    :param scheme: quantization preset the search assumes when no quantizing modifier has configured the model
    """

    requires_calibration_data: bool = True

    mode: Literal["search", "expertquant"] = "search"
    alpha: float = Field(0.6, ge=0, le=1)
    grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    mappings: list[Mapping] = Field(default_factory=lambda: list(MAPPINGS))
    s_min: float = Field(1e-4, gt=0)
    s_max: float = Field(1e4, gt=0)
    search_tokens: int = Field(4096, ge=16)
    scheme: str | None = None

    _layers: dict[str, MoELayer] = PrivateAttr(default_factory=dict)
    _norms: dict[str, str] = PrivateAttr(default_factory=dict)
    _decoder: list[str] = PrivateAttr(default_factory=list)
    _attn: list[tuple[str, str, int]] = PrivateAttr(default_factory=list)
    _mlps: list[tuple[str, str, str, int]] = PrivateAttr(default_factory=list)
    _attn_in: list[tuple[str, str, list[str]]] = PrivateAttr(default_factory=list)
    _stats: dict[str, _Stats] = PrivateAttr(default_factory=dict)
    _pending_norm: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _done: set = PrivateAttr(default_factory=set)
    _report: list[dict] = PrivateAttr(default_factory=list)
    _powers: dict[str, list[int | None]] = PrivateAttr(default_factory=dict)
    _decoder_ids: dict[int, str] = PrivateAttr(default_factory=dict)
    _stat_hooks: set = PrivateAttr(default_factory=set)
    _hidden: torch.Tensor | None = PrivateAttr(default=None)
    _tokens: CalibrationTokens | None = PrivateAttr(default=None)
    _engine: StreamEngine | None = PrivateAttr(default=None)
    _recording: bool = PrivateAttr(default=False)

    @property
    def report(self) -> list[dict]:
        """One row per fold site: mapping, module, chosen alpha, scale range, search errors, or why skipped."""
        return list(self._report)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        where = type(self).__name__
        if self.s_min >= self.s_max:
            raise InputError(f"{where}: s_min ({self.s_min}) must be below s_max ({self.s_max})")
        if world_size() > 1:
            # each rank would smooth from its own share of the calibration samples (different scales and search
            # choices), and the folds read-modify-write weights that compressed-tensors' distributed offload
            # shares between ranks
            raise InputError(
                f"{where}: llm-compressor's distributed mode ({world_size()} ranks) is not supported by the smoothing; "
                "run it in one process (oneshot with this modifier only, save_compressed=False), then quantize the "
                "saved model under torchrun"
            )
        wants_moe = {"moe_input", "expert_down"} & set(self.mappings)
        layers = find_moe_layers(model, require=False)
        if wants_moe and not layers:
            raise NotMoEError(f"{where}: {type(model).__name__} has no MoE layer; mappings {sorted(wants_moe)} "
                              "need one (use mappings: [attention_vo, mlp_down] for dense models)")
        self._layers = {l.name: l for l in layers}
        for layer in layers:
            norm = input_norm_of(model, layer.name)
            if norm is None and "moe_input" in self.mappings:
                self._skip("moe_input", layer.name, "no input norm found beside the MoE block")
            elif norm is not None:
                self._norms[layer.name] = norm
            if "expert_down" in self.mappings:
                folds = [expert_fold_power(e) for e in _experts(layer)]
                self._powers[layer.name] = [power for power, _ in folds]
                for reason in sorted({reason for power, reason in folds if power is None}):
                    self._skip("expert_down", layer.experts_name, reason)
        classes = set(infer_sequential_targets(model, sequential_targets=kwargs.get("sequential_targets")))
        self._decoder = [n for n, m in model.named_modules() if type(m).__name__ in classes]
        self._decoder_ids = {id(model.get_submodule(n)): n for n in self._decoder}
        for name in self._decoder:
            block = model.get_submodule(name)
            if "attention_vo" in self.mappings:
                pairs = attention_pairs(block, f"{name}.")
                self._attn += pairs
                if not pairs and any("attn" in n or "attention" in n for n, _ in block.named_children()):
                    self._skip("attention_vo", name, "attention without v_proj/o_proj (e.g. MLA): not folded")
            if "mlp_down" in self.mappings:
                self._mlps += mlp_pairs(block, f"{name}.")
            if "attention_input" in self.mappings:
                self._attn_in += attention_inputs(model, name)
        if state.data.calib is not None:
            # the same draw as routealign's rounding modifier
            _, self._tokens = calibration_tokens(state.data.calib, model.get_input_embeddings().num_embeddings,
                                                 f"{where}: calibration dataset")
        self._check_later_modifiers()
        return True

    def _check_later_modifiers(self) -> None:
        from llmcompressor.core import active_session

        modifiers = list(active_session().lifecycle.recipe.modifiers)
        if self not in modifiers:
            return
        for other in modifiers[modifiers.index(self) + 1:]:
            if type(other).__name__ == "RouterAlignedRoundingModifier":
                continue  # computes every statistic itself, after the smoothing
            try:
                config = getattr(other, "resolved_config", None)
                schemes = list(config.config_groups.values()) if config is not None else []
            except Exception:  # not a quantizing modifier
                schemes = []
            if any(s.input_activations is not None and s.input_activations.dynamic is not True for s in schemes):
                raise InputError(
                    f"ExpertAwareSmoothingModifier before {type(other).__name__} with static activation "
                    "quantization in one recipe: its activation statistics are collected before the smoothing is "
                    "applied. Use RouterAlignedRoundingModifier after the smoothing, or run the smoothing in its "
                    "own oneshot call first"
                )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        """Statistics hooks, which record only while the modifier runs a layer on its own causal stream (never
        during llm-compressor's propagation: bidirectional from the second layer on)."""
        model = state.model

        def add(module, hook, kind, **kw):
            def gated(*args, **kwargs):
                return hook(*args, **kwargs) if self._recording else None

            self._stat_hooks.add(self.register_hook(module, gated, kind, **kw))

        for name, layer in self._layers.items():
            self._stats[name] = _Stats(self.search_tokens)
            add(layer.block, self._moe_hook(name), "forward_pre", with_kwargs=True)
            if name in self._norms:
                add(model.get_submodule(self._norms[name]), self._norm_hook(name), "forward")
        for _, o_name, _ in self._attn:
            self._stats[o_name] = _Stats(self.search_tokens)
            add(model.get_submodule(o_name), self._input_hook(o_name), "forward_pre")
        for _, _, down_name, _ in self._mlps:
            self._stats[down_name] = _Stats(self.search_tokens)
            add(model.get_submodule(down_name), self._input_hook(down_name), "forward_pre")
        for attn, norm, _ in self._attn_in:
            self._stats[attn] = _Stats(self.search_tokens)
            self._norms[attn] = norm
            add(model.get_submodule(attn), self._site_hook(attn), "forward_pre", with_kwargs=True)
            add(model.get_submodule(norm), self._norm_hook(attn), "forward")


    @torch.no_grad()
    def _run_causal(self, model, name: str, record: bool, chunk: int = 8) -> torch.Tensor:
        """Layer ``name`` on the modifier's own causal stream (routealign.streams: the model's own masks and
        attention); with ``record`` only the statistics hooks fire, otherwise no hook does. Returns its output."""
        if self._engine is None:
            self._engine = StreamEngine(model, self._decoder)
        if self._hidden is None:
            if self._tokens is None:
                raise InputError("ExpertAwareSmoothingModifier: no calibration data was given (pass dataset= to "
                                 "oneshot)")
            self._hidden = self._tokens.first_inputs(self._engine)
        inputs = self._engine.block_inputs(name, self._hidden, self._tokens.lengths)
        block = model.get_submodule(name)
        out = torch.zeros_like(self._hidden)
        self._recording = record
        try:
            with HooksMixin.disable_hooks(keep=self._stat_hooks if record else set()):
                # every sequence cut to its real length: the statistics hooks see no padded position
                for idx, hidden, kwargs in inputs.by_length(chunk):
                    y, _ = run_block(block, None, hidden, kwargs)
                    out[idx, : hidden.shape[1]] = y.to(out.dtype)
        finally:
            self._recording = False
        return out

    # -- statistics -------------------------------------------------------------------------------------------------
    def _norm_hook(self, name: str):
        def hook(module, args, output):
            self._pending_norm[name] = output.detach() if isinstance(output, torch.Tensor) else output[0].detach()
        return hook

    def _moe_hook(self, name: str):
        layer = self._layers[name]

        @torch.no_grad()
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            stats = self._stats[name]
            if name in self._norms:
                self._verified(name, hidden, "moe_input")
            flat = hidden.reshape(-1, hidden.shape[-1])
            routing = layer.route(flat)  # in the model's dtype, exactly as the model routes
            x = flat.float()
            num = layer.num_experts
            if stats.max is None:
                stats.max = torch.zeros(num, x.shape[-1])
                stats.counts = torch.zeros(num, dtype=torch.long)
                stats.extra_max = torch.zeros(x.shape[-1])
            stats.extra_max = torch.maximum(stats.extra_max, x.abs().amax(0).cpu())
            experts = _experts(layer)
            powers = self._powers.get(name)
            for e in range(num):
                rows = (routing.indices == e).any(-1)
                count = int(rows.sum())
                if count == 0:
                    continue
                xe = x[rows]
                stats.counts[e] += count
                stats.max[e] = torch.maximum(stats.max[e], xe.abs().amax(0).cpu())
                if powers is not None and powers[e] is not None:
                    h = expert_hidden(experts[e], xe).abs().amax(0).cpu()
                    if stats.hmax is None:
                        stats.hmax = torch.zeros(num, h.shape[-1])
                    stats.hmax[e] = torch.maximum(stats.hmax[e], h)
            stats.keep(x, routing.indices)
        return hook

    def _verified(self, name: str, hidden: torch.Tensor, mapping: str) -> bool:
        """On the first batch: is the site's input exactly its norm's output? Otherwise the fold is dropped."""
        stats = self._stats[name]
        if not stats.checked:
            normed = self._pending_norm.pop(name, None)
            if normed is None or normed.shape != hidden.shape or not torch.equal(normed, hidden):
                self._skip(mapping, name, f"the output of {self._norms[name]} is not the block's input")
                self._norms.pop(name, None)
            stats.checked = True
        return name in self._norms

    def _site_hook(self, name: str):
        @torch.no_grad()
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not self._verified(name, hidden, "attention_input"):
                return
            self._stats[name].observe(hidden.reshape(-1, hidden.shape[-1]).float())
        return hook

    def _input_hook(self, name: str):
        @torch.no_grad()
        def hook(module, args):
            self._stats[name].observe(args[0].reshape(-1, args[0].shape[-1]).float())
        return hook

    # -- folding ----------------------------------------------------------------------------------------------------
    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        for module in modules:
            prefix = self._decoder_ids.get(id(module))
            if prefix is None or prefix in self._done:
                continue
            self._run_causal(state.model, prefix, record=True)  # statistics from the causal stream
            self._fold_decoder_layer(state.model, prefix)
            # the next layer's input: this layer, folded (exact, so the unquantized function is unchanged)
            self._hidden = self._run_causal(state.model, prefix, record=False)
            self._done.add(prefix)

    def _fold_decoder_layer(self, model, prefix: str) -> None:
        inside = lambda n: n.startswith(prefix + ".")  # noqa: E731
        for name in [n for n in self._layers if inside(n)]:
            if "expert_down" in self.mappings:
                self._fold_experts_down(self._layers[name])
            if "moe_input" in self.mappings and name in self._norms:
                self._fold_moe_input(model, self._layers[name])
        for v_name, o_name, head_dim in [p for p in self._attn if inside(p[1])]:
            self._fold_attention(model, v_name, o_name, head_dim)
        for mlp, up_name, down_name, power in [p for p in self._mlps if inside(p[2])]:
            self._fold_mlp(model, mlp, up_name, down_name, power)
        for attn, _, consumers in [p for p in self._attn_in if inside(p[0])]:
            if attn in self._norms:
                self._fold_attention_input(model, attn, consumers)
        for key in [k for k in self._stats if inside(k)]:
            del self._stats[key]

    def _quantizers(self, module: torch.nn.Module) -> tuple[WeightQuantizer | None, WeightQuantizer | None]:
        scheme = getattr(module, "quantization_scheme", None) if is_module_quantized(module) else None
        if scheme is None and self.scheme is not None:
            from compressed_tensors.quantization import preset_name_to_scheme

            scheme = preset_name_to_scheme(self.scheme, ["Linear"])
        if scheme is None:
            return None, None
        wq = WeightQuantizer(scheme.weights) if scheme.weights is not None else None
        aq = WeightQuantizer(scheme.input_activations) if scheme.input_activations is not None else None
        return wq, aq

    def _choose(self, candidate, error, where: str, mapping: str) -> FoldPlan:
        if self.mode == "expertquant":
            return FoldPlan(mapping, where, candidate(self.alpha), self.alpha)
        alpha, scale, before, after = search_alpha(candidate, error, tuple(self.grid))
        return FoldPlan(mapping, where, scale, alpha, before, after,
                        note="" if scale is not None else "no alpha beat no smoothing")

    def _fold_experts_down(self, layer: MoELayer) -> None:
        stats = self._stats.get(layer.name)
        if stats is None or stats.hmax is None:
            return
        x_all = torch.cat(stats.sample) if stats.sample else torch.zeros(0)
        idx_all = torch.cat(stats.sample_idx) if stats.sample_idx else torch.zeros(0, dtype=torch.long)
        plans = []
        for e, (expert, power) in enumerate(zip(_experts(layer), self._powers[layer.name])):
            if power is None:
                continue
            if int(stats.counts[e]) == 0:
                plans.append(FoldPlan("expert_down", f"{layer.experts_name}.{e}", None, None,
                                      note="no routed calibration token: not smoothed"))
                continue
            down = expert.down_proj
            wmax = column_absmax(down.weight)
            wq, aq = self._quantizers(down)
            rows = (idx_all == e).any(-1) if idx_all.numel() else torch.zeros(0, dtype=torch.bool)
            with torch.no_grad():
                h = expert_hidden(expert, x_all[rows].to(down.weight.device)) if rows.any() else x_all[:0]
            plans.append(self._fold(_Site(
                f"{layer.experts_name}.{e}", "expert_down",
                candidate=lambda a, hmax=stats.hmax[e], wmax=wmax: smooth_scales(hmax, wmax, a, self.s_min, self.s_max),
                error=lambda s, down=down, h=h, wq=wq, aq=aq: reconstruction_error(down.weight, h, s, wq, aq),
                apply=lambda s, up=expert.up_proj, down=down, power=power: _fold_up_down(up, down, s, power))))
        self._log_plans(plans, layer.experts_name, "expert_down")

    def _fold_moe_input(self, model, layer: MoELayer) -> None:
        stats = self._stats.get(layer.name)
        if stats is None or stats.max is None:
            return
        experts = _experts(layer)
        expert_weights = [[getattr(e, p) for p in ("gate_proj", "up_proj") if hasattr(e, p)] for e in experts]
        # the shared experts' modules that read the block input: gate/up projections and shared_expert_gate
        shared_named = [(f"{n}.{sub}" if sub else n, m) for n in layer.shared_expert_names
                        for sub, m in model.get_submodule(n).named_modules()
                        if isinstance(m, torch.nn.Linear)
                        and (f"{n}.{sub}" if sub else n).endswith(("gate_proj", "up_proj", "shared_expert_gate"))]
        shared = [m for _, m in shared_named]
        # shared_expert_gate stays unquantized: folded, but not part of the quantized error
        shared_quantized = [m for n, m in shared_named if not n.endswith("shared_expert_gate")]
        x_all = torch.cat(stats.sample) if stats.sample else torch.zeros(0, stats.max.shape[-1])
        idx_all = torch.cat(stats.sample_idx) if stats.sample_idx else torch.zeros(0, 1, dtype=torch.long)
        wmax = [column_absmax(*(m.weight for m in ws)) for ws in expert_weights]
        counts = stats.counts.clone()
        total = int(counts.sum()) // max(layer.top_k, 1)
        shared_wmax = column_absmax(*(m.weight for m in shared_quantized)) if shared_quantized else None

        def candidate(a: float) -> torch.Tensor:
            per = [smooth_scales(stats.max[e], wmax[e], a, self.s_min, self.s_max) for e in range(len(experts))]
            weights = counts.tolist()
            if shared_wmax is not None:
                per.append(smooth_scales(stats.extra_max, shared_wmax, a, self.s_min, self.s_max))
                weights.append(total)
            return aggregate_scales(torch.stack(per), torch.tensor(weights)).clamp(self.s_min, self.s_max)

        quant = [self._quantizers(ws[0]) for ws in expert_weights]

        def error(s: torch.Tensor | None) -> float:
            total_error = 0.0
            for e, ws in enumerate(expert_weights):
                rows = (idx_all == e).any(-1)
                if not rows.any():
                    continue
                weight = torch.cat([m.weight for m in ws])
                total_error += reconstruction_error(weight, x_all[rows], s, *quant[e])
            for m in shared_quantized:
                total_error += reconstruction_error(m.weight, x_all, s, *self._quantizers(m))
            return total_error

        consumers = [layer.router] + [m for ws in expert_weights for m in ws] + shared
        norm = self._norms[layer.name]
        plan = self._fold(_Site(layer.name, "moe_input", candidate, error,
                                apply=lambda s: self._fold_norm(model, norm, consumers, s),
                                extra={"norm": norm, "routed_tokens": stats.counts.tolist()}))
        self._log_plans([plan], layer.name, "moe_input")

    def _fold_attention(self, model, v_name: str, o_name: str, head_dim: int) -> None:
        stats = self._stats.get(o_name)
        if stats is None or stats.max is None:
            return
        v, o = model.get_submodule(v_name), model.get_submodule(o_name)
        kv = v.out_features
        xmax = reduce_to_kv(stats.max, kv, head_dim)
        wmax = reduce_to_kv(o.weight.detach().float().abs().amax(0), kv, head_dim)
        x = torch.cat(stats.sample) if stats.sample else torch.zeros(0, o.in_features)
        wq, aq = self._quantizers(o)
        where = o_name.rsplit(".", 1)[0]
        plan = self._fold(_Site(
            where, "attention_vo",
            candidate=lambda a: smooth_scales(xmax, wmax, a, self.s_min, self.s_max),
            error=lambda s: reconstruction_error(o.weight, x, None if s is None else expand_kv(s, o.in_features,
                                                                                               head_dim), wq, aq),
            apply=lambda s: _fold_v_o(v, o, s, head_dim)))
        self._log_plans([plan], where, "attention_vo")

    def _fold_attention_input(self, model, attn: str, consumer_names: list[str]) -> None:
        stats = self._stats.get(attn)
        if stats is None or stats.max is None:
            return
        consumers = [model.get_submodule(n) for n in consumer_names]
        wmax = column_absmax(*(m.weight for m in consumers))
        x = torch.cat(stats.sample) if stats.sample else torch.zeros(0, stats.max.shape[-1])
        quant = [self._quantizers(m) for m in consumers]
        norm = self._norms[attn]
        plan = self._fold(_Site(
            attn, "attention_input",
            candidate=lambda a: smooth_scales(stats.max, wmax, a, self.s_min, self.s_max),
            error=lambda s: sum(reconstruction_error(m.weight, x, s, *q) for m, q in zip(consumers, quant)),
            apply=lambda s: self._fold_norm(model, norm, consumers, s), extra={"norm": norm}))
        self._log_plans([plan], attn, "attention_input")

    def _fold_mlp(self, model, mlp: str, up_name: str, down_name: str, power: int) -> None:
        stats = self._stats.get(down_name)
        if stats is None or stats.max is None:
            return
        up, down = model.get_submodule(up_name), model.get_submodule(down_name)
        wmax = column_absmax(down.weight)
        x = torch.cat(stats.sample) if stats.sample else torch.zeros(0, down.in_features)
        wq, aq = self._quantizers(down)
        plan = self._fold(_Site(
            mlp, "mlp_down",
            candidate=lambda a: smooth_scales(stats.max, wmax, a, self.s_min, self.s_max),
            error=lambda s: reconstruction_error(down.weight, x, s, wq, aq),
            apply=lambda s: _fold_up_down(up, down, s, power)))
        self._log_plans([plan], mlp, "mlp_down")

    def _fold(self, site: "_Site") -> FoldPlan:
        """The one skeleton of every mapping: choose a scale (``expertquant``: the formula at ``alpha``;
        ``search``: the grid or none, by ``site.error``), fold it (``site.apply`` returns the modules whose inputs
        it rescaled, with their input scales), rescale GPTQ Hessians accordingly, return the plan for the report."""
        plan = self._choose(site.candidate, site.error, site.where, site.mapping)
        if plan.scale is not None:
            self._rescale_hessians(site.apply(plan.scale))
        plan.extra.update(site.extra)
        return plan

    @staticmethod
    def _fold_norm(model, norm: str, consumers: list[torch.nn.Module], scale: torch.Tensor):
        fold_norm_into_consumers(model.get_submodule(norm), consumers, scale)
        return [(m, scale) for m in consumers]

    def _rescale_hessians(self, pairs: list[tuple[torch.nn.Module, torch.Tensor]]) -> None:
        """A module whose input became ``x / s`` has Hessian ``diag(1/s) H diag(1/s)``: GPTQModifier accumulated
        its Hessians before the fold, so they are rescaled in place."""
        from llmcompressor.core import active_session

        for other in active_session().lifecycle.recipe.modifiers:
            hessians = getattr(other, "_hessians", None)
            if not isinstance(hessians, dict):
                continue
            for module, s in pairs:
                if module in hessians:
                    inv = (1.0 / s.float()).to(hessians[module].device)
                    hessians[module].mul_(inv[:, None]).mul_(inv[None, :])

    # -- reporting --------------------------------------------------------------------------------------------------
    def _skip(self, mapping: str, where: str, reason: str) -> None:
        logger.info(f"ExpertAwareSmoothingModifier: {mapping} at {where} skipped: {reason}")
        self._report.append({"mapping": mapping, "where": where, "skipped": reason})

    def _log_plans(self, plans: list[FoldPlan], where: str, mapping: str) -> None:
        folded = [p for p in plans if p.scale is not None]
        for p in plans:
            row = {"mapping": p.mapping, "where": p.where, "alpha": p.alpha, "folded": p.scale is not None,
                   "note": p.note, **p.extra}
            if p.scale is not None:
                row.update(scale_min=float(p.scale.min()), scale_max=float(p.scale.max()))
            if p.error_before is not None:
                row.update(error_before=p.error_before, error_after=p.error_after)
            self._report.append(row)
        ratio = ""
        errors = [(p.error_before, p.error_after) for p in plans if p.error_before]
        if errors:
            before = sum(b for b, _ in errors)
            after = sum(a for _, a in errors)
            ratio = f", quantized reconstruction error x{after / before:.3f}"
        logger.info(f"{where}: {mapping} folded {len(folded)}/{len(plans)} ({self.mode}){ratio}")

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        missing = [n for n in self._decoder if n not in self._done]
        if missing and self._stats:
            logger.warning(f"ExpertAwareSmoothingModifier: no sequential epoch ended for {missing[:3]}...; "
                           "nothing folded there")
        self._stats.clear()
        self._pending_norm.clear()
        self._stat_hooks.clear()
        self._hidden = self._tokens = None
        self._engine = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        return True


def _experts(layer: MoELayer) -> list[torch.nn.Module]:
    """The expert modules of a linearized MoE block (the container also holds its activation after them)."""
    return [c for c in layer.experts.children() if hasattr(c, "down_proj")][: layer.num_experts]
