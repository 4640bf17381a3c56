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

Each reference computes in fp32 and rounds once to the output dtype.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bnnops.packing import pack_bits, packed_length, unpack_signs_reference

__all__ = [
    "conv2d_grad_input_reference",
    "conv2d_grad_weight_reference",
    "linear_grad_input_reference",
    "linear_grad_weight_reference",
    "pack_sign_and_mask_conv_reference",
    "pack_sign_and_mask_reference",
    "unpack_conv_words",
]


def pack_sign_and_mask_reference(x: torch.Tensor, clip_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign_words, mask_words) of a linear layer's input x (..., K) float: int32 (..., ceil(K/32)) each."""
    return pack_bits(x < 0), pack_bits(x.abs() <= clip_value)


def pack_sign_and_mask_conv_reference(
    x: torch.Tensor, clip_value: float, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign_words, mask_words) of a conv input x (N, C, H, W) float, any strides: int32
    (N, H, W, groups * ceil(Cg/32)) each, per-group words (module docstring)."""
    N, C, H, W = x.shape
    grouped = x.permute(0, 2, 3, 1).reshape(N, H, W, groups, C // groups)
    words_per_pixel = groups * packed_length(C // groups)
    sign_words = pack_bits(grouped < 0).reshape(N, H, W, words_per_pixel)
    mask_words = pack_bits(grouped.abs() <= clip_value).reshape(N, H, W, words_per_pixel)
    return sign_words, mask_words


def unpack_conv_words(words: torch.Tensor, channels: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-group channels-last words (N, H, W, groups * ceil(Cg/32)) -> +-1 (N, C, H, W) of ``dtype``
    (a channels_last view); C = ``channels``. Bit 1 gives -1."""
    N, H, W, _ = words.shape
    Cg = channels // groups
    values = unpack_signs_reference(words.reshape(N, H, W, groups, packed_length(Cg)), Cg, dtype)
    return values.reshape(N, H, W, channels).permute(0, 3, 1, 2)


def linear_grad_weight_reference(
    grad_out: torch.Tensor, sign_words: torch.Tensor, K: int, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """grad_W (N, K) = grad_out^T (N, M) @ sign(x) (M, K), x given as sign_words (M, ceil(K/32)); in
    ``out_dtype`` (None: grad_out's dtype)."""
    y = grad_out.float().T @ unpack_signs_reference(sign_words, K, torch.float32)
    return y.to(out_dtype or grad_out.dtype)


def linear_grad_input_reference(
    grad_out: torch.Tensor, words: torch.Tensor, mask_words: torch.Tensor | None, K: int
) -> torch.Tensor:
    """grad_x (M, K) = (grad_out (M, N) @ W (N, K)) where the mask bit is 1, else 0 (a select: a
    blocked position is 0 even where the product is inf or NaN); W as words (N, ceil(K/32)), the
    mask as mask_words (M, ceil(K/32)) or None (no mask). In grad_out's dtype."""
    y = grad_out.float() @ unpack_signs_reference(words, K, torch.float32)
    if mask_words is not None:
        y = torch.where(unpack_signs_reference(mask_words, K, torch.float32) < 0, y, 0.0)
    return y.to(grad_out.dtype)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


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
    a = unpack_conv_words(sign_words, Cg * groups, groups, torch.float32)
    a = F.pad(a, (padding[2], padding[3], padding[0], padding[1]), value=pad_value)
    if Cg == 0 or O == 0 or grad_out.numel() == 0:
        y = grad_out.new_zeros(tuple(weight_shape), dtype=torch.float32)
    else:
        y = torch.nn.grad.conv2d_weight(a, tuple(weight_shape), grad_out.float(), stride, 0, dilation, groups)
    return y.to(out_dtype or grad_out.dtype).contiguous(memory_format=_memory_format(channels_last))


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
        w = unpack_signs_reference(words, Cg, torch.float32).permute(0, 3, 1, 2)
        padded_shape = (N, C, H + pt + pb, W + pl + pr)
        y = torch.nn.grad.conv2d_input(padded_shape, w, grad_out.float(), stride, 0, dilation, groups)
        y = y[:, :, pt : pt + H, pl : pl + W]
    if mask_words is not None:
        y = torch.where(unpack_conv_words(mask_words, C, groups, torch.float32) < 0, y, 0.0)
    return y.to(out_dtype or grad_out.dtype).contiguous(memory_format=_memory_format(channels_last))
