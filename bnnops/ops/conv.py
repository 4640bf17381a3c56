"""The conv ops: ``bnnops::binary_conv2d`` and ``bnnops::binary_conv2d_packed``.

``torch.ops.bnnops.binary_conv2d(x, weight, bias, scale, stride, padding, dilation, groups,
pad_value, binarize, out_dtype=None)`` computes, for ``x`` (N, C, H, W) and the int32 words
``weight`` (O, kh, kw, ceil(Cg/32)) of a logical +-1 weight (O, Cg, kh, kw), Cg = C / groups
(layout: :mod:`bnnops.packing`),

    y = scale * conv2d(pad(a(x), padding, pad_value), w, stride, dilation, groups) + bias

per output channel, where a = sign (W1A1, ``binarize=True``; sign(0) = +1, the convolution is an
exact integer) or the identity (W1A16, ``binarize=False``), and ``pad`` pads with ``pad_value``: 0 is
zero padding; +1 / -1 (larq's ``pad_values``) keep every input of a binary layer exactly +-1.
``stride`` and ``dilation`` are 2 ints >= 1, ``padding`` is 4 ints >= 0 (top, bottom, left, right).
``bias`` and ``scale`` are optional (O,) float tensors. The output (N, O, OH, OW)
(:func:`output_shape`) is computed in fp32 and rounded once, to ``out_dtype`` (None: x's dtype),
and is channels_last when x is (:func:`bnnops.ops.reference.output_is_channels_last`). With zero
input channels every sum is empty: the output is ``bias`` (or 0) at every pixel.

Bad input raises :class:`~bnnops.ops.checks.DtypeError` (a dtype or type),
:class:`~bnnops.ops.checks.ShapeError` (a shape or geometry), :class:`~bnnops.ops.checks.DeviceError`
or ``ValueError`` (a pad value) on every path. CPU tensors run
:func:`bnnops.ops.reference.binary_conv2d_reference`, CUDA tensors the implicit-GEMM kernel of
``bnnops.kernels.conv2d``, which reads the words.

``torch.ops.bnnops.binary_conv2d_packed(x, weight, channels, bias, scale, stride, padding,
dilation, groups, pad_value, channels_last, out_dtype)`` is the W1A1 conv of an input given as its
sign words: ``x`` int32 (N, H, W, groups * ceil(Cg/32)), Cg = ``channels`` / groups, each group
starting a new word: word [n, h, w, g * ceil(Cg/32) + v] bit j holds the sign of channel
g * Cg + 32 v + j (bit 1: -1; padding bits are ignored), the layout of a binary layer's saved
input (:mod:`bnnops.ops.backward_reference`) and of ``pack_sign_and_mask_conv``. The words do
not say C, so ``channels`` does. The result is the ``binarize=True`` op's on the +-1 input the
words hold, bit for bit, in ``out_dtype``, channels_last when ``channels_last``. The CUDA path
reads 1 bit per input element instead of x's 16 or 32.
"""

from collections.abc import Sequence

import torch

from bnnops import kernels
from bnnops.ops.backward_reference import unpack_conv_words
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError, check_channel_vectors
from bnnops.ops.library import FLOAT_DTYPES, contiguous, define
from bnnops.ops.reference import binary_conv2d_reference, output_is_channels_last
from bnnops.packing import packed_length

__all__ = ["PAD_VALUES", "output_shape"]

# The values the padding may hold: zero padding, or a binary value (larq's pad_values).
PAD_VALUES = (0.0, 1.0, -1.0)


def output_shape(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int, int, int]:
    """(N, O, OH, OW) of a conv of ``x_shape`` (N, C, H, W) with words of ``weight_shape``
    (O, kh, kw, words per tap), padding (top, bottom, left, right)."""
    N, _, H, W = x_shape
    O, KH, KW, _ = weight_shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, O, OH, OW


