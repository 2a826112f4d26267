"""A block's tuned weights as the chunks of experts they are tuned in (``memory.expert_chunk``,
``memory.max_tuning_gib``).

Stacks of expert weights (one per projection of an experts container) carry no tuning state themselves; each chunk
is a part of every stack (:meth:`~.weights.TunedWeight.part`), tuned against the experts before it quantized (their
writes stored into the stack) and those after it unquantized. The other targets (attention, shared experts) are
tuned with the first chunk. One chunk (all experts at once) unless the settings split them. Every path of the
tuner, ``iters: 0`` included, goes over every chunk (:meth:`ExpertChunks.select`).
"""

from __future__ import annotations

import torch

from ...experts import Parts, Stacked
from .memory import expert_chunk
from .weights import TunedWeight

__all__ = ["ExpertChunks"]


class ExpertChunks:
    """The tuned weights of a block split into chunks of ``size`` experts per stack (0: all at once)."""

    def __init__(self, every: list[TunedWeight], config, objective: str):
        self.stacks = [w for w in every if w.stacked]
        self.singles = [w for w in every if not w.stacked]
        self.size = expert_chunk(self.stacks, self.singles, config, objective)
        self._parts: dict[int, TunedWeight] = {}  # id(stack) -> its part being tuned
        self._span: dict[int, tuple[int, int]] = {}  # id(stack) -> [start, end) of the experts being tuned

    @property
    def count(self) -> int:
        """How many chunks a layer is tuned in (1: all experts at once)."""
        if not self.size or not self.stacks:
            return 1
        return max(-(-len(b.modules) // self.size) for b in self.stacks)

    @property
    def modules(self) -> int:
        """How many Linear modules are tuned (each expert's projection counted)."""
        return len(self.singles) + sum(len(b.modules) for b in self.stacks)

    def select(self, index: int) -> list[TunedWeight]:
        """The weights tuned in chunk ``index``: the other targets with the first chunk only (afterwards they keep
        the decision it made), and per stack the part of its experts in the chunk."""
        for stack in self.stacks:
            n = len(stack.modules)
            start, end = (0, n) if self.count == 1 else (min(index * self.size, n), min((index + 1) * self.size, n))
            self._span[id(stack)] = (start, end)
            if end > start:
                self._parts[id(stack)] = stack.part(start, end)
            else:
                self._parts.pop(id(stack), None)
        singles = self.singles if index == 0 else []
        return singles + [self._parts[id(b)] for b in self.stacks if id(b) in self._parts]

    def span(self) -> list[int]:
        """``[start, end)`` of the experts of the chunk selected (of the first stack)."""
        return list(self._span[id(self.stacks[0])])

    @staticmethod
    def release(weights: list[TunedWeight]) -> None:
        """Drop the tuning state of the parts in ``weights``, before the next chunk's is made."""
        for w in weights:
            if w.stacked:
                w.release()

    def stack(self, base: TunedWeight, quantized: bool, dtype: torch.dtype | None) -> Stacked:
        """A stack of expert weights as the batched experts multiply it: unquantized, or the part being tuned
        fake-quantized between the experts tuned before (quantized, written into the stack) and after it."""
        if not quantized:
            return Stacked(base.weight, base.bias)
        start, end = self._span[id(base)]
        count = len(base.modules)
        part = self._parts.get(id(base))
        if (start, end) == (0, count):
            return part.as_stacked(True, dtype)
        # the experts before and after the chunk in pieces of at most a chunk (a bf16 model's piece is converted
        # to float32 for its backward, one piece at a time: a chunk's worth, not every untuned expert's)
        step = max(self.size, 1)
        pieces = [(a, min(a + step, b), Stacked(base.weight[a:min(a + step, b)]))
                  for lo, hi in ((0, start), (end, count)) for a in range(lo, hi, step) for b in [hi]]
        if part is not None:
            pieces.append((start, end, part.as_stacked(True, dtype)))
        return Parts(None, base.bias, parts=tuple(sorted(pieces, key=lambda piece: piece[0])))
