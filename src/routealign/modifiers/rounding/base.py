"""RouterAlignedRoundingModifier: the llm-compressor lifecycle around :class:`~.tune.BlockTuner`."""

from __future__ import annotations

import contextlib
import time
from typing import ClassVar

import torch
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.quantization.utils import is_module_quantized
from compressed_tensors.utils import align_modules, match_named_modules
from loguru import logger
from pydantic import PrivateAttr

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.calibration import apply_calibration_status
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.modifiers.utils.hooks import HooksMixin

from ...distributed import all_reduce, refuse_disk_offload, suspended_offloading, world_size, write_parameters
from ...errors import InputError, NotMoEError
from ...losses import objective
from ...routing import find_moe_layers
from ...runner import LMTail
from ...schemes import WeightQuantizer, input_global_scale
from ...validation import check_group_sizes
from ...compat import (initialize_quantization, keep_pipeline_passes_skipped, restore_pipeline_passes,
                      skip_pipeline_passes)
from ..common import CausalCalibration, decoder_layer_order, final_norm
from ..fields import document
from .config import TuningConfig
from .report import layer_report, unreachable_routers
from .tune import BlockTuner
from .weights import TunedWeight, quantized_writes

__all__ = ["RouterAlignedRoundingModifier"]


@document
class RouterAlignedRoundingModifier(Modifier, QuantizationMixin, TuningConfig):
    """Learned rounding (AutoRound-style signed gradient descent on rounding offsets and clip ranges, block by
    block) whose loss adds a router-alignment objective, so that the quantized model keeps the full-precision
    model's expert choices. Writes ordinary compressed-tensors parameters: ``save_pretrained(save_compressed=True)``
    gives a ``pack-quantized`` (int) or ``nvfp4-pack-quantized`` checkpoint that vLLM loads.

    Sample yaml:

    ```yaml
    quant_stage:
      quant_modifiers:
        RouterAlignedRoundingModifier:
          objective: vsraq          # none | topk_mse | kl | vsraq | expertquant
          router_scope: next        # block | next | both
          router_weight: 0.1
          iters: 200
          scheme: W4A16             # W4A16, W4A16_ASYM, W3A16, W2A16, NVFP4, NVFP4A16
          targets: [Linear]
          ignore: [lm_head]
          holdout: {fraction: 0.125, decide_on: lm_head}   # what the held-out sequences decide
          gate: {z: 0.0, headroom: false}                   # the router term kept per block where it wins
          memory: {max_tuning_gib: 60}                      # experts tuned in chunks that fit
          loss: {vsraq: {alpha: 0.3}}                       # each objective's own settings
    ```

    Routers and ``shared_expert_gate`` are added to ``ignore`` automatically (vLLM needs them unquantized).

    Lifecycle:

    - on_initialize
        - add every router and shared_expert_gate to ``ignore``; apply the quantization config to the model
        - find the decoder layers (llm-compressor's sequential targets)
        - draw the calibration sequences from the calibration dataloader (:mod:`routealign.calibration`: whole
          rows, any length, padding removed) and check them
    - on_calibration_start
        - mark targets as calibrating
    - on_sequential_epoch_end (once per decoder layer, in order)
        - inputs: the model's own forward up to the first layer on the calibration sequences (right-padded, padded
          positions left out of every loss and statistic); after that the quantized and unquantized streams that the
          previous layer's tuning computed with :mod:`routealign.streams` (each layer run as the model's forward
          runs it: its own causal mask and attention; llm-compressor's propagated activations are not used)
        - :class:`~routealign.modifiers.rounding.tune.BlockTuner`: unquantized targets, starving-expert fallback, tuning loop
          (with and without the router term when ``gate``), the iteration and arm chosen on held-out data
        - write quantize-dequantized weights, ``weight_scale``, ``weight_zero_point``, ``weight_global_scale``, and
          for activation-quantized NVFP4 ``input_global_scale`` from routed tokens
    - on_calibration_end
        - remove hooks; freeze quantization (observers removed, quantization enabled)
    - on_finalize
        - refuse a run in which a decoder layer with targets was never tuned (its scales would be uninitialised)
    """

    requires_calibration_data: bool = True
    routealign_own_streams: ClassVar[bool] = True  # nothing taken from llm-compressor's pipeline passes
    # every algorithm field (its default, range and description) is declared once, in TuningConfig
    _layer_names: dict[int, str] = PrivateAttr(default_factory=dict)
    _layer_order: list[str] = PrivateAttr(default_factory=list)
    _calibration: CausalCalibration | None = PrivateAttr(default=None)
    _fp_hidden: torch.Tensor | None = PrivateAttr(default=None)
    _q_hidden: torch.Tensor | None = PrivateAttr(default=None)
    _report: list[dict] = PrivateAttr(default_factory=list)
    _targets: set[str] = PrivateAttr(default_factory=set)
    _outside: list[str] = PrivateAttr(default_factory=list)

    def tuning_config(self) -> TuningConfig:
        return TuningConfig.of(self)

    @property
    def report(self) -> list[dict]:
        """Per tuned layer: name, loss before/after, iterations, seconds, experts that fell back to RTN."""
        return list(self._report)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        moe_layers = find_moe_layers(model, require=False)
        if self.objective != "none" and not moe_layers:
            raise NotMoEError(
                f"RouterAlignedRoundingModifier(objective='{self.objective}'): {type(model).__name__} has no MoE "
                "layer, so there is no router to align; use objective: none for dense models"
            )
        refuse_disk_offload(model, type(self).__name__)
        keep_unquantized = [l.router_name for l in moe_layers] + [
            n for l in moe_layers for n in l.shared_expert_names if n.endswith("shared_expert_gate")
        ]
        self.ignore = list(self.ignore) + [n for n in keep_unquantized if n not in self.ignore]
        if QuantizationMixin.has_config(self):
            from compressed_tensors.offload import disable_onloading

            # distributed: as llm-compressor's AutoRoundModifier, without a broadcast per new quantization parameter
            # (every rank computes the same values). Not otherwise: a disk-offloaded module's cache would then hold
            # the new parameters outside its index and fail to onload them (tested with disk offloading)
            with disable_onloading() if world_size() > 1 else contextlib.nullcontext():
                initialize_quantization(self, model)
        # everything checkable is checked now, before any calibration forward
        where = type(self).__name__
        self._layer_order = decoder_layer_order(model, kwargs.get("sequential_targets"))
        if QuantizationMixin.has_config(self):
            self._resolve_targets(model, where)
        check_group_sizes(model, where)
        self._check_packable_bits(model, where)
        if self.params is not None:
            objective(self.objective).check(self.params, moe_layers, where)
        self._calibration, summary = CausalCalibration.draw(state, self._layer_order, where)
        if summary is not None and summary.samples < self.batch_size:
            logger.warning(f"{where}: {summary.samples} calibration sequences, fewer than batch_size "
                           f"{self.batch_size}; every iteration uses all of them")
        for param in model.parameters():
            param.requires_grad_(False)
        self._layer_names = {id(model.get_submodule(n)): n for n in self._layer_order}
        return True

    def _resolve_targets(self, model: torch.nn.Module, where: str) -> None:
        """The modules this modifier quantizes (its own targets and ignore, never another modifier's), the ones
        outside every decoder layer (RTN at the end of calibration; lm_head's input activations from the final
        norm of the quantized stream); a clear error when nothing matches or an outside module needs activation
        statistics this modifier cannot take."""
        named = [(n, m) for n, m in match_named_modules(model, self.resolved_targets, self.ignore)
                 if is_module_quantized(m) and m.quantization_scheme.weights is not None
                 and getattr(m, "weight", None) is not None]
        if not named:
            raise InputError(
                f"{where}: targets {sorted(self.resolved_targets)} with ignore {list(self.ignore)} match no "
                f"quantizable module of {type(model).__name__}; nothing would be quantized"
            )
        self._targets = {n for n, _ in named}
        inside = tuple(f"{l}." for l in self._layer_order)
        self._outside = [n for n, _ in named if not n.startswith(inside)]
        head = model.get_output_embeddings()
        for n in self._outside:
            module = model.get_submodule(n)
            if _needs_input_scale(module) and module is not head:
                raise InputError(
                    f"{where}: {n} lies outside the decoder layers and quantizes its input activations; "
                    "routealign calibrates those only for decoder layers and the LM head: add it to ignore"
                )

    def _check_packable_bits(self, model: torch.nn.Module, where: str) -> None:
        """Tuned int weights of more than 4 bits on a model not in float32 are refused: compressed-tensors packs the
        integers it re-derives from the written weight in the model's dtype, and bf16 cannot reach every 8-bit
        integer that way (a tuned decision would be stored as another). ``iters: 0`` (RTN, identical to
        QuantizationModifier) and float32 models are exact."""
        if self.iters == 0:
            return
        for name in sorted(self._targets):
            module = model.get_submodule(name)
            args = module.quantization_scheme.weights
            if args.type == "int" and int(args.num_bits) > 4 and module.weight.dtype != torch.float32:
                raise InputError(
                    f"{where}: {name} is {module.weight.dtype} with {args.num_bits}-bit integer weights "
                    f"(scheme {self.scheme}): compressed-tensors packs integers re-derived in {module.weight.dtype}, "
                    f"which cannot hold every tuned {args.num_bits}-bit decision. Set iters: 0 (RTN, identical to "
                    "QuantizationModifier), load the model in float32, or use a scheme of at most 4 bits"
                )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        if skip_pipeline_passes(state.model, self._layer_order):
            logger.info("RouterAlignedRoundingModifier: llm-compressor's calibration and propagation passes skip the "
                        "decoder layers (every modifier of the recipe computes its own causal streams)")
        head = state.model.get_output_embeddings()
        if head is not None and any(state.model.get_submodule(n) is head for n in self._outside) and getattr(
                state.model.config, "tie_word_embeddings", False):
            from llmcompressor.utils.transformers import untie_word_embeddings

            untie_word_embeddings(state.model)  # quantizing the LM head must not change the input embeddings
        for _, module in match_named_modules(state.model, self.resolved_targets, self.ignore):
            apply_calibration_status(module)

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        layers = [m for m in modules if id(m) in self._layer_names]
        if len(layers) > 1:
            raise ValueError("RouterAlignedRoundingModifier tunes one decoder layer per sequential subgraph; got "
                             f"{[self._layer_names[id(m)] for m in layers]} (sequential_targets_per_subgraph=1)")
        for block in layers:
            self._tune_layer(state.model, block)
        keep_pipeline_passes_skipped(state.model)  # putting offloading back reset the layers' forwards

    def _tune_layer(self, model: torch.nn.Module, block: torch.nn.Module) -> None:
        name = self._layer_names[id(block)]
        # Both streams are ours: llm-compressor 0.14.0.1's sequential pipeline runs decoder layers with eager
        # attention and attention_mask=None (bidirectional attention), so the activations it propagates to the
        # second layer onwards are not the causal model's, and it gives layers no padding mask. Nothing is taken from
        # it: the first layer's inputs and every layer's keyword arguments (causal mask, position embeddings) come
        # from the model's own forward (routealign.streams.StreamEngine) on routealign's calibration sequences.
        calibration = self._calibration
        if self._q_hidden is None:
            # in a canonical order of the sequences the held-out split and the minibatches depend only on the set
            # of the sequences and the seed; under torch.distributed each rank keeps its part of that order
            self._q_hidden = self._fp_hidden = calibration.first_inputs(canonical=True, shard=True)
        layer_kwargs = calibration.layer_kwargs(self._q_hidden.shape[1])
        q = calibration.inputs(name, self._q_hidden)
        fp = q.with_hidden(self._fp_hidden)
        # only this modifier's own targets: another modifier in the recipe (e.g. GPTQ on attention) quantizes its
        targets = {n: m.quantization_scheme.weights for n, m in block.named_modules()
                   if f"{name}.{n}" in self._targets}
        activations = {n: m.quantization_scheme.input_activations for n, m in block.named_modules()
                       if n in targets and _needs_input_scale(m)}
        chain = self._downstream(model, name)
        start = time.perf_counter()
        downstream = [model.get_submodule(n) for n in chain]
        lm_tail = None
        if "lm_head" in (self.holdout.decide_on, self.holdout.iteration_on):
            rest = self._layer_order[self._layer_order.index(name) + 1:]
            # the rest of the model is onloaded one module at a time when it runs, never whole
            lm_tail = LMTail([model.get_submodule(n) for n in rest], [layer_kwargs[n] for n in rest],
                             final_norm(model), model.get_output_embeddings(), onload=_onloaded)
        # our own forwards must not trigger hooks (another modifier's, e.g. GPTQ's, would record them)
        with HooksMixin.disable_hooks(), align_modules([block] + downstream):
            output_norm = final_norm(model) if not chain else None
            with suspended_offloading(*_distinct(block, *downstream, output_norm)):
                tuner = BlockTuner(block, targets, self.tuning_config(), downstream, name,
                                   output_norm=output_norm, activations=activations,
                                   next_kwargs=[layer_kwargs[n] for n in chain], lm_tail=lm_tail)
                unreachable = unreachable_routers(tuner, name)
                result = tuner.tune(q, fp, calibration.offset, calibration.total)
            result.write()
            with suspended_offloading(block):
                scales = tuner.runner.input_global_scales(q, list(activations),
                                                          all_tokens=self.rounding.activation_scale_tokens == "all")
                modules = {n: block.get_submodule(n) for n in scales}
                write_parameters([(modules[n], "input_global_scale", scale.to(modules[n].input_global_scale.dtype))
                                  for n, scale in scales.items()])
                simulate = self.rounding.quantize_activations and bool(activations)
                quantizers = tuner.runner.activation_quantizers(q, scales) if simulate else {}
                self._q_hidden = tuner.runner.propagate(q, quantizers).cpu()
        self._fp_hidden = result.outputs.cpu()
        self._report.append(layer_report(name, chain, calibration.total, tuner, result, unreachable,
                                         time.perf_counter() - start))

    def _downstream(self, model: torch.nn.Module, name: str) -> list[str]:
        """The decoder layers after ``name`` up to and including the first one that routes (all remaining layers
        when none does; empty for the last layer)."""
        index = self._layer_order.index(name)
        chain = []
        for later in self._layer_order[index + 1:]:
            chain.append(later)
            if find_moe_layers(model.get_submodule(later), require=False):
                break
        return chain

    @torch.no_grad()
    def _quantize_outside(self, model: torch.nn.Module) -> None:
        """RTN (compressed-tensors' arithmetic, as QuantizationModifier) for targets outside the decoder layers;
        the LM head's NVFP4 input global scale from the final norm of the quantized stream."""
        writes = []
        for n in self._outside:
            module = model.get_submodule(n)
            with _onloaded(module):
                quantizer = WeightQuantizer(module.quantization_scheme.weights, full_range=self.rounding.full_range)
                scale = quantizer.global_scale(module.weight.detach()) if quantizer.uses_global_scale else None
                writes += quantized_writes(TunedWeight(n, module, quantizer, scale, None), n)
                if _needs_input_scale(module) and self._q_hidden is not None:
                    norm = final_norm(model)
                    hidden = self._q_hidden
                    with align_modules([norm]) if norm is not None else contextlib.nullcontext():
                        amax = max(float((norm(hidden[i : i + 8].to(module.weight.device)) if norm is not None
                                          else hidden[i : i + 8]).abs().amax()) for i in range(0, hidden.shape[0], 8))
                    if world_size() > 1:  # the largest on any rank's sequences
                        amax = float(all_reduce([torch.tensor([amax])], op="max")[0])
                    gparam = input_global_scale(amax, n)
                    writes.append((module, "input_global_scale", gparam.to(module.input_global_scale.dtype)))
        write_parameters(writes)
        if self._outside:
            logger.info(f"RouterAlignedRoundingModifier: RTN for {len(self._outside)} targeted module(s) outside the "
                        f"decoder layers: {', '.join(self._outside[:5])}")

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        restore_pipeline_passes(state.model)
        self._quantize_outside(state.model)
        QuantizationMixin.end_calibration(self, state.model)
        self.remove_hooks()
        if self._calibration is not None:
            self._calibration.release()
        self._fp_hidden = None
        self._q_hidden = None


    def on_finalize(self, state: State, **kwargs) -> bool:
        """End if llm-compressor did not; refuse (as GPTQModifier does) a run that left a layer with targets untuned."""
        if not self.ended_:
            self.on_end(state, None)
        tuned = {row["layer"] for row in self._report}
        missing = [n for n in self._layer_order
                   if n not in tuned and any(t.startswith(n + ".") for t in self._targets)]
        if missing:
            raise ValueError(f"RouterAlignedRoundingModifier: {len(missing)} decoder layers with targets were never "
                             f"tuned ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): no sequential "
                             "epoch ended for them; nothing is saved")
        return True


@contextlib.contextmanager
def _onloaded(module: torch.nn.Module):
    """``module`` on its execution device with compressed-tensors' offloading taken off, for one use."""
    with align_modules([module]), suspended_offloading(module):
        yield


def _distinct(*modules: torch.nn.Module | None) -> list[torch.nn.Module]:
    """``modules`` without ``None`` and repeats (by identity), in order."""
    out: list[torch.nn.Module] = []
    for m in modules:
        if m is not None and all(m is not o for o in out):
            out.append(m)
    return out


def _needs_input_scale(module: torch.nn.Module) -> bool:
    """Dynamic group-quantized input activations under a calibrated global scale (NVFP4)."""
    acts = getattr(getattr(module, "quantization_scheme", None), "input_activations", None)
    return (acts is not None and acts.dynamic in (True, "local")
            and acts.strategy == QuantizationStrategy.TENSOR_GROUP and hasattr(module, "input_global_scale"))
