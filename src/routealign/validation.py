"""Checks that run before calibration, so that a bad setting fails in seconds instead of at layer 40.

- :func:`check_group_sizes`: every quantized module's input dimension is a multiple of its scheme's group size
  (llm-compressor only warns, then fails in the middle of the run); names every offending module.
- :func:`check_group_divisibility`: before a model loads, its ``hidden_size`` (the input of every attention and
  expert projection) against the group sizes of a recipe's schemes.
- :func:`check_calibration`: the calibration set is non-empty, its token ids lie inside the vocabulary, its
  sequences are long enough, padded only before or after their real tokens (lengths may differ).
- :func:`check_router_settings`: options that depend on the model's routers (e.g. VSRAQ's boundary width must
  leave enough experts outside the top-k).
- :func:`check_finite`: NaN/Inf guard used during calibration.

Every failure raises :class:`~routealign.errors.InputError` (or :class:`~routealign.errors.NonFiniteError`) with a
message naming the module, field or sample at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from compressed_tensors.quantization import QuantizationStrategy

from .errors import InputError, NonFiniteError
from .routing import MoELayer

__all__ = [
    "CalibrationSummary",
    "check_group_sizes",
    "check_group_divisibility",
    "check_calibration",
    "check_router_settings",
    "check_finite",
    "batch_input_ids",
    "real_span",
    "ROW_KEY",
]

ROW_KEY = "dataset_row"  # key of a drawn calibration batch naming the dataset row it holds

_GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
_SHOWN = 8  # offending names listed in one message


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def check_group_sizes(model: torch.nn.Module, where: str) -> None:
    """Every module carrying a compressed-tensors ``quantization_scheme`` with a grouped weight or input-activation
    strategy must have an input dimension divisible by the group size."""
    bad: list[str] = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        weight = getattr(module, "weight", None)
        if scheme is None or weight is None or weight.ndim != 2:
            continue
        in_features = int(weight.shape[-1])
        for kind, args in (("weights", scheme.weights), ("input_activations", scheme.input_activations)):
            if args is None or args.strategy not in _GROUPED or not args.group_size:
                continue
            if in_features % int(args.group_size):
                bad.append(f"{name} ({kind}: in_features {in_features}, group_size {args.group_size})")
                break
    if bad:
        raise InputError(
            f"{where}: the scheme's group size does not divide the input dimension of {len(bad)} targeted "
            f"module(s): {_listing(bad)}. Add them to `ignore` or choose a group size that divides them"
        )


def _recipe_group_sizes(recipe_text: str) -> list[tuple[str, str, int]]:
    """``(modifier, scheme, group size)`` of every grouped weight or input-activation scheme of the recipe's
    modifiers that target every ``Linear`` (their ``scheme`` preset, or ``config_groups``)."""
    import yaml
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    found = []

    def visit(node):
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if not isinstance(value, dict):
                continue
            targets = value.get("targets", ["Linear"])
            targets = [targets] if isinstance(targets, str) else list(targets or [])
            schemes = []
            scheme = value.get("scheme")
            if isinstance(scheme, str):
                schemes.append((scheme, preset_name_to_scheme(scheme, ["Linear"])))
            elif isinstance(scheme, dict):
                schemes += [(name, preset_name_to_scheme(name, ["Linear"])) for name in scheme]
                targets = [t for ts in scheme.values() for t in ([ts] if isinstance(ts, str) else ts)]
            for group, spec in (value.get("config_groups") or {}).items():
                if isinstance(spec, dict):
                    schemes.append((str(group), QuantizationScheme(**spec)))
                    targets = spec.get("targets", targets)
            if schemes and "Linear" in targets:
                for name, qs in schemes:
                    for args in (qs.weights, qs.input_activations):
                        if args is not None and args.strategy in _GROUPED and args.group_size:
                            found.append((str(key), name, int(args.group_size)))
            visit(value)

    try:
        visit(yaml.safe_load(recipe_text))
    except Exception:  # an unusual recipe: llm-compressor's own check at initialize still applies
        return []
    return found


def check_group_divisibility(config: dict, recipe_text: str, config_where: str, recipe_where: str) -> None:
    """Before the model loads: the model's ``hidden_size`` (every attention and expert projection's input) must be a
    multiple of the group size of each scheme the recipe applies to every ``Linear``; an :class:`InputError` naming
    the config, the recipe, the modifier and the scheme otherwise (llm-compressor would stop after loading, with a
    traceback). Other dimensions are checked when the modifier initializes."""
    hidden = config.get("hidden_size", (config.get("text_config") or {}).get("hidden_size"))
    if not isinstance(hidden, int):
        return
    for modifier, scheme, size in _recipe_group_sizes(recipe_text):
        if hidden % size:
            raise InputError(
                f"{config_where}: hidden_size {hidden} is not a multiple of the group size {size} of {recipe_where}'s "
                f"{modifier} scheme {scheme}; every attention and expert projection takes hidden_size inputs. "
                f"Choose a scheme whose group size divides {hidden}"
            )


@dataclass
class CalibrationSummary:
    samples: int
    seq_len: int  # the longest sequence (real tokens)
    batches: int
    padded: bool = False  # some batch has attention-mask zeros
    variable: bool = False  # sequences of more than one real length


def batch_input_ids(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` and ``attention_mask`` (or ``None``) of calibration batch ``index`` (a mapping or a tensor)."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        if "input_ids" not in batch:
            raise InputError(f"calibration batch {index} has no 'input_ids' (keys: {sorted(batch.keys())})")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        raise InputError(f"calibration batch {index} is a {type(batch).__name__}; expected a dict with 'input_ids'")
    ids = torch.as_tensor(ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(ids.shape)
    return ids, mask


def real_span(row_mask: torch.Tensor) -> tuple[int, int] | None:
    """``(first, stop)`` of a row's real tokens (attention-mask ones; ``(0, 0)`` when there is none), or ``None``
    when padding lies between real tokens."""
    positions = torch.nonzero(row_mask).flatten()
    if positions.numel() == 0:
        return 0, 0
    first, stop = int(positions[0]), int(positions[-1]) + 1
    return (first, stop) if positions.numel() == stop - first else None


def check_calibration(batches: Iterable, vocab_size: int, min_seq_len: int = 2,
                      where: str = "calibration dataset") -> CalibrationSummary:
    """Read the calibration batches once (token ids only, no forward pass) and check them.

    Requirements: at least one sequence; every real token id in ``[0, vocab_size)``; every sequence at least
    ``min_seq_len`` real tokens; padding (attention-mask zeros) only before or after a sequence's real tokens, not
    between them. Sequences may differ in length and batches may be padded (the modifiers keep each sequence's real
    tokens). The first offending batch is named, in calibration order.
    """
    if batches is None:
        raise InputError(f"{where}: no calibration data was given (pass dataset= to oneshot)")
    samples, longest, count, padded, lengths = 0, 0, 0, False, set()
    for index, batch in enumerate(batches):
        count += 1
        ids, mask = batch_input_ids(batch, index)
        # routealign.calibration draws one dataset row per batch and says which: name the row
        row_of = batch.get(ROW_KEY) if hasattr(batch, "get") else None
        name = f"dataset row {row_of}" if row_of is not None else f"batch {index} (in calibration order)"
        if ids.numel() == 0 or ids.shape[-1] == 0:
            raise InputError(f"{where}: {name} holds an empty sequence")
        if ids.is_floating_point():
            raise InputError(f"{where}: {name} input_ids are {ids.dtype}, expected integer token ids")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if not bool(real.all()):
            padded = True
        for row in range(ids.shape[0]):
            span = real_span(real[row])
            if span is None:
                inner = f" row {row}" if row_of is None else ""
                raise InputError(f"{where}: {name}{inner} has padding between real tokens (attention_mask with a "
                                 "hole); only left or right padding is supported: split such a row into one row per "
                                 "run of real tokens")
            length = span[1] - span[0]
            if length < min_seq_len:
                raise InputError(f"{where}: {name} has a sequence of {length} real token(s); at least {min_seq_len} "
                                 "are needed")
            lengths.add(length)
            longest = max(longest, length)
        kept = ids[real]
        low, high = int(kept.min()), int(kept.max())
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise InputError(f"{where}: {name} has token id {bad} outside the model's vocabulary "
                             f"[0, {vocab_size}); wrong tokenizer for this model?")
        samples += int(ids.shape[0])
    if samples == 0:
        raise InputError(f"{where}: the calibration set is empty")
    return CalibrationSummary(samples=samples, seq_len=longest, batches=count, padded=padded,
                              variable=len(lengths) > 1)


def check_router_settings(layers: list[MoELayer], boundary: int, where: str) -> None:
    """VSRAQ's boundary margins ``z_k - z_{k+j}, j=1..boundary`` need ``boundary`` experts outside the top-k."""
    for layer in layers:
        room = layer.num_experts - layer.top_k
        if boundary > room:
            raise InputError(f"{where}.boundary={boundary}: {layer.router_name} has {layer.num_experts} experts and "
                             f"top_k {layer.top_k}, so at most {room} margins exist beyond the top-k")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` when ``tensor`` has a NaN or Inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise NonFiniteError(f"{what} contains {nan} NaN and {inf} Inf values")
