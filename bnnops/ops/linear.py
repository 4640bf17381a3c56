"""The linear ops: ``bnnops::binary_linear_w1a1``, ``binary_linear_w1a16``, ``binary_linear_grad_input``.

Products with a packed +-1 weight W (out_features N, in_features K), given as int32 words
(N, ceil(K/32)) in the layout of :mod:`bnnops.packing`:

- ``binary_linear_w1a1(x, weight, K, scale, bias, out_dtype)`` (W1A1): y = sign(x) W^T * scale +
  bias, y (..., N) in ``out_dtype``. x is float (..., K), binarized x < 0 -> -1 else +1, or int32
  sign words (..., ceil(K/32)). The dot product is an exact integer.
- ``binary_linear_w1a16(x, weight, scale, bias, out_dtype=None)`` (W1A16): y = x W^T * scale +
  bias for real x (..., K), fp32 accumulation, y in ``out_dtype`` (None: x's dtype). K is x's last
  dimension.
- ``binary_linear_grad_input(grad, weight, K)``: grad W, (..., N) -> (..., K) in grad's dtype, the
  input gradient of both, reading W packed.

scale and bias are optional per-output-channel (N,) float tensors. Floats are float32, bfloat16 or
float16; x, the weight, scale and bias are on one device. Each op computes in fp32 and rounds once,
to its output dtype. Bad input raises :class:`~bnnops.ops.checks.DtypeError`,
:class:`~bnnops.ops.checks.ShapeError` or :class:`~bnnops.ops.checks.DeviceError` on every path
(CPU, CUDA, fake). CPU tensors run
:mod:`bnnops.ops.reference`, CUDA tensors the launchers of ``bnnops.kernels.gemm`` on 2-D rows.
"""

import torch

from bnnops import kernels
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError, check_channel_vectors, type_name
from bnnops.ops.library import FLOAT_DTYPES, contiguous, define
from bnnops.ops.reference import grad_input_reference, w1a1_reference, w1a16_reference
from bnnops.packing import packed_length

__all__ = ["check_features", "rows"]


def rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., F) as 2-D rows (M, F); a 1-D x is one row."""
    # flatten, not reshape(-1, F): that cannot infer -1 when F = 0.
    return x.flatten(0, -2) if x.dim() > 1 else x[None]


def check_features(x: torch.Tensor, K: int) -> None:
    """Check that x is (..., K) float, or (..., ceil(K/32)) int32 sign words.

    Raises:
        ShapeError: x is a scalar, or its last dimension does not match K.
    """
    if x.dim() == 0:
        raise ShapeError("input must have at least one dimension (..., in_features), got a scalar")
    features = packed_length(K) if x.dtype == torch.int32 else K
    if x.shape[-1] != features:
        if x.dtype == torch.int32:
            raise ShapeError(
                f"input's last dimension is {x.shape[-1]}, expected ceil(K/32) = {features} words: an int32 "
                f"input is taken as packed sign words (bnnops.pack_signs); pass 0/1 or +-1 values as floats"
            )
        raise ShapeError(f"input's last dimension is {x.shape[-1]}, expected in_features = {K}")


def _check_words(weight, K):
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int32:
        raise DtypeError(f"the packed weight must be int32 words, got {type_name(weight)}")
    if weight.dim() != 2 or weight.shape[1] != packed_length(K):
        raise ShapeError(
            f"the packed weight must have shape (out_features, ceil(K/32)) = (N, {packed_length(K)}) "
            f"for K={K}, got {tuple(weight.shape)}"
        )


def _check_product(x, weight, K, scale, bias, *, packed_ok):
    kinds = "float32, bfloat16 or float16" + (" (or int32 packed sign words)" if packed_ok else "")
    if not isinstance(x, torch.Tensor) or not (x.dtype in FLOAT_DTYPES or (packed_ok and x.dtype == torch.int32)):
        raise DtypeError(f"input must be {kinds}, got {type_name(x)}")
    _check_words(weight, K)
    check_features(x, K)
    if weight.device != x.device:
        raise DeviceError(f"the weight is on {weight.device} but the input is on {x.device}")
    check_channel_vectors(weight.shape[0], x.device, scale=scale, bias=bias)


def _check_out_dtype(out_dtype):
    if out_dtype not in FLOAT_DTYPES:
        raise DtypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _w1a1_check(x, weight, K, scale, bias, out_dtype):
    _check_product(x, weight, K, scale, bias, packed_ok=True)
    _check_out_dtype(out_dtype)


def _w1a16_check(x, weight, scale, bias, out_dtype=None):
    _check_product(x, weight, x.shape[-1] if x.dim() else 0, scale, bias, packed_ok=False)
    if out_dtype is not None:
        _check_out_dtype(out_dtype)


def _grad_input_check(grad, weight, K):
    _check_words(weight, K)
    if not isinstance(grad, torch.Tensor) or grad.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"grad must be float32, bfloat16 or float16, got {type_name(grad)}")
    if grad.dim() == 0 or grad.shape[-1] != weight.shape[0]:
        raise ShapeError(f"grad must have shape (..., out_features = {weight.shape[0]}), got {tuple(grad.shape)}")
    if grad.device != weight.device:
        raise DeviceError(f"the weight is on {weight.device} but grad is on {grad.device}")


def _w1a1_cuda(x, weight, K, scale, bias, out_dtype):
    y = kernels.load("gemm").w1a1(
        rows(x), weight.contiguous(), K, scale=contiguous(scale), bias=contiguous(bias), out_dtype=out_dtype
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _w1a16_cuda(x, weight, scale, bias, out_dtype=None):
    x2d = rows(x)
    # The launcher writes its fp32 epilogue to out's dtype (one rounding), whatever x's dtype.
    out = torch.empty(x2d.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    y = kernels.load("gemm").w1a16(x2d, weight.contiguous(), scale=contiguous(scale), bias=contiguous(bias), out=out)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _grad_input_cuda(grad, weight, K):
    return kernels.load("gemm").grad_input(rows(grad), weight.contiguous(), K).reshape(*grad.shape[:-1], K)


define(
    "binary_linear_w1a1(Tensor x, Tensor weight, SymInt K, Tensor? scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    check=_w1a1_check,
    reference=w1a1_reference,
    cuda=_w1a1_cuda,
    fake=lambda x, weight, K, scale, bias, out_dtype: x.new_empty(*x.shape[:-1], weight.shape[0], dtype=out_dtype),
)
define(
    "binary_linear_w1a16(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, ScalarType? out_dtype=None) -> Tensor",
    check=_w1a16_check,
    reference=w1a16_reference,
    cuda=_w1a16_cuda,
    fake=lambda x, weight, scale, bias, out_dtype=None: x.new_empty(
        *x.shape[:-1], weight.shape[0], dtype=out_dtype or x.dtype
    ),
)
define(
    "binary_linear_grad_input(Tensor grad, Tensor weight, SymInt K) -> Tensor",
    check=_grad_input_check,
    reference=grad_input_reference,
    cuda=_grad_input_cuda,
    fake=lambda grad, weight, K: grad.new_empty(*grad.shape[:-1], K),
)
