"""torch.distributed for the modifiers (llm-compressor's data-parallel ``oneshot`` under torchrun: calibration
samples split across ranks): one flat all-reduce, the reductions every rank must agree on (gradients, losses,
counts), writes into storage the ranks share, and taking compressed-tensors' offloading off a module while it is
tuned. With one process every function is the identity (no collective is called)."""

from __future__ import annotations

import contextlib

import torch

from .errors import InputError

__all__ = ["Ranks", "init_distributed", "world_size", "rank", "shard_bounds",
           "all_reduce", "all_sum", "gather_slices", "all_reduce_grads", "all_reduce_counts", "write_parameters",
           "suspended_offloading", "refuse_disk_offload"]


def init_distributed() -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... in the environment);
    False when not started by torchrun. With an accelerator this is compressed-tensors' ``init_dist()`` (NCCL on
    CUDA); without one gloo on the CPU (``init_dist`` in compressed-tensors 0.19.0 needs an accelerator)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if torch.accelerator.is_available():
        from compressed_tensors.distributed import init_dist

        init_dist()
    else:
        dist.init_process_group("gloo", init_method="env://", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
        dist.barrier()
        from .compat import synchronize_cpu_qparam_broadcasts

        synchronize_cpu_qparam_broadcasts()
    return True


def world_size() -> int:
    """Ranks of the torch.distributed group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard_bounds(n: int) -> tuple[int, int]:
    """``[start, end)`` of this rank's part of ``n`` items in a global order: llm-compressor's partition
    (``floor(n * r / world)``), so every item belongs to exactly one rank and ranks differ by at most one item."""
    world, r = world_size(), rank()
    return (n * r) // world, (n * (r + 1)) // world


def all_sum(values: list[float]) -> list[float]:
    """Python floats summed over ranks in float64 (the values themselves with one process)."""
    if world_size() == 1:
        return list(values)
    (total,) = all_reduce([torch.tensor(values, dtype=torch.float64)])
    return total.tolist()


def gather_slices(local: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """Every rank's ``local`` values put at ``[start, start + len)`` of one ``[total]`` vector, the same on every
    rank and exact (each position is one rank's value plus zeros): per-sequence results in the global order."""
    if world_size() == 1:
        return local
    full = torch.zeros(total, dtype=local.dtype)
    full[start : start + local.numel()] = local.cpu()
    (full,) = all_reduce([full])
    return full


def all_reduce(tensors: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """``tensors`` reduced over ranks (``sum`` or ``max``) in one flat all-reduce; returned in their shapes."""
    import torch.distributed as dist

    device = tensors[0].device
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    comm = _comm_device(device)
    reduced = flat.to(comm)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    flat = reduced.to(device)
    return [part.view_as(t).clone() for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def _comm_device(device: torch.device) -> torch.device:
    """Where the process group reduces: NCCL/XCCL only on the accelerator, gloo anywhere."""
    import torch.distributed as dist

    if dist.get_backend() in ("nccl", "xccl") and device.type == "cpu":
        return torch.accelerator.current_accelerator()
    return device


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Scale-out (llm-compressor's distributed mode, calibration samples split across ranks): sum every rounding
    parameter's gradient over ranks, so that every rank takes the same signed step and ends with identical
    parameters. Parameters without a gradient on this rank (no routed token in its minibatch) contribute zeros."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, all_reduce(grads)):
        p.grad = g


def _shared_across_ranks(module: torch.nn.Module) -> bool:
    """Whether ``module``'s tensors live in storage every rank shares (compressed-tensors' distributed CPU and disk
    offload caches)."""
    from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    return isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))


def _update_onloaded_copy(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Refresh this rank's onloaded copy of an offloaded tensor (kept while offloading is disabled) without writing
    the offloaded tensor another rank writes."""
    cache = module._parameters if name in module._parameters.offloaded_values else module._buffers
    offloaded = cache.offloaded_values.get(name)
    onloaded = cache.keep_onloaded_values.get(offloaded) if offloaded is not None else None
    if onloaded is not None and onloaded is not offloaded:
        onloaded.copy_(value.to(onloaded.dtype).reshape(onloaded.shape))


@torch.no_grad()
def write_parameters(writes: list[tuple[torch.nn.Module, str, torch.Tensor]]) -> None:
    """Write ``(module, name, value)`` with compressed-tensors' ``update_offload_parameter``.

    Under torch.distributed every rank holds the same values (gradients, losses, counts and maxima are all-reduced),
    but compressed-tensors' distributed CPU/disk offload keeps one copy that all ranks share, and
    ``update_offload_parameter`` must not be called by two ranks for the same tensor. There each tensor is written
    by one rank (round robin), the others refresh only their own onloaded copy, and barriers before and after make
    every rank finish reading before anyone writes and see every write afterwards.
    """
    from compressed_tensors.utils import update_offload_parameter

    world = world_size()
    if world == 1:
        for module, name, value in writes:
            update_offload_parameter(module, name, value)
        return
    import torch.distributed as dist

    rank = dist.get_rank()
    dist.barrier()
    for i, (module, name, value) in enumerate(writes):
        if not _shared_across_ranks(module) or i % world == rank:
            update_offload_parameter(module, name, value)
        else:
            _update_onloaded_copy(module, name, value)
    dist.barrier()


class Ranks:
    """The data-parallel reductions of a tuning (llm-compressor's distributed mode splits the calibration set over
    ranks), in one place: each sum a step or a decision needs over every rank's share. With one process
    (:attr:`alone`) every one is the value itself and reads nothing from the device."""

    @property
    def alone(self) -> bool:
        return world_size() == 1

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank then takes the same branch)."""
        if self.alone:
            return flag
        (value,) = all_reduce([torch.tensor([float(flag)])], op="max")
        return bool(value)

    def sum(self, values: list) -> list:
        """Scalars (floats or 0-d tensors) summed over ranks in float64, as Python floats; alone, ``values``
        unchanged (tensors stay on their device, unread)."""
        if self.alone:
            return list(values)
        return all_sum([float(v) for v in values])

    def tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` summed over ranks (one flat all-reduce); alone, unchanged."""
        return list(tensors) if self.alone else all_reduce(list(tensors))

    def grads(self, params: list[torch.Tensor]) -> None:
        """Every parameter's gradient summed over ranks (:func:`all_reduce_grads`)."""
        all_reduce_grads(params)

    def counts(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-name integer counts summed over ranks (:func:`all_reduce_counts`)."""
        return all_reduce_counts(counts)


def all_reduce_counts(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Routed-token counts summed over ranks: every rank makes the same RTN-fallback decision."""
    if world_size() == 1 or not counts:
        return counts
    names = sorted(counts)
    return dict(zip(names, all_reduce([counts[n] for n in names])))


@contextlib.contextmanager
def suspended_offloading(*modules: torch.nn.Module | None):
    """Take compressed-tensors' offloading off ``modules`` (their tensors stay on the execution device) and put it
    back afterwards. functional_call swaps parameters in ``_parameters``; an offload cache would copy them and cut
    the gradient."""
    from compressed_tensors.offload import get_cache_init_kwargs
    from compressed_tensors.offload.cache.base import OffloadCache
    from compressed_tensors.offload.module import offload_module, remove_module_offload

    suspended = []
    for root in modules:
        if root is None:
            continue
        for sub in root.modules():
            if isinstance(sub._parameters, OffloadCache):
                # devices and cache settings (disk offload: its folder), to put the same offloading back
                suspended.append((sub, get_cache_init_kwargs(sub)))
                remove_module_offload(sub, onload_tensors=True)
    try:
        yield
    finally:
        for sub, kwargs in suspended:
            offload_module(sub, **kwargs)


def refuse_disk_offload(model: torch.nn.Module, where: str) -> None:
    """Under torch.distributed, refuse a model with any module offloaded to disk (compressed-tensors'
    ``DistributedDiskCache``): taking a disk offload off a module and putting it back while ranks share it is
    untested, and a wrong write there would be silent."""
    if world_size() == 1:
        return
    from compressed_tensors.offload.cache.disk import DiskCache

    on_disk = [n for n, m in model.named_modules() if isinstance(m._parameters, DiskCache)]
    if on_disk:
        raise InputError(
            f"{where}: {len(on_disk)} modules (e.g. {on_disk[0]}) are offloaded to disk under llm-compressor's "
            f"distributed mode ({world_size()} ranks); routealign supports CPU offloading there, not disk: give the "
            "ranks enough CPU memory for the model (load_offloaded_model with device_map='auto_offload' puts on disk "
            "only what the CPU memory cannot hold), or run in one process"
        )
