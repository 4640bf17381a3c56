"""bnnops: Triton kernels for binarized neural networks in PyTorch.

Bit-packed binary GEMM and conv2d forward passes, and the Binary Optimizer (Bop, Helwegen et al.,
NeurIPS 2019) as one fused update over bit-packed weights. CPU tensors run the pure-PyTorch
reference of every op; CUDA tensors run the Triton kernels in ``bnnops.kernels``.

From the bottom up: the ops ``torch.ops.bnnops.*`` (:mod:`bnnops.ops`; the pack ops with their
format in :mod:`bnnops.packing`), no autograd; the functions :func:`binary_linear`
(:mod:`bnnops.linear`) and :func:`binary_conv2d` (:mod:`bnnops.conv`), which add autograd and
quantizers (:mod:`bnnops.quantizers`); the modules of :mod:`bnnops.nn` on top of them, and the
reference networks of :mod:`bnnops.models`. Bad input raises :class:`ShapeError`,
:class:`DtypeError` or :class:`DeviceError`, each also a ``RuntimeError`` as torch raises.
"""

from bnnops import kernels, models, nn, optim, quantizers
from bnnops.binary_tensor import BinaryTensor
from bnnops.conv import binary_conv2d
from bnnops.conv1d import binary_conv1d
from bnnops.convert import ConversionError, LatentLayer, convert
from bnnops.folding import fold_for_inference
from bnnops.linear import binary_linear
from bnnops.memory import memory_report
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError
from bnnops.packing import pack_signs, packed_length, unpack_signs
from bnnops.summary import summary

__version__ = "0.1.0"

__all__ = [
    "BinaryTensor",
    "ConversionError",
    "DeviceError",
    "DtypeError",
    "LatentLayer",
    "ShapeError",
    "binary_conv1d",
    "binary_conv2d",
    "binary_linear",
    "convert",
    "fold_for_inference",
    "kernels",
    "memory_report",
    "models",
    "nn",
    "optim",
    "pack_signs",
    "packed_length",
    "quantizers",
    "summary",
    "unpack_signs",
]
