"""routealign: Mixture-of-Experts quantization that keeps the router's expert choices stable.

An extension of llm-compressor and compressed-tensors. This package provides:

- :mod:`routealign.routing`: every supported MoE router family, described once (selection, ordered top-k,
  combine weights), before and after llm-compressor's ``linearize_moe``;
- :mod:`routealign.metrics`: routing-consistency metrics (overlap@k, Jaccard, Match Score, ...);
- :mod:`routealign.checkpoint`: faithful loading of compressed-tensors MoE checkpoints;
- :mod:`routealign.evaluate` / :mod:`routealign.report`: ``routealign eval`` as a Python API;
- :class:`RouterAlignedRoundingModifier` (:mod:`routealign.modifiers.rounding`, :mod:`routealign.losses`,
  :mod:`routealign.schemes`): router-aligned learned rounding as an llm-compressor modifier;
- :class:`ExpertAwareSmoothingModifier` (:mod:`routealign.modifiers.smoothing`: lifecycle, sites, fold algebra):
  per-expert SmoothQuant scales folded exactly into the weights;
- :mod:`routealign.modifiers.common`: what both modifiers share (layer order, the calibration draw, first inputs);
- :mod:`routealign.streams` / :mod:`routealign.runner`: the causal calibration streams and the one block-forward
  engine both modifiers use; :mod:`routealign.distributed`: what ranks reduce under torchrun.

Importing the package registers its modifiers with llm-compressor's ``ModifierFactory`` so YAML recipes can name
them.
"""

from .calibration import oneshot_windows
from .checkpoint import load_model, save_compressed
from .errors import (CheckpointError, InputError, NonFiniteError, NotMoEError, OutputExistsError, RouteAlignError,
                     UnsupportedRouterError)
from .evaluate import EvalResult, evaluate
from .modifiers import ExpertAwareSmoothingModifier, RouterAlignedRoundingModifier, register_modifiers
from .preflight import check_checkpoint
from .routing import FAMILIES, MoELayer, RouterFamily, Routing, find_moe_layers

register_modifiers()

__all__ = [
    "RouterAlignedRoundingModifier",
    "ExpertAwareSmoothingModifier",
    "FAMILIES",
    "MoELayer",
    "RouterFamily",
    "Routing",
    "find_moe_layers",
    "load_model",
    "save_compressed",
    "oneshot_windows",
    "check_checkpoint",
    "evaluate",
    "EvalResult",
    "RouteAlignError",
    "UnsupportedRouterError",
    "NotMoEError",
    "CheckpointError",
    "InputError",
    "NonFiniteError",
    "OutputExistsError",
]

__version__ = "0.1.0"
