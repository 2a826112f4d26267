"""llm-compressor modifiers of routealign: one folder per algorithm (``base.py`` the lifecycle, the math beside it),
``common.py`` what both share."""

from .rounding import RouterAlignedRoundingModifier
from .smoothing import ExpertAwareSmoothingModifier

__all__ = ["RouterAlignedRoundingModifier", "ExpertAwareSmoothingModifier", "MODIFIERS", "register_modifiers"]

MODIFIERS = (RouterAlignedRoundingModifier, ExpertAwareSmoothingModifier)


def register_modifiers() -> None:
    """Make the modifiers nameable in YAML recipes (llm-compressor resolves names only through its factory)."""
    from llmcompressor.modifiers.factory import ModifierFactory

    for cls in MODIFIERS:
        ModifierFactory.register(cls.__name__, cls)
