"""ExpertAwareSmoothingModifier: the llm-compressor lifecycle of the expert-aware smoothing (statistics and sites in
:mod:`.sites`, the fold algebra in :mod:`.folds`)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from compressed_tensors.quantization.utils import is_module_quantized
from loguru import logger
from pydantic import Field, PrivateAttr

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin

from ...distributed import refuse_disk_offload
from ...errors import InputError, NotMoEError
from ...routing import MoELayer, find_moe_layers
from ...schemes import WeightQuantizer
from ...streams import run_block
from ..fields import document, renamed
from ...compat import keep_pipeline_passes_skipped, restore_pipeline_passes, skip_pipeline_passes
from ..common import CausalCalibration, decoder_layer_order
from .folds import (
    MAPPINGS,
    FoldPlan,
    Mapping,
    attention_inputs,
    attention_pairs,
    expert_fold_power,
    input_norm_of,
    mlp_pairs,
    search_alpha,
)
from .sites import (
    Site,
    SiteContext,
    SiteStats,
    attention_input_site,
    attention_vo_site,
    expert_down_sites,
    mlp_down_site,
    moe_experts,
    moe_input_site,
    observe_routed,
)

__all__ = ["ExpertAwareSmoothingModifier"]


@document
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
          rows, any length, padding removed) and check them; refuse a later llm-compressor modifier that
          calibrates activation quantization (its statistics would predate the smoothing)
    - on_calibration_start
        - hooks: MoE block input (routed per expert with the model's own router; expert intermediates computed on
          routed tokens only), input norm output (checked equal to the block input), ``o_proj`` and dense/shared
          ``down_proj`` inputs; they record only while the modifier runs a layer on its own causal stream, each
          sequence cut to its real length (no padded position reaches a statistic)
    - on_sequential_epoch_end (per decoder layer, before the quantizing modifier's)
        - run the layer on the modifier's causal stream (:mod:`routealign.streams`: the model's own masks and
          attention; llm-compressor's propagated activations are bidirectional and are not used) to collect the
          statistics
        - choose scales (``expertquant``: eq. 4 with ``smoothing_strength``; ``search``: best strength on ``grid`` or
          none by the quantized reconstruction error on routed tokens), fold them, rescale GPTQ Hessians of the modules
          whose inputs were rescaled
        - run the folded layer on the causal stream: the next layer's input
    - on_calibration_end
        - remove hooks
    """

    requires_calibration_data: bool = True
    routealign_own_streams: ClassVar[bool] = True  # nothing taken from llm-compressor's pipeline passes

    mode: Literal["search", "expertquant"] = Field("search", description=(
        "`search` (per mapping, the `a` on `grid`, or none, that minimises the quantized consumers' reconstruction "
        "error on routed calibration tokens) or `expertquant` (the paper's eq. 4 with `smoothing_strength`)."))
    smoothing_strength: float = Field(0.6, ge=0, le=1, description=(
        "migration strength `a` of `expertquant` mode (the paper's α, 0.6; SmoothQuantModifier's name)."))
    grid: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)], description=(
        "candidate `a` values of `search` mode (no smoothing is always a candidate)."))
    mappings: list[Mapping] = Field(default_factory=lambda: list(MAPPINGS), description=(
        "which folds to apply (`routealign.modifiers.smoothing.folds`)."))
    s_min: float = Field(1e-4, gt=0, description="lower clip of every scale.")
    s_max: float = Field(1e4, gt=0, description="upper clip of every scale.")
    search_tokens: int = Field(4096, ge=16, description="calibration tokens kept per fold site for the search.")
    scheme: str | None = Field(None, description=(
        "the quantization preset the search assumes when no quantizing modifier has configured the model."))

    _layers: dict[str, MoELayer] = PrivateAttr(default_factory=dict)
    _renamed = renamed({"alpha": "smoothing_strength (SmoothQuantModifier's name; alpha is loss.vsraq.alpha)"})
    _norms: dict[str, str] = PrivateAttr(default_factory=dict)
    _decoder: list[str] = PrivateAttr(default_factory=list)
    _attn: list[tuple[str, str, int]] = PrivateAttr(default_factory=list)
    _mlps: list[tuple[str, str, str, int]] = PrivateAttr(default_factory=list)
    _attn_in: list[tuple[str, str, list[str]]] = PrivateAttr(default_factory=list)
    _stats: dict[str, SiteStats] = PrivateAttr(default_factory=dict)
    _pending_norm: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)
    _done: set = PrivateAttr(default_factory=set)
    _report: list[dict] = PrivateAttr(default_factory=list)
    _powers: dict[str, list[int | None]] = PrivateAttr(default_factory=dict)
    _decoder_ids: dict[int, str] = PrivateAttr(default_factory=dict)
    _stat_hooks: set = PrivateAttr(default_factory=set)
    _hidden: torch.Tensor | None = PrivateAttr(default=None)
    _calibration: CausalCalibration | None = PrivateAttr(default=None)
    _recording: bool = PrivateAttr(default=False)

    @property
    def report(self) -> list[dict]:
        """One row per fold site: mapping, module, chosen strength, scale range, search errors, or why skipped."""
        return list(self._report)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        where = type(self).__name__
        if self.s_min >= self.s_max:
            raise InputError(f"{where}: s_min ({self.s_min}) must be below s_max ({self.s_max})")
        refuse_disk_offload(model, where)
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
                folds = [expert_fold_power(e) for e in moe_experts(layer)]
                self._powers[layer.name] = [power for power, _ in folds]
                for reason in sorted({reason for power, reason in folds if power is None}):
                    self._skip("expert_down", layer.experts_name, reason)
        self._decoder = decoder_layer_order(model, kwargs.get("sequential_targets"))
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
        # the same draw as routealign's rounding modifier
        self._calibration, _ = CausalCalibration.draw(state, self._decoder, where)
        _check_later_modifiers(self)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        """Statistics hooks, which record only while the modifier runs a layer on its own causal stream (never
        during llm-compressor's propagation: bidirectional from the second layer on)."""
        model = state.model
        skip_pipeline_passes(model, self._decoder)

        def add(module, hook, kind, **kw):
            def gated(*args, **kwargs):
                return hook(*args, **kwargs) if self._recording else None

            self._stat_hooks.add(self.register_hook(module, gated, kind, **kw))

        for name, layer in self._layers.items():
            self._stats[name] = SiteStats(self.search_tokens)
            add(layer.block, self._moe_hook(name), "forward_pre", with_kwargs=True)
            if name in self._norms:
                add(model.get_submodule(self._norms[name]), self._norm_hook(name), "forward")
        for _, o_name, _ in self._attn:
            self._stats[o_name] = SiteStats(self.search_tokens)
            add(model.get_submodule(o_name), self._input_hook(o_name), "forward_pre")
        for _, _, down_name, _ in self._mlps:
            self._stats[down_name] = SiteStats(self.search_tokens)
            add(model.get_submodule(down_name), self._input_hook(down_name), "forward_pre")
        for attn, norm, _ in self._attn_in:
            self._stats[attn] = SiteStats(self.search_tokens)
            self._norms[attn] = norm
            add(model.get_submodule(attn), self._site_hook(attn), "forward_pre", with_kwargs=True)
            add(model.get_submodule(norm), self._norm_hook(attn), "forward")


    @torch.no_grad()
    def _run_causal(self, model, name: str, record: bool, per_pass: int = 8) -> torch.Tensor:
        """Layer ``name`` on the modifier's own causal stream (routealign.streams: the model's own masks and
        attention); with ``record`` only the statistics hooks fire, otherwise no hook does. Returns its output."""
        if self._hidden is None:
            # in a canonical order (the token sample of the search is the stream's first tokens, so it depends only
            # on the set of sequences); under torch.distributed every rank smooths on the whole set (gathered when
            # drawn): every rank computes the same statistics, searches and scales, with no reduction to get wrong
            self._hidden = self._calibration.first_inputs(canonical=True)
        inputs = self._calibration.inputs(name, self._hidden)
        block = model.get_submodule(name)
        out = torch.zeros_like(self._hidden)
        self._recording = record
        try:
            with HooksMixin.disable_hooks(keep=self._stat_hooks if record else set()):
                # every sequence cut to its real length: the statistics hooks see no padded position
                for idx, hidden, kwargs in inputs.by_length(per_pass):
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
            observe_routed(stats, layer, hidden, self._powers.get(name))
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
        keep_pipeline_passes_skipped(state.model)

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

    def _context(self) -> SiteContext:
        return SiteContext(self.s_min, self.s_max, lambda module: _quantizers(module, self.scheme))

    def _fold_experts_down(self, layer: MoELayer) -> None:
        stats = self._stats.get(layer.name)
        if stats is None or stats.hmax is None:
            return
        plans = [self._fold(site) if isinstance(site, Site) else
                 FoldPlan("expert_down", site, None, None, note="no routed calibration token: not smoothed")
                 for site in expert_down_sites(layer, stats, self._powers[layer.name], self._context())]
        self._log_plans(plans, layer.experts_name, "expert_down")

    def _fold_at(self, key: str, where: str, mapping: str, site) -> None:
        """Fold the site ``site(stats)`` builds from the statistics recorded at ``key`` (nothing without them)."""
        stats = self._stats.get(key)
        if stats is not None and stats.max is not None:
            self._log_plans([self._fold(site(stats))], where, mapping)

    def _fold_moe_input(self, model, layer: MoELayer) -> None:
        self._fold_at(layer.name, layer.name, "moe_input", lambda stats: moe_input_site(
            model, layer, self._norms[layer.name], stats, self._context()))

    def _fold_attention(self, model, v_name: str, o_name: str, head_dim: int) -> None:
        self._fold_at(o_name, o_name.rpartition(".")[0], "attention_vo", lambda stats: attention_vo_site(
            model, v_name, o_name, head_dim, stats, self._context()))

    def _fold_attention_input(self, model, attn: str, consumer_names: list[str]) -> None:
        self._fold_at(attn, attn, "attention_input", lambda stats: attention_input_site(
            model, attn, self._norms[attn], consumer_names, stats, self._context()))

    def _fold_mlp(self, model, mlp: str, up_name: str, down_name: str, power: int) -> None:
        self._fold_at(down_name, mlp, "mlp_down", lambda stats: mlp_down_site(
            model, mlp, up_name, down_name, power, stats, self._context()))

    def _fold(self, site: Site) -> FoldPlan:
        """The one skeleton of every mapping: choose a scale (``expertquant``: the formula at ``smoothing_strength``;
        ``search``: the grid or none, by ``site.error``), fold it (``site.apply`` returns the modules whose inputs
        it rescaled, with their input scales), rescale GPTQ Hessians accordingly, return the plan for the report."""
        plan = _plan(site, self.mode, self.smoothing_strength, tuple(self.grid))
        if plan.scale is not None:
            _rescale_hessians(site.apply(plan.scale))
        plan.extra.update(site.extra)
        return plan

    # -- reporting --------------------------------------------------------------------------------------------------
    def _skip(self, mapping: str, where: str, reason: str) -> None:
        logger.info(f"ExpertAwareSmoothingModifier: {mapping} at {where} skipped: {reason}")
        self._report.append({"mapping": mapping, "where": where, "skipped": reason})

    def _log_plans(self, plans: list[FoldPlan], where: str, mapping: str) -> None:
        self._report += [_report_row(p) for p in plans]
        logger.info(f"{where}: {mapping} folded {sum(p.scale is not None for p in plans)}/{len(plans)} ({self.mode})"
                    f"{_error_ratio(plans)}")

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        restore_pipeline_passes(state.model)
        self.remove_hooks()
        missing = [n for n in self._decoder if n not in self._done]
        if missing and self._stats:
            logger.warning(f"ExpertAwareSmoothingModifier: no sequential epoch ended for {missing[:3]}...; "
                           "nothing folded there")
        self._stats.clear()
        self._pending_norm.clear()
        self._stat_hooks.clear()
        self._hidden = None
        if self._calibration is not None:
            self._calibration.release()

    def on_finalize(self, state: State, **kwargs) -> bool:
        return True


