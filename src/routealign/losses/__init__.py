"""Router objectives for learned rounding.

Every objective compares the quantized router's logits ``z_q`` (``[T, E]``, with gradient) with the full-precision
router's logits ``z_fp`` on the same tokens, in float32, in the router family's own spaces (see
:mod:`routealign.routing`):

- *value space* is the raw logits ``z``;
- *selection space* ``s(z)`` is what the model ranks by: logits for softmax and GPT-OSS routers,
  ``sigmoid(z) + e_score_correction_bias`` for sigmoid routers. The full-precision order ``π`` is taken with the
  model's own group-limited masking; the quantized side is read at ``π``'s experts without masking (masking is
  discrete and carries no gradient).
- *structure space* (``structure_space``) is where the structure terms (VSRAQ's rank and margin, ExpertQuant's
  gap hinge) measure gaps between experts taken in the full-precision order: ``logits`` (default; both papers write
  these terms on logits, VSRAQ eqs. 13-15 and ExpertQuant eqs. 6-8) or ``scores`` (selection space). The two are
  the same for softmax and GPT-OSS routers; for sigmoid routers score gaps scale the gradient by
  ``sigmoid'(z) <= 0.25``, so the structure terms act about four times more weakly there.

Objectives (the ``objective`` field), one module each, found by name (:func:`names`, :func:`objective`):
``none`` (plain learned rounding), ``topk_mse`` (EAC-MoE), ``kl`` (EAQuant), ``vsraq`` (VSRAQ eqs. 7-17),
``expertquant`` (ExpertQuant eqs. 5-9); each module's docstring gives its formula. A new objective is one module
here with an :class:`Objective` subclass decorated with :func:`register` (and its own ``Settings``, the recipe's
``loss: {<name>: ...}`` section): nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Objective, RouterLoss, RouterTarget, register
from .config import LossSettings, RouterBalance, StructureSpace

__all__ = ["Objective", "StructureSpace", "RouterBalance", "LossSettings", "RouterTarget", "RouterLoss", "OBJECTIVES",
           "names",
           "objective", "register"]

_SHARED = {"base", "config"}  # the modules that are not objectives


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> tuple[str, ...]:
    """Every registered objective's name, ``none`` first."""
    _discover()
    return tuple(sorted(REGISTRY, key=lambda n: (n != "none", n)))


def objective(name: str) -> Objective:
    """The objective named ``name``; a ValueError listing the known ones otherwise."""
    _discover()
    if name not in REGISTRY:
        raise ValueError(f"unknown router objective '{name}'; known: {', '.join(names())}")
    return REGISTRY[name]


_discover()
OBJECTIVES: tuple[str, ...] = names()
