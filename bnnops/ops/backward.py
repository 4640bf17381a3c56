"""The backward ops of a binary layer that saved its input packed: ``torch.ops.bnnops.*`` ops over the
saved sign and pass-mask words (layouts: :mod:`bnnops.ops.backward_reference`), so that the
backward of :func:`bnnops.binary_linear` / :func:`bnnops.binary_conv2d` is the same op calls in
eager code and in a graph ``torch.compile`` captures (CUDA tensors run the Triton launchers in both).

- ``binary_linear_grad_weight(grad, sign_words, K, out_dtype)``: grad_W (N, K) = grad^T sign(x),
  grad (M, N) float, sign_words int32 (M, ceil(K/32)); in ``out_dtype``.
- ``binary_linear_grad_input_masked(grad, weight, mask_words, K)``: grad_x (M, K) = grad W where
  the mask bit is 1, else 0; the weight's words (N, ceil(K/32)), mask_words (M, ceil(K/32)); in
  grad's dtype.
- ``binary_conv2d_grad_weight(grad, sign_words, weight_shape, stride, padding, dilation, groups,
  pad_value, out_dtype, channels_last)``: grad_W (O, Cg, kh, kw) from grad (N, O, OH, OW) and the
  per-group channels-last sign words (N, H, W, groups * ceil(Cg/32)), the input padded with
  ``pad_value``; in ``out_dtype``, channels_last when ``channels_last``.
- ``binary_conv2d_grad_input(grad, weight, mask_words, input_shape, stride, padding, dilation,
  groups, out_dtype, channels_last)``: grad_x (N, C, H, W) from the weight's words (O, kh, kw,
  ceil(Cg/32)) and the optional mask words (N, H, W, groups * ceil(Cg/32)); padded positions get
  none; in ``out_dtype``, channels_last when ``channels_last``.

Padding is (top, bottom, left, right). Every op sums in fp32 and rounds once. CPU tensors run the
references of :mod:`bnnops.ops.backward_reference`; CUDA tensors the launchers of
``bnnops.kernels.linear_backward`` / ``conv2d_backward`` (16-bit grad: exact products; fp32 grad:
two TF32 products, error about 2^-20 |g| each; the bound the kernel tests state). The ops have no
derivative (second derivatives are refused, :func:`bnnops.ops.library.refuse_backward`). Bad input
raises :class:`~bnnops.ops.checks.DtypeError`, :class:`~bnnops.ops.checks.ShapeError` or
:class:`~bnnops.ops.checks.DeviceError` on every path.
"""

from collections.abc import Sequence

import torch

from bnnops import kernels
from bnnops.ops.backward_reference import (
    conv2d_grad_input_reference,
    conv2d_grad_weight_reference,
    linear_grad_input_reference,
    linear_grad_weight_reference,
)
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError, type_name
from bnnops.ops.conv import PAD_VALUES, output_shape
from bnnops.ops.library import FLOAT_DTYPES, define
from bnnops.packing import packed_length

__all__: list[str] = []


def _check_grad(grad: object, rank: int, what: str) -> None:
    if not isinstance(grad, torch.Tensor) or grad.dtype not in FLOAT_DTYPES:
        raise DtypeError(f"{what}: grad must be float32, bfloat16 or float16, got {type_name(grad)}")
    if grad.dim() != rank:
        raise ShapeError(f"{what}: grad must have rank {rank}, got shape {tuple(grad.shape)}")


def _check_words(words: object, shape: Sequence[int], device: torch.device, what: str, name: str) -> None:
    """words must be int32 of ``shape`` on ``device``."""
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32:
        raise DtypeError(f"{what}: {name} must be int32 packed words, got {type_name(words)}")
    if tuple(words.shape) != tuple(shape):
        raise ShapeError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(words.shape)}")
    if words.device != device:
        raise DeviceError(f"{what}: {name} is on {words.device} but grad is on {device}")


def _check_out_dtype(out_dtype: torch.dtype | None) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise DtypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


