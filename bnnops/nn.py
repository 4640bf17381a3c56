"""Binary layers (``bnnops.nn``): drop-in modules that run the bnnops kernels.

- :class:`BinaryLinear`: binary (or binary-weight) linear layer, see :mod:`bnnops.linear`.
- :class:`BinaryConv2d`: binary (or binary-weight) 2-D convolution, see :mod:`bnnops.conv`.
"""

from bnnops.conv import BinaryConv2d
from bnnops.linear import BinaryLinear

__all__ = ["BinaryConv2d", "BinaryLinear"]
