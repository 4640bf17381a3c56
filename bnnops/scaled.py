"""Binary layers with a fixed per-output-channel scale: what :func:`bnnops.convert` makes of a layer
whose weight is ``alpha * sign(W)`` (XNOR-Net's alpha, magnitude_aware_sign, or a dense +-alpha weight).

- :class:`ScaledBinaryLinear`: :class:`bnnops.nn.BinaryLinear` with a ``scale`` buffer.
- :class:`ScaledBinaryConv1d`: :class:`bnnops.nn.BinaryConv1d` with a ``scale`` buffer.
- :class:`ScaledBinaryConv2d`: :class:`bnnops.nn.BinaryConv2d` with a ``scale`` buffer.

``scale`` is a float32 (out,) buffer (ones at construction) that the op fuses into its epilogue:
``y = (q(x) W^T) * scale + bias`` in fp32, then one rounding to x's dtype (:mod:`bnnops.layer_common`),
the epilogue a latent magnitude_aware_sign layer runs with its alpha, so a converted layer gives the
latent layer's bits. It is a buffer, not a parameter: it is frozen at inference and saved in the
state dict; ``to(dtype)`` casts it like any buffer (the layer then computes with the cast scale).
The base layers' forward passes a ``scale`` buffer to their op where the layer has one, so these
classes only add the buffer.
"""

import torch

from bnnops.nn import BinaryConv1d, BinaryConv2d, BinaryLinear

__all__ = ["ScaledBinaryConv1d", "ScaledBinaryConv2d", "ScaledBinaryLinear"]


class _FixedScale:
    """Adds the ``scale`` buffer (float32, one per output channel: the weight's dim 0, ones) to a
    bnnops layer class placed after it in the bases."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.ones(self.weight.shape[0], device=self.weight.device))


class ScaledBinaryLinear(_FixedScale, BinaryLinear):
    """:class:`bnnops.nn.BinaryLinear` (same arguments) times a fixed per-output-channel ``scale``
    (float32 buffer (out_features,), ones at construction): ``q(x) @ W^T * scale + bias``."""


class ScaledBinaryConv1d(_FixedScale, BinaryConv1d):
    """:class:`bnnops.nn.BinaryConv1d` (same arguments) times a fixed per-output-channel ``scale``
    (float32 buffer (out_channels,), ones at construction): ``conv1d(q(x), W) * scale + bias``."""


class ScaledBinaryConv2d(_FixedScale, BinaryConv2d):
    """:class:`bnnops.nn.BinaryConv2d` (same arguments) times a fixed per-output-channel ``scale``
    (float32 buffer (out_channels,), ones at construction): ``conv2d(q(x), W) * scale + bias``."""
