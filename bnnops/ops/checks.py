"""Argument checks shared by the op families and the layers: the exception types of bad input, what
an argument is, and per-output-channel vectors.

Bad input to an op, a functional layer or a module raises one of three types, each deriving from
the Python type that names the mistake and from ``RuntimeError``, which ``nn.Linear`` and
``nn.Conv2d`` raise for the same mistakes: code written for either convention catches them.

- :class:`ShapeError` (``ValueError``, ``RuntimeError``): a shape or a convolution geometry that
  does not fit.
- :class:`DtypeError` (``TypeError``, ``RuntimeError``): a dtype bnnops does not take, dtypes that
  do not match, or an argument that is not a tensor.
- :class:`DeviceError` (``ValueError``, ``RuntimeError``): tensors on different devices.
"""

import torch

from bnnops.ops.library import FLOAT_DTYPES

__all__ = ["DeviceError", "DtypeError", "ShapeError", "check_channel_vectors", "type_name"]


class ShapeError(ValueError, RuntimeError):
    """A tensor's shape, or a convolution's geometry (stride, padding, dilation, groups, kernel
    size), that does not fit the op or layer."""


class DtypeError(TypeError, RuntimeError):
    """A dtype the op or layer does not take (bnnops computes in float32, bfloat16 and float16),
    dtypes that must match and do not, or an argument that is not a tensor."""


class DeviceError(ValueError, RuntimeError):
    """Tensors of one call on different devices."""


def type_name(t: object) -> torch.dtype | str:
    """What an argument is, for error messages: a tensor's dtype, else its type's name."""
    return t.dtype if isinstance(t, torch.Tensor) else type(t).__name__


def check_channel_vectors(n: int, device: torch.device, **vectors: torch.Tensor | None) -> None:
    """Check optional per-output-channel vectors (scale, bias), each named by its keyword.

    Raises:
        DtypeError: a vector is not a float32, bfloat16 or float16 tensor.
        ShapeError: a vector's shape is not (n,).
        DeviceError: a vector is not on ``device``.
    """
    for name, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES:
            raise DtypeError(f"{name} must be a float32, bfloat16 or float16 tensor, got {type_name(v)}")
        if v.shape != (n,):
            raise ShapeError(f"{name} must have shape ({n},), one value per output channel, got {tuple(v.shape)}")
        if v.device != device:
            raise DeviceError(f"{name} is on {v.device} but the input is on {device}")
