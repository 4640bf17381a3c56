"""Pure-PyTorch references of the backward launchers of :mod:`bnnops.kernels.linear_backward`,
:mod:`bnnops.kernels.conv2d_backward` and :mod:`bnnops.kernels.saved_activations`: what the Triton
kernels are tested against, and the CPU path of a binary layer that saves its input packed.

Saved input of a layer with the ``ste_sign`` input quantizer (clip value ``clip``): two int32 word
tensors in the :mod:`bnnops.packing` format, packed along the reduction dimension like the weight:

- ``sign_words``: bit 1 where x < 0 (sign(x) = -1; sign(0) = +1, NaN packs as +1);
- ``mask_words``: bit 1 where |x| <= clip, the straight-through estimator's pass mask, compared in
  x's dtype as ``SteSign`` does (clip is rounded to x's dtype first; NaN never passes).

Layouts: linear x (..., K) -> (..., ceil(K/32)). Conv x (N, C, H, W) -> channels-last words
(N, H, W, groups * ceil(Cg/32)), Cg = C / groups: each group's channels start a new word, as a
conv weight's in_channels/groups do, so word [n, h, w, g * ceil(Cg/32) + v] bit j holds channel
g * Cg + 32 v + j. Padding bits (past K or Cg) are 0 in both.

Each reference computes in fp32 (CPU autocast off: :func:`bnnops.ops.reference.without_cpu_autocast`)
and rounds once to the output dtype.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bnnops.ops.reference import without_cpu_autocast
from bnnops.packing import (
    array,
    float_array,
    negative,
    pack_bits,
    packed_length,
    unpack_bits,
    unpack_signs_reference,
)
from bnnops.weight_cache import dense_signs

__all__ = [
    "conv2d_grad_input_reference",
    "conv2d_grad_weight_reference",
    "conv2d_grads_reference",
    "linear_grad_input_reference",
    "linear_grad_weight_reference",
    "pack_conv_bits",
    "pack_sign_and_mask_conv_reference",
    "pack_sign_and_mask_reference",
    "pass_mask",
    "sign_and_mask_bits",
    "unpack_conv_words",
]


def pass_mask(x: torch.Tensor, clip_value: float) -> torch.Tensor:
    """``|x| <= clip_value`` compared in x's dtype (bool, x's shape): the pass-mask bits."""
    values = float_array(x)
    if values is None:
        return x.abs() <= clip_value
    out = torch.empty(x.shape, dtype=torch.bool)
    np.less_equal(np.abs(values), _rounded(clip_value, values.dtype), out=array(out))
    return out


def _rounded(clip_value: float, dtype: np.dtype) -> np.generic:
    """``clip_value`` in NumPy ``dtype`` (float32 or float16), rounded as torch rounds a Python number
    compared with a tensor of that dtype: to float32 first, then to the dtype (a float16 threshold
    rounds twice), to nearest; past the largest finite value, to inf, without NumPy's warning."""
    if abs(clip_value) <= 65504:  # finite in both: no overflow to silence
        return dtype.type(np.float32(clip_value))
    with np.errstate(over="ignore"):
        return dtype.type(np.float32(clip_value))


def sign_and_mask_bits(x: torch.Tensor, clip_value: float) -> torch.Tensor:
    """bool (2, *x.shape): [0] the sign bits (x < 0), [1] the pass-mask bits (|x| <= clip_value, in
    x's dtype), to pack together."""
    values = float_array(x)
    if values is not None:
        out = torch.empty((2, *x.shape), dtype=torch.bool)
        bits = array(out)
        np.less(values, 0, out=bits[0])
        np.less_equal(np.abs(values), _rounded(clip_value, values.dtype), out=bits[1])
        return out
    return torch.stack((negative(x), pass_mask(x, clip_value)))


