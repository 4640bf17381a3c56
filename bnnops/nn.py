"""Binary layers (``bnnops.nn``): drop-in modules that run the bnnops kernels.

- :class:`BinaryLinear`: binary (or binary-weight) linear layer, see :mod:`bnnops.linear`.
"""

from bnnops.linear import BinaryLinear

__all__ = ["BinaryLinear"]
