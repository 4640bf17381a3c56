"""bnnops: Triton kernels for binarized neural networks in PyTorch.

Bit-packed binary GEMM and conv2d forward passes, and the Binary Optimizer (Bop, Helwegen et al.,
NeurIPS 2019) as one fused update over bit-packed weights. CPU tensors run the pure-PyTorch
reference of every op; CUDA tensors run the Triton kernels in ``bnnops.kernels``.
"""

from bnnops import kernels, nn, optim, quantizers
from bnnops.binary_tensor import BinaryTensor
from bnnops.conv import binary_conv2d
from bnnops.linear import binary_linear
from bnnops.packing import pack_signs, packed_length, unpack_signs
from bnnops.summary import summary

__version__ = "0.1.0"

__all__ = [
    "BinaryTensor",
    "binary_conv2d",
    "binary_linear",
    "kernels",
    "nn",
    "optim",
    "pack_signs",
    "packed_length",
    "quantizers",
    "summary",
    "unpack_signs",
]