def pack_sign_and_mask_reference(x: torch.Tensor, clip_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign_words, mask_words) of a linear layer's input x (..., K) float: int32 (..., ceil(K/32))
    each, packed together (one pack of both bit sets)."""
    words = pack_bits(sign_and_mask_bits(x, clip_value))
    return words[0], words[1]


def pack_conv_bits(bits: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group channels-last words (..., N, H, W, groups * ceil(Cg/32)) of bools (..., N, C, H, W),
    any strides (module docstring)."""
    *lead, C, H, W = bits.shape
    grouped = bits.movedim(-3, -1).reshape(*lead, H, W, groups, C // groups)
    return pack_bits(grouped).reshape(*lead, H, W, groups * packed_length(C // groups))


def pack_sign_and_mask_conv_reference(
    x: torch.Tensor, clip_value: float, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign_words, mask_words) of a conv input x (N, C, H, W) float, any strides: int32
    (N, H, W, groups * ceil(Cg/32)) each, per-group words (module docstring), packed together."""
    words = pack_conv_bits(sign_and_mask_bits(x, clip_value), groups)
    return words[0], words[1]


def unpack_conv_words(words: torch.Tensor, channels: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group channels-last words (N, H, W, groups * ceil(Cg/32)) -> +-1 (N, C, H, W) of ``dtype``
    (a channels_last view); C = ``channels``. Bit 1 gives -1; for ``dtype`` torch.bool, True."""
    N, H, W, _ = words.shape
    Cg = channels // groups
    grouped = words.reshape(N, H, W, groups, packed_length(Cg))
    values = unpack_bits(grouped, Cg) if dtype == torch.bool else unpack_signs_reference(grouped, Cg, dtype)
    return values.reshape(N, H, W, channels).permute(0, 3, 1, 2)


@without_cpu_autocast
def linear_grad_weight_reference(
    grad_out: torch.Tensor, sign_words: torch.Tensor, K: int, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """grad_W (N, K) = grad_out^T (N, M) @ sign(x) (M, K), x given as sign_words (M, ceil(K/32)); in
    ``out_dtype`` (None: grad_out's dtype)."""
    y = grad_out.float().T @ unpack_signs_reference(sign_words, K, torch.float32)
    return y.to(out_dtype or grad_out.dtype)


@without_cpu_autocast
def linear_grad_input_reference(
    grad_out: torch.Tensor, words: torch.Tensor, mask_words: torch.Tensor | None, K: int
) -> torch.Tensor:
    """grad_x (M, K) = (grad_out (M, N) @ W (N, K)) where the mask bit is 1, else 0 (a select: a
    blocked position is 0 even where the product is inf or NaN); W as words (N, ceil(K/32)), the
    mask as mask_words (M, ceil(K/32)) or None (no mask). In grad_out's dtype."""
    y = grad_out.float() @ dense_signs(words, K)
    if mask_words is not None:
        y = torch.where(unpack_bits(mask_words, K), y, 0.0)
    return y.to(grad_out.dtype)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@without_cpu_autocast
def conv2d_grad_weight_reference(
    grad_out: torch.Tensor,
    sign_words: torch.Tensor,
    weight_shape: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    pad_value: float = 0.0,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """grad_W (O, Cg, kh, kw) of a binary conv from the saved sign(x).

    grad_W[o, c, r, s] = sum_{n, p, q} grad_out[n, o, p, q] * P[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw],
    P the +-1 input padded (top, bottom, left, right) with ``pad_value`` (0: padded positions add
    nothing; +-1: they add +-grad_out). grad_out (N, O, OH, OW), any strides; sign_words (N, H, W,
    groups * ceil(Cg/32)). Dense, in ``out_dtype`` (None: grad_out's dtype), channels_last when
    ``channels_last``.
    """
    O, Cg = weight_shape[:2]
    a = _padded_signs(sign_words, Cg * groups, groups, padding, pad_value)
    if Cg == 0 or O == 0 or grad_out.numel() == 0:
        y = grad_out.new_zeros(tuple(weight_shape), dtype=torch.float32)
    else:
        y = torch.nn.grad.conv2d_weight(a, tuple(weight_shape), grad_out.float(), stride, 0, dilation, groups)
    return y.to(out_dtype or grad_out.dtype).contiguous(memory_format=_memory_format(channels_last))


@without_cpu_autocast
def conv2d_grad_input_reference(
    grad_out: torch.Tensor,
    words: torch.Tensor,
    mask_words: torch.Tensor | None,
    input_shape: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """grad_x (N, C, H, W) of a binary conv: the transposed convolution of grad_out (N, O, OH, OW)
    with the +-1 weight held by ``words`` (O, kh, kw, ceil(Cg/32)), restricted to the unpadded
    input (padded positions get no gradient), then 0 where the mask bit is 0 (``mask_words``
    (N, H, W, groups * ceil(Cg/32)), or None: no mask). In ``out_dtype`` (None: grad_out's dtype),
    channels_last when ``channels_last``."""
    N, C, H, W = input_shape
    O = words.shape[0]
    pt, pb, pl, pr = padding
    Cg = C // groups
    if Cg == 0 or O == 0 or grad_out.numel() == 0:
        y = grad_out.new_zeros(tuple(input_shape), dtype=torch.float32)
    else:
        w = dense_signs(words, Cg).permute(0, 3, 1, 2)
        padded_shape = (N, C, H + pt + pb, W + pl + pr)
        y = torch.nn.grad.conv2d_input(padded_shape, w, grad_out.float(), stride, 0, dilation, groups)
        y = _unpadded_and_masked(y, input_shape, padding, mask_words, groups)
    return y.to(out_dtype or grad_out.dtype).contiguous(memory_format=_memory_format(channels_last))


def _padded_signs(
    sign_words: torch.Tensor, channels: int, groups: int, padding: Sequence[int], pad_value: float
) -> torch.Tensor:
    """The fp32 +-1 input (N, C, H + top + bottom, W + left + right) the sign words hold, padded with ``pad_value``."""
    a = unpack_conv_words(sign_words, channels, groups, torch.float32)
    return F.pad(a, (padding[2], padding[3], padding[0], padding[1]), value=pad_value)


def _unpadded_and_masked(
    y: torch.Tensor, input_shape: Sequence[int], padding: Sequence[int], mask_words: torch.Tensor | None, groups: int
) -> torch.Tensor:
    """The gradient y of the padded input restricted to the input (N, C, H, W), 0 where the mask bit is 0."""
    _, C, H, W = input_shape
    y = y[:, :, padding[0] : padding[0] + H, padding[2] : padding[2] + W]
    if mask_words is not None:
        y = torch.where(unpack_conv_words(mask_words, C, groups, torch.bool), y, 0.0)
    return y


@without_cpu_autocast
def conv2d_grads_reference(
    grad_out: torch.Tensor,
    words: torch.Tensor,
    sign_words: torch.Tensor,
    mask_words: torch.Tensor | None,
    input_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    pad_value: float,
    input_dtype: torch.dtype,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_W) of a binary conv by one ``aten.convolution_backward`` (both products at the
    cost of about one call's host work): :func:`conv2d_grad_input_reference` (``out_dtype``
    ``input_dtype``) and :func:`conv2d_grad_weight_reference` (grad_out's dtype), the same bits.
    Arguments as theirs; the weight's shape (O, C / groups, kh, kw) comes from ``words``."""
    C = input_shape[1]
    O, KH, KW, _ = words.shape
    Cg = C // groups
    if Cg == 0 or O == 0 or grad_out.numel() == 0:
        options = (stride, padding, dilation, groups)
        return (
            conv2d_grad_input_reference(grad_out, words, mask_words, input_shape, *options, input_dtype, channels_last),
            conv2d_grad_weight_reference(
                grad_out, sign_words, (O, Cg, KH, KW), *options, pad_value, None, channels_last
            ),
        )
    a = _padded_signs(sign_words, C, groups, padding, pad_value)
    w = dense_signs(words, Cg).permute(0, 3, 1, 2)
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out.float(), a, w, None, list(stride), [0, 0], list(dilation), False, [0, 0], groups, [True, True, False]
    )
    grad_x = _unpadded_and_masked(grad_a, input_shape, padding, mask_words, groups)
    fmt = _memory_format(channels_last)
    return grad_x.to(input_dtype).contiguous(memory_format=fmt), grad_w.to(grad_out.dtype).contiguous(memory_format=fmt)
