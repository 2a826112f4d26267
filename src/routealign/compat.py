"""Every workaround for the llm-compressor, compressed-tensors and transformers releases routealign is pinned to, in
one place,
each naming the version whose behaviour it works around (:data:`TARGETS`; ``tests/test_compat.py`` fails when an
installed version differs, so that a pin bump revisits each of them).

Here:

- :func:`skip_pipeline_passes` (llm-compressor 0.14.0.1): its sequential pipeline runs every decoder layer in a
  calibration and a propagation pass, with eager attention and ``attention_mask=None`` (bidirectional); routealign's
  modifiers take nothing from those passes (their own causal streams, :mod:`routealign.streams`), so when every
  modifier of a recipe is such a modifier the passes are made free. Undone by :func:`restore_pipeline_passes`.
- :func:`synchronize_cpu_qparam_broadcasts` (llm-compressor 0.14.0.1): GPTQModifier and QuantizationModifier under
  torch.distributed on the CPU leave ranks unsynchronised after writing a module's quantization parameters.
- :func:`fp4_unpacked_in` (compressed-tensors 0.19.0): NVFP4 weights are unpacked to bfloat16 whatever the model's
  dtype.
- :func:`calibrate_all_experts` (llm-compressor 0.14.0.1): whether a linearized MoE block sends every calibration
  token through every expert is a module global (``moe.context._CALIBRATE_ALL_EXPERTS``, set once by ``oneshot``'s
  ``moe_calibrate_all_experts``); routealign's own forwards set it per forward, restored on exit.
- :func:`linearize_without_offload` (llm-compressor 0.14.0.1): ``linearize_moe`` offloads each new expert module
  like the module it replaces, which on the meta device would offload to "meta".
- :func:`default_gating` (transformers 5.17.0): a linearized gated expert computes ``act(gate) * up`` exactly when its
  ``_apply_gate`` is transformers' private ``_default_apply_gate``; nothing public says so.
- :func:`initialize_quantization` (llm-compressor 0.14.0.1): its group-size divisibility check raises a plain
  ``ValueError``; routealign reports it as an :class:`~routealign.errors.InputError` naming the modifier and scheme.

Elsewhere, because they are part of one routine there (each comment names the version):
:func:`routealign.distributed.init_distributed` (compressed-tensors 0.19.0's ``init_dist`` needs an accelerator: gloo
on the CPU), :mod:`routealign.calibration` (llm-compressor 0.14.0.1 partitions a dataset every rank shares: the
calibration draw takes the whole set and shards it itself), and :func:`routealign.experts.batched_experts` (the
linearized experts container's per-expert loop replaced by one grouped forward inside a context, undone on exit).
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["TARGETS", "OWN_STREAMS", "skip_pipeline_passes", "keep_pipeline_passes_skipped",
           "restore_pipeline_passes", "synchronize_cpu_qparam_broadcasts", "fp4_unpacked_in",
           "initialize_quantization", "calibrate_all_experts", "linearize_without_offload", "default_gating"]

TARGETS = {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0", "transformers": "5.17.0"}


# modifiers that take nothing from llm-compressor's sequential pipeline passes (every statistic and target comes from
# their own causal streams): the class attribute marks them
OWN_STREAMS = "routealign_own_streams"
_SKIPPED = "_routealign_pipeline_forward"  # a decoder layer's instance forward while the pipeline's passes are skipped
_SKIPPING = "_routealign_skipped_layers"  # on the model: the layers whose passes are skipped


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def skip_pipeline_passes(model: torch.nn.Module, layers: list[str]) -> bool:
    """When every modifier of the recipe takes its activations from its own causal streams (routealign's), make
    llm-compressor's sequential pipeline's passes over the decoder layers ``layers`` free: each layer returns its
    input there (no weight onloaded, no expert run), while routealign's own forwards (:func:`routealign.streams.
    plain_forwards` removes instance forwards) run the real layer. The pipeline's calibration and propagation passes
    compute activations nothing of such a recipe reads; another modifier in the recipe (GPTQ, AWQ, ...) needs them,
    and then nothing is changed. Returns whether the passes are skipped. Taking compressed-tensors' offloading off a
    layer and putting it back resets its forward: :func:`keep_pipeline_passes_skipped` after such work;
    :func:`restore_pipeline_passes` at the end."""
    from llmcompressor.core import active_session

    if _SKIPPING in model.__dict__:
        return True
    try:
        modifiers = list(active_session().lifecycle.recipe.modifiers)
    except AttributeError:  # no active recipe (a modifier driven by hand)
        return False
    if not modifiers or not all(getattr(type(m), OWN_STREAMS, False) for m in modifiers):
        return False
    model.__dict__[_SKIPPING] = list(layers)
    keep_pipeline_passes_skipped(model)
    return True


def keep_pipeline_passes_skipped(model: torch.nn.Module) -> None:
    """Put the pass-through back on every layer whose forward was reset since (compressed-tensors' offloading
    re-wraps a module's forward when it is put back); nothing when the passes are not skipped."""
    for name in model.__dict__.get(_SKIPPING, ()):
        layer = model.get_submodule(name)
        current = layer.__dict__.get("forward")
        if current is not _passthrough:
            layer.__dict__[_SKIPPED] = current
            layer.forward = _passthrough


def restore_pipeline_passes(model: torch.nn.Module) -> None:
    """Undo :func:`skip_pipeline_passes` (idempotent)."""
    for name in model.__dict__.pop(_SKIPPING, ()):
        layer = model.get_submodule(name)
        if _SKIPPED in layer.__dict__:
            original = layer.__dict__.pop(_SKIPPED)
            if layer.__dict__.get("forward") is _passthrough:
                layer.__dict__.pop("forward")
                if original is not None:
                    layer.forward = original


def synchronize_cpu_qparam_broadcasts() -> None:
    """Make llm-compressor's ``broadcast_qparams_and_cleanup`` end with a barrier (ranks on the CPU only).

    llm-compressor 0.14.0.1's GPTQModifier and QuantizationModifier quantize each module on one rank, then call it to
    broadcast the results; for modules that execute on the CPU it skips the broadcast (the weights are in memory the
    ranks share) and nothing else waits, so a rank can run the pipeline's propagation through a module another rank
    is still writing. Measured (GPTQ on the attention of a tiny Qwen3-MoE, 2 CPU ranks): 3 of 4 runs wrote layer 1
    differently from one process (a rank calibrated it on a half-written layer 0); with the barrier 4 of 4 were
    byte-identical to it. On accelerators the broadcasts synchronise the ranks and nothing is changed there."""
    import torch.distributed as dist
    from llmcompressor.modifiers.gptq import base as gptq_base
    from llmcompressor.modifiers.quantization.quantization import base as quantization_base

    for module in (gptq_base, quantization_base):
        original = getattr(module, "broadcast_qparams_and_cleanup", None)
        if original is None or getattr(original, "_routealign_synchronized", False):
            continue

        @functools.wraps(original)
        def synchronized(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            if dist.is_initialized():
                dist.barrier()
            return result

        synchronized._routealign_synchronized = True
        module.broadcast_qparams_and_cleanup = synchronized


@contextlib.contextmanager
def fp4_unpacked_in(dtype: torch.dtype):
    """compressed-tensors 0.19 unpacks NVFP4 weights to bfloat16 whatever the model's dtype; a float32 model would
    then carry bf16-rounded dequantized weights. Unpack in the model's dtype instead (FP4 values are exact in any
    float dtype; the dequantization arithmetic then matches the in-memory fake-quant model's)."""
    from compressed_tensors.compressors.nvfp4 import base as nvfp4_base
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.utils import patch_attr

    with patch_attr(nvfp4_base, "unpack_fp4_from_uint8", functools.partial(unpack_fp4_from_uint8, dtype=dtype)):
        yield


def initialize_quantization(modifier, model: torch.nn.Module) -> None:
    """llm-compressor's ``QuantizationMixin.initialize_quantization``, its group-size divisibility error (0.14.0.1:
    a ``ValueError`` listing the layers) reported as an :class:`~routealign.errors.InputError` naming the modifier
    and its scheme."""
    from llmcompressor.modifiers.quantization.quantization import QuantizationMixin

    from .errors import InputError

    try:
        QuantizationMixin.initialize_quantization(modifier, model)
    except ValueError as exc:
        if "not divisible by group_size" not in str(exc):
            raise
        raise InputError(f"{type(modifier).__name__} (scheme {modifier.scheme}): {exc}") from None


def calibrate_all_experts(enabled: bool):
    """A context in which llm-compressor's linearized MoE blocks do (``True``) or do not route every calibration token
    through every expert (0.14.0.1: the module global ``moe.context._CALIBRATE_ALL_EXPERTS``), restored on exit."""
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modeling.moe import context as moe_context

    return patch_attr(moe_context, "_CALIBRATE_ALL_EXPERTS", enabled)


def linearize_without_offload(model: torch.nn.Module) -> None:
    """llm-compressor's ``linearize_moe`` on ``model`` without offloading the new expert modules (0.14.0.1 offloads
    each like the module it replaces: on the meta device, to "meta")."""
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modeling.moe import linear_experts
    from llmcompressor.modeling.moe.linearize import linearize_moe

    with patch_attr(linear_experts, "offload_module", lambda *args, **kwargs: None):
        linearize_moe(model)


def default_gating(expert: torch.nn.Module) -> bool:
    """Whether a linearized gated expert's gating is transformers' default ``act(gate) * up`` (5.17.0: its
    ``_apply_gate`` is the private ``transformers.integrations.moe._default_apply_gate``)."""
    from transformers.integrations.moe import _default_apply_gate

    return getattr(getattr(expert, "_apply_gate", None), "__func__", None) is _default_apply_gate