def _check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize, out_dtype=None):
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DtypeError(f"binary_conv2d input must be a float32, bfloat16 or float16 tensor, got {got}")
    if x.dim() != 4:
        raise ShapeError(f"binary_conv2d input must have rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
    _check_conv(x.shape[1:], x.device, weight, bias, scale, stride, padding, dilation, groups, pad_value, out_dtype)


def _check_conv(chw, device, weight, bias, scale, stride, padding, dilation, groups, pad_value, out_dtype):
    """The checks of both ops past the input's own, for an input of ``chw`` (C, H, W) on ``device``."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int32:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise DtypeError(f"binary_conv2d weight must be int32 packed words (O, kh, kw, ceil(Cg/32)), got {got}")
    if weight.dim() != 4:
        raise ShapeError(
            f"binary_conv2d weight must be int32 packed words (O, kh, kw, ceil(Cg/32)), got shape {tuple(weight.shape)}"
        )
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise DtypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ShapeError(
            f"stride and dilation need 2 values and padding 4 (top, bottom, left, right), got "
            f"stride={list(stride)}, padding={list(padding)}, dilation={list(dilation)}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ShapeError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={list(stride)}, "
            f"padding={list(padding)}, dilation={list(dilation)}"
        )
    C, H, W = chw
    O, KH, KW, words_per_row = weight.shape
    if groups < 1 or C % groups or O % groups:
        raise ShapeError(
            f"groups={groups} must be >= 1 and divide both the input channels ({C}) and the output channels ({O})"
        )
    Cg = C // groups
    if words_per_row != packed_length(Cg):
        raise ShapeError(
            f"packed weight of shape {tuple(weight.shape)} holds {words_per_row} words per tap, but the input "
            f"has {C} channels in {groups} group(s): {Cg} per group needs {packed_length(Cg)} words"
        )
    if (
        H + padding[0] + padding[1] < dilation[0] * (KH - 1) + 1
        or W + padding[2] + padding[3] < dilation[1] * (KW - 1) + 1
    ):
        raise ShapeError(
            f"kernel {KH}x{KW} (dilation {list(dilation)}) is larger than the padded input "
            f"{H + padding[0] + padding[1]}x{W + padding[2] + padding[3]}"
        )
    if pad_value not in PAD_VALUES:
        raise ValueError(f"pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")
    check_channel_vectors(O, device, bias=bias, scale=scale)
    if weight.device != device:
        raise DeviceError(f"binary_conv2d weight is on {weight.device} but the input is on {device}")


def _check_packed(
    x, weight, channels, bias, scale, stride, padding, dilation, groups, pad_value, channels_last, out_dtype
):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DtypeError(
            f"binary_conv2d_packed input must be int32 sign words (N, H, W, groups * ceil(C/groups/32)), got {got}"
        )
    if x.dim() != 4:
        raise ShapeError(
            f"binary_conv2d_packed input must be int32 sign words of rank 4 (N, H, W, groups * ceil(C/groups/32)), "
            f"got shape {tuple(x.shape)}"
        )
    if out_dtype not in FLOAT_DTYPES:
        raise DtypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if channels < 0 or groups < 1 or channels % groups:
        raise ShapeError(f"groups={groups} must be >= 1 and divide the input channels ({channels})")
    words = groups * packed_length(channels // groups)
    if x.shape[-1] != words:
        raise ShapeError(
            f"packed input of shape {tuple(x.shape)} holds {x.shape[-1]} words per pixel, but {channels} channels "
            f"in {groups} group(s) need {words} (each group starts a word: groups * ceil(C/groups/32))"
        )
    _, H, W, _ = x.shape
    _check_conv(
        (channels, H, W), x.device, weight, bias, scale, stride, padding, dilation, groups, pad_value, out_dtype
    )


def launch(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, **options):
    """The conv launcher (``bnnops.kernels.conv2d.conv2d``) on an op's arguments: weight words, bias
    and scale made unit-stride along their last dimension, as the kernel reads them; ``options`` are
    the launcher's keywords (binarize, out_dtype, channels, out, signs)."""
    return kernels.load("conv2d").conv2d(
        x,
        weight.contiguous(),
        bias=contiguous(bias),
        scale=contiguous(scale),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
        **options,
    )


def _conv2d_cuda(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize, out_dtype=None):
    geometry = (stride, padding, dilation, groups, pad_value)
    return launch(x, weight, bias, scale, *geometry, binarize=binarize, out_dtype=out_dtype)


def _conv2d_fake(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize, out_dtype=None):
    fmt = torch.channels_last if output_is_channels_last(x) else torch.contiguous_format
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=out_dtype or x.dtype, device=x.device, memory_format=fmt)


define(
    "binary_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, int[] stride, int[] padding, "
    "int[] dilation, int groups, float pad_value, bool binarize, ScalarType? out_dtype=None) -> Tensor",
    check=_check,
    reference=binary_conv2d_reference,
    cuda=_conv2d_cuda,
    fake=_conv2d_fake,
)


def _packed_reference(
    x, weight, channels, bias, scale, stride, padding, dilation, groups, pad_value, channels_last, out_dtype
):
    values = unpack_conv_words(x, channels, groups, torch.float32)
    y = binary_conv2d_reference(
        values, weight, bias, scale, stride, padding, dilation, groups, pad_value, True, out_dtype
    )
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _packed_out(x, weight, channels, stride, padding, dilation, channels_last, out_dtype):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = output_shape((x.shape[0], channels, *x.shape[1:3]), weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=out_dtype, device=x.device, memory_format=fmt)


def _packed_cuda(
    x, weight, channels, bias, scale, stride, padding, dilation, groups, pad_value, channels_last, out_dtype
):
    out = _packed_out(x, weight, channels, stride, padding, dilation, channels_last, out_dtype)
    return launch(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, out=out, channels=channels)


def _packed_fake(
    x, weight, channels, bias, scale, stride, padding, dilation, groups, pad_value, channels_last, out_dtype
):
    return _packed_out(x, weight, channels, stride, padding, dilation, channels_last, out_dtype)


define(
    "binary_conv2d_packed(Tensor x, Tensor weight, SymInt channels, Tensor? bias, Tensor? scale, int[] stride, "
    "int[] padding, int[] dilation, int groups, float pad_value, bool channels_last, ScalarType out_dtype) -> Tensor",
    check=_check_packed,
    reference=_packed_reference,
    cuda=_packed_cuda,
    fake=_packed_fake,
)
