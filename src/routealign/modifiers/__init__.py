"""llm-compressor modifiers of routealign (thin lifecycle glue; the math lives in tuning, losses, schemes, smoothing)."""

from .rounding import RouterAlignedRoundingModifier
from .smoothing import ExpertAwareSmoothingModifier

__all__ = ["RouterAlignedRoundingModifier", "ExpertAwareSmoothingModifier", "MODIFIERS", "register_modifiers"]

MODIFIERS = (RouterAlignedRoundingModifier, ExpertAwareSmoothingModifier)


def register_modifiers() -> None:
    """Make the modifiers nameable in YAML recipes (llm-compressor resolves names only through its factory)."""
    from llmcompressor.modifiers.factory import ModifierFactory

    for cls in MODIFIERS:
        ModifierFactory.register(cls.__name__, cls)
