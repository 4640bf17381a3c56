"""Argument checks shared by the op families: what an argument is, and per-output-channel vectors."""

import torch

from bnnops.ops.library import FLOAT_DTYPES


def type_name(t: object) -> torch.dtype | str:
    """What an argument is, for error messages: a tensor's dtype, else its type's name."""
    return t.dtype if isinstance(t, torch.Tensor) else type(t).__name__


def check_channel_vectors(n: int, device: torch.device, **vectors: torch.Tensor | None) -> None:
    """Check optional per-output-channel vectors (scale, bias), each named by its keyword.

    Raises:
        TypeError: a vector is not a float32, bfloat16 or float16 tensor.
        ValueError: a vector's shape is not (n,), or it is not on ``device``.
    """
    for name, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32, bfloat16 or float16 tensor, got {type_name(v)}")
        if v.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), one value per output channel, got {tuple(v.shape)}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but the input is on {device}")