# ---- linear ----


def _linear_grad_weight_check(grad, sign_words, K, out_dtype=None):
    _check_grad(grad, 2, "binary_linear_grad_weight")
    _check_words(sign_words, (grad.shape[0], packed_length(K)), grad.device, "binary_linear_grad_weight", "sign_words")
    _check_out_dtype(out_dtype)


def _linear_grad_weight_cuda(grad, sign_words, K, out_dtype=None):
    return kernels.load("linear_backward").grad_weight(grad, sign_words.contiguous(), K, out_dtype=out_dtype)


def _linear_grad_input_check(grad, weight, mask_words, K):
    what = "binary_linear_grad_input_masked"
    _check_grad(grad, 2, what)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ShapeError(f"{what}: weight must be int32 words (N, ceil(K/32)), got {type_name(weight)}")
    _check_words(weight, (grad.shape[1], packed_length(K)), grad.device, what, "weight")
    _check_words(mask_words, (grad.shape[0], packed_length(K)), grad.device, what, "mask_words")


def _linear_grad_input_cuda(grad, weight, mask_words, K):
    return kernels.load("linear_backward").grad_input(grad, weight.contiguous(), mask_words.contiguous(), K)


define(
    "binary_linear_grad_weight(Tensor grad, Tensor sign_words, SymInt K, ScalarType? out_dtype=None) -> Tensor",
    check=_linear_grad_weight_check,
    reference=linear_grad_weight_reference,
    cuda=_linear_grad_weight_cuda,
    fake=lambda grad, sign_words, K, out_dtype=None: grad.new_empty(grad.shape[1], K, dtype=out_dtype or grad.dtype),
)
define(
    "binary_linear_grad_input_masked(Tensor grad, Tensor weight, Tensor mask_words, SymInt K) -> Tensor",
    check=_linear_grad_input_check,
    reference=linear_grad_input_reference,
    cuda=_linear_grad_input_cuda,
    fake=lambda grad, weight, mask_words, K: grad.new_empty(grad.shape[0], K),
)


# ---- conv ----


def _check_geometry(what, grad, x_shape, kernel, O, stride, padding, dilation, groups):
    """grad must be the (N, O, OH, OW) output of a conv of x_shape (N, C, H, W) with that geometry."""
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ShapeError(f"{what}: stride and dilation need 2 values and padding 4 (top, bottom, left, right)")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ShapeError(
            f"{what}: stride and dilation must be >= 1 and padding >= 0, got stride={list(stride)}, "
            f"padding={list(padding)}, dilation={list(dilation)}"
        )
    C = x_shape[1]
    if groups < 1 or C % groups or O % groups:
        raise ShapeError(f"{what}: groups={groups} must divide the input ({C}) and output ({O}) channels")
    expected = output_shape(x_shape, (O, *kernel, 0), stride, padding, dilation)
    if tuple(grad.shape) != expected or min(expected[2:]) < 1:
        raise ShapeError(
            f"{what}: grad {tuple(grad.shape)} is not the output {expected} of a conv of {tuple(x_shape)} with "
            f"{O} output channels, kernel {tuple(kernel)}, stride {list(stride)}, padding {list(padding)}, "
            f"dilation {list(dilation)}"
        )


def _conv_options(stride, padding, dilation, groups, out_dtype, channels_last):
    """The conv launchers' keyword arguments."""
    return dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        out_dtype=out_dtype,
        channels_last=channels_last,
    )


