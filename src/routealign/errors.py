"""Errors routealign raises for bad input.

Every error is a :class:`RouteAlignError`; the command line prints its message on one line and exits with
status 2. Messages name the module, field or file at fault.
"""

__all__ = [
    "RouteAlignError",
    "UnsupportedRouterError",
    "NotMoEError",
    "CheckpointError",
    "InputError",
    "NonFiniteError",
    "OutputExistsError",
]


class RouteAlignError(Exception):
    """Base class of every error routealign raises on bad input."""


class UnsupportedRouterError(RouteAlignError):
    """A module looks like an MoE router, but no router family describes its class."""


class NotMoEError(RouteAlignError):
    """The model has no Mixture-of-Experts layer."""


class CheckpointError(RouteAlignError):
    """A model folder is missing, incomplete or inconsistent."""


class InputError(RouteAlignError):
    """Evaluation or calibration input (text, token ids, options) is unusable."""


class NonFiniteError(RouteAlignError, FloatingPointError):
    """NaN or Inf in calibration activations, a tuning loss or quantization scales; names the layer."""


class OutputExistsError(RouteAlignError):
    """The output folder exists and overwriting was not asked for, or it would overwrite the input model."""
