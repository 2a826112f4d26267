"""Live tensor bytes on the CPU, measured: the allocator's allocation and free events that ``torch.profiler``
records (``profile_memory``), summed in order. Deterministic (no sampling, no resident-set noise)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn, *args, **kwargs):
    """``(result of fn, peak live bytes above the start, bytes still live at the end)`` of tensors allocated inside."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak, live


class SavedForBackward:
    """Bytes of the distinct storages autograd saves for the backward inside (``saved_tensors_hooks``), by dtype."""

    def __init__(self):
        self.storages: dict[int, tuple[int, torch.dtype]] = {}

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        self.storages.setdefault(storage.data_ptr(), (storage.nbytes(), t.dtype))
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, dtype in self.storages.values():
            out[str(dtype)] = out.get(str(dtype), 0) + n
        return out
