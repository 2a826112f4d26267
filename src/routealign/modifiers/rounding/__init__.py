"""Router-aligned learned rounding: the modifier (``base``), the algorithm for one block (``tune``: the loop, the
arms and the decision; ``heldout``: what the held-out sequences measure; ``weights``: the tuned weights and their
writes) and its settings (``config``)."""

from .base import RouterAlignedRoundingModifier
from .config import RouterScope, TuningConfig
from .tune import BlockTuner, RouterDecision, TuneResult

__all__ = ["RouterAlignedRoundingModifier", "TuningConfig", "RouterScope", "BlockTuner", "TuneResult",
           "RouterDecision"]
