"""ExpertQuant's Expert-Aware Scale as an llm-compressor modifier: the lifecycle (:mod:`.base`), per-site statistics
and fold sites (:mod:`.sites`), and the exact fold algebra (:mod:`.folds`)."""

from .base import ExpertAwareSmoothingModifier

__all__ = ["ExpertAwareSmoothingModifier"]
