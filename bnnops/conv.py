"""Binary conv2d: the pure-PyTorch reference and the ``bnnops::binary_conv2d`` op.

``torch.ops.bnnops.binary_conv2d(x, weight, bias, scale, stride, padding, dilation, groups,
pad_value, binarize)`` computes, for ``x`` (N, C, H, W) and the packed words ``weight``
(O, kh, kw, ceil(Cg/32)) of a logical +-1 weight (O, Cg, kh, kw), Cg = C / groups
(layout: :mod:`bnnops.packing`),

    y = scale * conv2d(pad(a(x), padding, pad_value), w, stride, dilation, groups) + bias

per output channel, where a = sign (A1W1, ``binarize=True``; sign(0) = +1, the convolution is an exact
integer) or the identity (W1A16, ``binarize=False``), and ``pad`` pads with ``pad_value``: 0 is zero
padding; +1 / -1 (larq's ``pad_values``) keep every input of a binary layer exactly +-1. ``padding``
is (top, bottom, left, right). The output has x's dtype, is computed in fp32 (one rounding at the
end), and is channels_last when x is. CPU tensors run the reference below, CUDA tensors the Triton
implicit-GEMM kernel of ``bnnops.kernels.conv2d``, which reads the packed weight.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from bnnops import kernels
from bnnops.packing import FLOAT_DTYPES, packed_length, unpack_signs_reference

__all__ = ["binary_conv2d_reference", "output_shape"]

PAD_VALUES = (0.0, 1.0, -1.0)


# The kernel launcher (bnnops.kernels.conv2d) states the output's shape and memory format too; it
# cannot be imported without triton, and the CPU path must work without it.
def _output_is_channels_last(x):
    # channels_last when x is channels_last-contiguous but not contiguous (as F.conv2d on CUDA).
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def output_shape(x_shape, weight_shape, stride, padding, dilation):
    """(N, O, OH, OW) of a conv of ``x_shape`` (N, C, H, W) with packed words of ``weight_shape``."""
    N, _, H, W = x_shape
    O, KH, KW, _ = weight_shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, O, OH, OW


def _check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value):
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"binary_conv2d input must be a float32, bfloat16 or float16 tensor, got {got}")
    if x.dim() != 4:
        raise ValueError(f"binary_conv2d input must have rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int32 or weight.dim() != 4:
        got = (weight.dtype, tuple(weight.shape)) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"binary_conv2d weight must be int32 packed words (O, kh, kw, ceil(Cg/32)), got {got}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError(
            f"stride and dilation need 2 values and padding 4 (top, bottom, left, right), got "
            f"stride={list(stride)}, padding={list(padding)}, dilation={list(dilation)}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={list(stride)}, "
                         f"padding={list(padding)}, dilation={list(dilation)}")
    N, C, H, W = x.shape
    O, KH, KW, n_words = weight.shape
    if groups < 1 or C % groups or O % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide both the input channels ({C}) and "
                         f"the output channels ({O})")
    Cg = C // groups
    if n_words != packed_length(Cg):
        raise ValueError(
            f"packed weight of shape {tuple(weight.shape)} holds {n_words} words per tap, but the input "
            f"has {C} channels in {groups} group(s): {Cg} per group needs {packed_length(Cg)} words"
        )
    if H + padding[0] + padding[1] < dilation[0] * (KH - 1) + 1 or W + padding[2] + padding[3] < dilation[1] * (KW - 1) + 1:
        raise ValueError(
            f"kernel {KH}x{KW} (dilation {list(dilation)}) is larger than the padded input "
            f"{H + padding[0] + padding[1]}x{W + padding[2] + padding[3]}"
        )
    if pad_value not in PAD_VALUES:
        raise ValueError(f"pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")
    for name, t in (("bias", bias), ("scale", scale)):
        if t is None:
            continue
        if t.dtype not in FLOAT_DTYPES or t.shape != (O,):
            raise ValueError(f"{name} must be a float tensor of shape ({O},) (one per output channel), "
                             f"got {t.dtype} {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"binary_conv2d {name} is on {t.device} but the input is on {x.device}")


def binary_conv2d_reference(x, weight, bias=None, scale=None, stride=(1, 1), padding=(0, 0, 0, 0),
                            dilation=(1, 1), groups=1, pad_value=0.0, binarize=True):
    """Pure-PyTorch ``bnnops::binary_conv2d`` (see the module docstring): F.conv2d in fp32 on the
    +-1 weight that ``weight``'s words hold, after padding with ``pad_value`` explicitly."""
    O, KH, KW, _ = weight.shape
    Cg = x.shape[1] // groups
    w = unpack_signs_reference(weight, Cg, torch.float32).permute(0, 3, 1, 2)
    a = torch.where(x < 0, -1.0, 1.0) if binarize else x.float()
    a = F.pad(a, (padding[2], padding[3], padding[0], padding[1]), value=pad_value)
    y = F.conv2d(a, w, None, stride, 0, dilation, groups)
    if scale is not None:
        y = y * scale.float().view(1, O, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, O, 1, 1)
    fmt = torch.channels_last if _output_is_channels_last(x) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


@torch.library.custom_op("bnnops::binary_conv2d", mutates_args=())
def _binary_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int, pad_value: float, binarize: bool,
) -> torch.Tensor:
    _check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value)
    return binary_conv2d_reference(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize)


@_binary_conv2d_op.register_kernel("cuda")
def _(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize):
    _check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value)
    return kernels.load("conv2d").conv2d(
        x, weight, bias=bias, scale=scale, stride=stride, padding=padding, dilation=dilation,
        groups=groups, pad_value=pad_value, binarize=binarize,
    )


@_binary_conv2d_op.register_fake
def _(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize):
    _check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value)
    fmt = torch.channels_last if _output_is_channels_last(x) else torch.contiguous_format
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
