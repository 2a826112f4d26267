"""Every choice routealign makes by the kind of device it runs on, in one place.

- :func:`expert_layout`: how the batched experts multiply (``grouped``: one grouped GEMM over expert-sorted tokens,
  no host read; ``padded``: tokens padded per expert, one batched matmul, the capacity read once per forward);
- :func:`piece_elements`: the size of the pieces the elementwise passes over tuned weights run in;
- :func:`to_host` / :func:`rows`: where offloaded tensors live (host memory, pinned for an accelerator) and how a
  minibatch of their rows reaches the device (gathered into a pinned staging buffer, then an asynchronous copy:
  indexing a pinned tensor gives pageable memory, whose copies are synchronous).

Tests run every branch an accelerator takes on the CPU inside :func:`simulated` (a CUDA device of a given compute
capability: pinning recorded instead of done, since a CPU build of torch cannot pin) or with :data:`LAYOUT` forced;
the kernels themselves are the CPU's. Placement is then asserted by what the code chose (:func:`is_pinned`,
:data:`STAGED`), not by where a CPU tensor happens to be.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

__all__ = ["Profile", "profile_of", "is_accelerator", "expert_layout", "piece_elements", "to_host", "rows",
           "is_pinned", "simulated", "LAYOUT", "PIECE_ELEMENTS", "STAGED"]


@dataclass(frozen=True)
class Profile:
    """What the choices depend on: the device kind (``cpu``, ``cuda``, ...) and a CUDA device's compute
    capability."""

    kind: str
    capability: tuple[int, int] | None = None


_SIMULATED: Profile | None = None  # simulated(): every device is this one
_PINNED: set[int] = set()  # simulated(): storages "pinned" (a CPU build of torch cannot pin)

# None: expert_layout decides; "grouped" or "padded": forced (tests)
LAYOUT: str | None = None

# elements of a weight processed at once by the elementwise passes over tuned weights (the learned-rounding fake
# quantization, the clip search): on an accelerator large (few kernels; temporaries bounded to a few bytes per element
# of a piece), on the CPU the size of a core's cache, where chains of elementwise operations are memory-bound (a
# stacked tensor of all experts streamed through memory once per operation ran 2-3x slower than cache-sized pieces).
# ``ROUTEALIGN_PIECE_ELEMENTS`` overrides both (the scale benchmark counts a GPU run's operations on the CPU with it)
PIECE_ELEMENTS = {"cpu": 1 << 18, "accelerator": 1 << 26}


@dataclass
class _Staged:
    """Copies of host rows to an accelerator (:func:`rows`): how many, and how many came from pinned memory."""

    copies: int = 0
    pinned: int = 0


STAGED = _Staged()


def profile_of(device: torch.device | str) -> Profile:
    """The device's :class:`Profile` (inside :func:`simulated`: the simulated one)."""
    if _SIMULATED is not None:
        return _SIMULATED
    device = torch.device(device)
    if device.type == "cuda":
        return Profile("cuda", tuple(torch.cuda.get_device_capability(device)))
    return Profile(device.type)


def is_accelerator(device: torch.device | str) -> bool:
    return profile_of(device).kind != "cpu"


def expert_layout(device: torch.device | str, dtype: torch.dtype) -> str:
    """``grouped`` or ``padded`` (:mod:`routealign.experts`) for tokens computed in ``dtype`` on ``device``: grouped
    on the CPU (torch's kernel) and for bfloat16 on compute capability 9 (Hopper); padded elsewhere: in float32 on
    CUDA torch's grouped GEMM loops over the experts, and on compute capability 10 (B200) PyTorch's issue 172439
    reports non-zero weight gradients for zero-size groups (an expert with no token in a minibatch would take random
    signed steps). :data:`LAYOUT` forces either."""
    if LAYOUT is not None:
        return LAYOUT
    if not hasattr(torch, "_grouped_mm"):
        return "padded"
    profile = profile_of(device)
    if profile.kind == "cpu":
        return "grouped"
    if profile.kind == "cuda" and dtype == torch.bfloat16 and profile.capability is not None \
            and profile.capability[0] == 9:
        return "grouped"
    return "padded"


def piece_elements(device: torch.device | str) -> int:
    """Elements per piece of the elementwise passes over tuned weights on ``device`` (:data:`PIECE_ELEMENTS`)."""
    forced = os.environ.get("ROUTEALIGN_PIECE_ELEMENTS")
    if forced:
        return int(forced)
    return PIECE_ELEMENTS["accelerator" if is_accelerator(device) else "cpu"]


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    if _SIMULATED is not None:
        _PINNED.add(tensor.untyped_storage().data_ptr())
        return tensor
    return tensor.pin_memory()


def is_pinned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in pinned host memory (inside :func:`simulated`: was pinned by this module)."""
    if _SIMULATED is not None:
        return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in _PINNED
    return tensor.device.type == "cpu" and tensor.is_pinned()


def _on_host(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in host memory (inside :func:`simulated`, where every tensor is on the CPU: what
    :func:`to_host` placed there)."""
    if _SIMULATED is not None:
        return is_pinned(tensor)
    return tensor.device.type == "cpu"


def to_host(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` in host memory, pinned when ``device`` (where its rows will be used) is an accelerator."""
    host = tensor.cpu()
    if not is_accelerator(device) or is_pinned(host):
        return host
    return _pin(host)


def rows(tensor: torch.Tensor, index: torch.Tensor, device: torch.device | str,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``index`` of ``tensor`` on ``device`` (in ``dtype``). From host memory to an accelerator they are gathered
    into a pinned staging buffer and copied asynchronously (the caching host allocator keeps the buffer until the
    copy is done); otherwise indexed where they are."""
    if not _on_host(tensor) or not is_accelerator(device):
        picked = tensor[index.to(tensor.device)]
        return picked.to(device, dtype) if dtype is not None else picked.to(device)
    index = index.cpu()
    pinned = _SIMULATED is None
    staged = torch.empty((index.numel(), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=pinned)
    if not pinned:
        _pin(staged)
    torch.index_select(tensor, 0, index, out=staged)
    STAGED.copies += 1
    STAGED.pinned += int(is_pinned(staged))
    moved = staged.to(device, non_blocking=True)
    return moved if dtype is None else moved.to(dtype)


@contextlib.contextmanager
def simulated(capability: tuple[int, int] = (9, 0), kind: str = "cuda"):
    """Inside, every device is an accelerator of ``kind`` and compute ``capability``: the layouts, chunk sizes,
    host placement and staging a GPU run takes, run on the CPU's kernels (pinning recorded, not done)."""
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, Profile(kind, capability)
    STAGED.copies = STAGED.pinned = 0
    try:
        yield
    finally:
        _SIMULATED = previous
        _PINNED.clear()
