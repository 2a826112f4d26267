"""torch.distributed for the modifiers (llm-compressor's data-parallel ``oneshot`` under torchrun: calibration
samples split across ranks): one flat all-reduce, the reductions every rank must agree on (gradients, losses,
counts), writes into storage the ranks share, and taking compressed-tensors' offloading off a module while it is
tuned. With one process every function is the identity (no collective is called)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["world_size", "all_reduce", "all_reduce_grads", "global_mean", "global_mean_of", "all_reduce_counts",
           "write_parameters", "suspended_offloading"]


def world_size() -> int:
    """Ranks of the torch.distributed group (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(tensors: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """``tensors`` reduced over ranks (``sum`` or ``max``) in one flat all-reduce; returned in their shapes."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [part.view_as(t).clone() for part, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors)]


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Scale-out (llm-compressor's distributed mode, calibration samples split across ranks): sum every rounding
    parameter's gradient over ranks, so that every rank takes the same signed step and ends with identical
    parameters. Parameters without a gradient on this rank (no routed token in its minibatch) contribute zeros."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, all_reduce(grads)):
        p.grad = g


def global_mean(value: torch.Tensor) -> float:
    """The loss averaged over ranks: every rank keeps the same best iteration."""
    if world_size() == 1:
        return float(value)
    (total,) = all_reduce([value.reshape(1).float()])
    return float(total) / world_size()


def global_mean_of(values: torch.Tensor) -> float:
    """Mean of per-sequence ``values`` over every rank's sequences."""
    total, count = values.double().sum().reshape(1), torch.tensor([float(values.numel())], dtype=torch.float64)
    if world_size() > 1:
        total, count = all_reduce([total, count])
    return float(total) / max(float(count), 1.0)


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