def _conv_grad_weight_check(
    grad, sign_words, weight_shape, stride, padding, dilation, groups, pad_value, out_dtype=None, channels_last=False
):
    what = "binary_conv2d_grad_weight"
    _check_grad(grad, 4, what)
    if len(weight_shape) != 4 or min(weight_shape) < 0:
        raise ShapeError(f"{what}: weight_shape must be (O, Cg, kh, kw), got {list(weight_shape)}")
    if not isinstance(sign_words, torch.Tensor) or sign_words.dim() != 4:
        raise ShapeError(
            f"{what}: sign_words must be int32 (N, H, W, groups * ceil(Cg/32)), got {type_name(sign_words)}"
        )
    O, Cg, KH, KW = weight_shape
    N, H, W, _ = sign_words.shape
    _check_geometry(what, grad, (N, Cg * groups, H, W), (KH, KW), O, stride, padding, dilation, groups)
    _check_words(sign_words, (N, H, W, groups * packed_length(Cg)), grad.device, what, "sign_words")
    if pad_value not in PAD_VALUES:
        raise ValueError(f"{what}: pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")
    _check_out_dtype(out_dtype)


def _conv_grad_weight_cuda(
    grad, sign_words, weight_shape, stride, padding, dilation, groups, pad_value, out_dtype=None, channels_last=False
):
    options = _conv_options(stride, padding, dilation, groups, out_dtype, channels_last)
    return kernels.load("conv2d_backward").grad_weight(
        grad, sign_words.contiguous(), weight_shape, pad_value=pad_value, **options
    )


def _conv_grad_weight_fake(
    grad, sign_words, weight_shape, stride, padding, dilation, groups, pad_value, out_dtype=None, channels_last=False
):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(weight_shape, dtype=out_dtype or grad.dtype, device=grad.device, memory_format=fmt)


def _conv_grad_input_check(
    grad, weight, mask_words, input_shape, stride, padding, dilation, groups, out_dtype=None, channels_last=False
):
    what = "binary_conv2d_grad_input"
    _check_grad(grad, 4, what)
    if len(input_shape) != 4 or min(input_shape) < 0:
        raise ShapeError(f"{what}: input_shape must be (N, C, H, W), got {list(input_shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ShapeError(f"{what}: weight must be int32 words (O, kh, kw, ceil(Cg/32)), got {type_name(weight)}")
    N, C, H, W = input_shape
    O, KH, KW, _ = weight.shape
    _check_geometry(what, grad, input_shape, (KH, KW), O, stride, padding, dilation, groups)
    Cg = C // groups
    _check_words(weight, (O, KH, KW, packed_length(Cg)), grad.device, what, "weight")
    if mask_words is not None:
        _check_words(mask_words, (N, H, W, groups * packed_length(Cg)), grad.device, what, "mask_words")
    _check_out_dtype(out_dtype)


def _conv_grad_input_cuda(
    grad, weight, mask_words, input_shape, stride, padding, dilation, groups, out_dtype=None, channels_last=False
):
    options = _conv_options(stride, padding, dilation, groups, out_dtype, channels_last)
    mask_words = None if mask_words is None else mask_words.contiguous()
    return kernels.load("conv2d_backward").grad_input(grad, weight.contiguous(), mask_words, input_shape, **options)


def _conv_grad_input_fake(
    grad, weight, mask_words, input_shape, stride, padding, dilation, groups, out_dtype=None, channels_last=False
):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(input_shape, dtype=out_dtype or grad.dtype, device=grad.device, memory_format=fmt)


define(
    "binary_conv2d_grad_weight(Tensor grad, Tensor sign_words, SymInt[] weight_shape, int[] stride, int[] padding, "
    "int[] dilation, int groups, float pad_value, ScalarType? out_dtype=None, bool channels_last=False) -> Tensor",
    check=_conv_grad_weight_check,
    reference=conv2d_grad_weight_reference,
    cuda=_conv_grad_weight_cuda,
    fake=_conv_grad_weight_fake,
)
define(
    "binary_conv2d_grad_input(Tensor grad, Tensor weight, Tensor? mask_words, SymInt[] input_shape, int[] stride, "
    "int[] padding, int[] dilation, int groups, ScalarType? out_dtype=None, bool channels_last=False) -> Tensor",
    check=_conv_grad_input_check,
    reference=conv2d_grad_input_reference,
    cuda=_conv_grad_input_cuda,
    fake=_conv_grad_input_fake,
)