def _plan(site: Site, mode: str, alpha: float, grid: tuple[float, ...]) -> FoldPlan:
    """The scale of a site: ``expertquant``, the formula at ``alpha``; ``search``, the best on ``grid`` or none."""
    if mode == "expertquant":
        return FoldPlan(site.mapping, site.where, site.candidate(alpha), alpha)
    best, scale, before, after = search_alpha(site.candidate, site.error, grid)
    return FoldPlan(site.mapping, site.where, scale, best, before, after,
                    note="" if scale is not None else "no alpha beat no smoothing")


def _report_row(plan: FoldPlan) -> dict:
    row = {"mapping": plan.mapping, "where": plan.where, "strength": plan.alpha, "folded": plan.scale is not None,
           "note": plan.note, **plan.extra}
    if plan.scale is not None:
        row.update(scale_min=float(plan.scale.min()), scale_max=float(plan.scale.max()))
    if plan.error_before is not None:
        row.update(error_before=plan.error_before, error_after=plan.error_after)
    return row


def _error_ratio(plans: list[FoldPlan]) -> str:
    errors = [(p.error_before, p.error_after) for p in plans if p.error_before]
    if not errors:
        return ""
    before = sum(b for b, _ in errors)
    after = sum(a for _, a in errors)
    return f", quantized reconstruction error x{after / before:.3f}"


def _check_later_modifiers(modifier: "ExpertAwareSmoothingModifier") -> None:
    """Refuse a later modifier of the recipe that calibrates static activation quantization."""
    from llmcompressor.core import active_session

    modifiers = list(active_session().lifecycle.recipe.modifiers)
    if modifier not in modifiers:
        return
    for other in modifiers[modifiers.index(modifier) + 1:]:
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


def _quantizers(module: torch.nn.Module, fallback: str | None) -> tuple[WeightQuantizer | None,
                                                                      WeightQuantizer | None]:
    """The weight and input quantizers ``module`` will get: its own scheme, else the preset ``fallback``."""
    scheme = getattr(module, "quantization_scheme", None) if is_module_quantized(module) else None
    if scheme is None and fallback is not None:
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(fallback, ["Linear"])
    if scheme is None:
        return None, None
    wq = WeightQuantizer(scheme.weights) if scheme.weights is not None else None
    aq = WeightQuantizer(scheme.input_activations) if scheme.input_activations is not None else None
    return wq, aq


def _rescale_hessians(pairs: list[tuple[torch.nn.Module, torch.Tensor]]) -> None:
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
