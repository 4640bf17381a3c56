"""The sign-emitting ops of folded inference: ``bnnops::binary_linear_w1a1_sign``,
``binary_linear_w1a16_sign``, ``binary_conv2d_sign``.

Each computes a binary layer's pre-activation v, as the op of the same layer does
(:mod:`bnnops.ops.linear`, :mod:`bnnops.ops.conv`), and instead of writing v writes the next
layer's input: per output channel o, the bit

    neg[o] = (v[o] < threshold[o]) XOR flip[o]        (bit 1 means -1, as in :mod:`bnnops.packing`)

packed along the channel dimension, 32 channels per int32 word, padding bits 0.
:func:`bnnops.folding.fold_for_inference` derives threshold and flip from a batch norm and the
next layer's sign so that the bits equal sign(BN(v)).

- ``binary_linear_w1a1_sign(x, weight, K, threshold, flip)``: v = sign(x) W^T, the exact integer
  sum (x float (..., K), binarized x < 0 -> -1, or int32 words (..., ceil(K/32))); threshold int32
  (N,). Output int32 (..., ceil(N/32)).
- ``binary_linear_w1a16_sign(x, weight, scale, bias, threshold, flip)``: v = x W^T * scale + bias
  computed in fp32 and rounded to x's dtype (as ``binary_linear_w1a16``'s output), compared with
  threshold (N,) of x's dtype. Output int32 (..., ceil(N/32)).
- ``binary_conv2d_sign(x, weight, channels, bias, scale, stride, padding, dilation, groups,
  pad_value, binarize, threshold, flip, out_groups)``: v = ``binary_conv2d``'s output (same
  arguments) for a float threshold of x's dtype (v rounded to x's dtype); for an int32 threshold v
  is the fp32 sum before rounding (with ``binarize`` and no scale / bias: the exact integer). x is
  float (N, C, H, W), C = ``channels``, or int32 sign words (N, H, W, groups * ceil((C/groups)/32))
  as ``binary_conv2d_packed`` reads them (``binarize`` must be True; the threshold then int32,
  compared in fp32, or float32). Output int32
  (N, OH, OW, out_groups * ceil((O/out_groups)/32)): each of ``out_groups`` channel groups starts
  a new word, the per-group channels-last layout of saved conv inputs
  (:mod:`bnnops.ops.backward_reference`), which a conv with ``groups = out_groups`` reads.

flip is a bool (N,) / (O,) tensor. Bad input raises :class:`~bnnops.ops.checks.DtypeError`,
:class:`~bnnops.ops.checks.ShapeError` or :class:`~bnnops.ops.checks.DeviceError` on every path.
CPU tensors run the references below; CUDA tensors the Triton kernels with a sign epilogue that
compares and packs in registers (``bnnops.kernels.gemm.w1a1_sign`` / ``w1a16_sign``,
``bnnops.kernels.conv2d.conv2d(..., signs=...)``), except a conv whose reader groups its ragged
channels differently from the conv's own groups, which runs the reference on the GPU.
"""

import torch

import bnnops.ops.conv as conv_ops
import bnnops.ops.linear as linear_ops
from bnnops import kernels
from bnnops.ops.backward_reference import unpack_conv_words
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError, type_name
from bnnops.ops.library import contiguous, define
from bnnops.ops.linear import rows
from bnnops.ops.reference import binary_conv2d_reference, w1a1_reference, w1a16_reference
from bnnops.packing import pack_bits, packed_length

__all__ = ["negative_bits", "pack_channel_groups"]


def negative_bits(v: torch.Tensor, threshold: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The bool ``(v < threshold) XOR flip`` of v (..., C) per channel (the last dimension); an int32
    threshold is compared in fp32, where it and an integer v are exact (|values| < 2^24)."""
    t = threshold.float() if threshold.dtype == torch.int32 else threshold
    return (v.to(t.dtype) < t) ^ flip


def pack_channel_groups(bits: torch.Tensor, groups: int) -> torch.Tensor:
    """Pack bool (..., C) as int32 words (..., groups * ceil((C/groups)/32)): each group of C/groups
    channels starts a new word (padding bits 0)."""
    C = bits.shape[-1]
    grouped = bits.reshape(*bits.shape[:-1], groups, C // groups)
    return pack_bits(grouped).flatten(-2)


def _check_threshold(threshold, flip, n, device, dtype, what):
    if not isinstance(threshold, torch.Tensor) or threshold.dtype != dtype:
        raise DtypeError(f"threshold must be a {dtype} tensor ({what}), got {type_name(threshold)}")
    if not isinstance(flip, torch.Tensor) or flip.dtype != torch.bool:
        raise DtypeError(f"flip must be a bool tensor, got {type_name(flip)}")
    for name, v in (("threshold", threshold), ("flip", flip)):
        if v.shape != (n,):
            raise ShapeError(f"{name} must have shape ({n},), one value per output channel, got {tuple(v.shape)}")
        if v.device != device:
            raise DeviceError(f"{name} is on {v.device} but the input is on {device}")


def _w1a1_sign_check(x, weight, K, threshold, flip):
    linear_ops._w1a1_check(x, weight, K, None, None, torch.float32)
    _check_threshold(threshold, flip, weight.shape[0], x.device, torch.int32, "integer sums")


def _w1a16_sign_check(x, weight, scale, bias, threshold, flip):
    linear_ops._w1a16_check(x, weight, scale, bias)
    _check_threshold(threshold, flip, weight.shape[0], x.device, x.dtype, "the input's dtype")


def _conv_sign_check(
    x,
    weight,
    channels,
    bias,
    scale,
    stride,
    padding,
    dilation,
    groups,
    pad_value,
    binarize,
    threshold,
    flip,
    out_groups,
):
    packed = isinstance(x, torch.Tensor) and x.dtype == torch.int32
    if packed:
        if not binarize:
            raise ValueError("binary_conv2d_sign reads packed sign words only as W1A1 (binarize=True)")
        args = (bias, scale, stride, padding, dilation, groups, pad_value, False, torch.float32)
        conv_ops._check_packed(x, weight, channels, *args)
    else:
        conv_ops._check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize)
        if channels != x.shape[1]:
            raise ShapeError(f"channels={channels} but the input has {x.shape[1]}")
    integer = isinstance(threshold, torch.Tensor) and threshold.dtype == torch.int32
    real = torch.float32 if packed else x.dtype
    _check_threshold(threshold, flip, weight.shape[0], x.device, torch.int32 if integer else real, "int32 or v's dtype")
    if out_groups < 1 or weight.shape[0] % out_groups:
        raise ShapeError(f"out_groups={out_groups} must be >= 1 and divide the output channels ({weight.shape[0]})")


def w1a1_sign_reference(x, weight, K, threshold, flip):
    """``bnnops::binary_linear_w1a1_sign`` in pure PyTorch (module docstring)."""
    return pack_bits(negative_bits(w1a1_reference(x, weight, K), threshold, flip))


def w1a16_sign_reference(x, weight, scale, bias, threshold, flip):
    """``bnnops::binary_linear_w1a16_sign`` in pure PyTorch (module docstring)."""
    return pack_bits(negative_bits(w1a16_reference(x, weight, scale, bias), threshold, flip))


def conv2d_sign_reference(
    x,
    weight,
    channels,
    bias,
    scale,
    stride,
    padding,
    dilation,
    groups,
    pad_value,
    binarize,
    threshold,
    flip,
    out_groups,
):
    """``bnnops::binary_conv2d_sign`` in pure PyTorch (module docstring)."""
    if x.dtype == torch.int32:
        x = unpack_conv_words(x, channels, groups, torch.float32)
    out_dtype = torch.float32 if threshold.dtype == torch.int32 else x.dtype
    v = binary_conv2d_reference(
        x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize, out_dtype
    )
    return pack_channel_groups(negative_bits(v.permute(0, 2, 3, 1), threshold, flip), out_groups)


def _w1a1_sign_cuda(x, weight, K, threshold, flip):
    words = kernels.load("gemm").w1a1_sign(rows(x), weight.contiguous(), K, threshold.contiguous(), flip.contiguous())
    return words.reshape(*x.shape[:-1], words.shape[-1])


def _w1a16_sign_cuda(x, weight, scale, bias, threshold, flip):
    words = kernels.load("gemm").w1a16_sign(
        rows(x),
        weight.contiguous(),
        threshold.contiguous(),
        flip.contiguous(),
        scale=contiguous(scale),
        bias=contiguous(bias),
    )
    return words.reshape(*x.shape[:-1], words.shape[-1])


def _conv_sign_cuda(
    x,
    weight,
    channels,
    bias,
    scale,
    stride,
    padding,
    dilation,
    groups,
    pad_value,
    binarize,
    threshold,
    flip,
    out_groups,
):
    O = weight.shape[0]
    if out_groups != groups and ((O // groups) % 32 or (O // out_groups) % 32):
        # The kernel starts a word at each of its own groups; another grouping of ragged channel
        # counts packs differently: the reference's packing (torch ops, on the GPU too).
        args = (stride, padding, dilation, groups, pad_value, binarize, threshold, flip, out_groups)
        return conv2d_sign_reference(x, weight, channels, bias, scale, *args)
    real = torch.float32 if x.dtype == torch.int32 or threshold.dtype == torch.int32 else x.dtype
    geometry = (stride, padding, dilation, groups, pad_value)
    return conv_ops.launch(
        x,
        weight,
        bias,
        scale,
        *geometry,
        binarize=binarize,
        channels=channels if x.dtype == torch.int32 else None,
        signs=(threshold.contiguous(), flip.contiguous(), real),
    )


def _linear_sign_fake(x, weight, *args):
    return x.new_empty(*x.shape[:-1], packed_length(weight.shape[0]), dtype=torch.int32)


def _conv_sign_fake(
    x,
    weight,
    channels,
    bias,
    scale,
    stride,
    padding,
    dilation,
    groups,
    pad_value,
    binarize,
    threshold,
    flip,
    out_groups,
):
    x_shape = (x.shape[0], channels, *x.shape[1:3]) if x.dtype == torch.int32 else x.shape
    N, O, OH, OW = conv_ops.output_shape(x_shape, weight.shape, stride, padding, dilation)
    return x.new_empty(N, OH, OW, out_groups * packed_length(O // out_groups), dtype=torch.int32)


define(
    "binary_linear_w1a1_sign(Tensor x, Tensor weight, SymInt K, Tensor threshold, Tensor flip) -> Tensor",
    check=_w1a1_sign_check,
    reference=w1a1_sign_reference,
    cuda=_w1a1_sign_cuda,
    fake=_linear_sign_fake,
)
define(
    "binary_linear_w1a16_sign(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, Tensor threshold, Tensor flip) "
    "-> Tensor",
    check=_w1a16_sign_check,
    reference=w1a16_sign_reference,
    cuda=_w1a16_sign_cuda,
    fake=_linear_sign_fake,
)
define(
    "binary_conv2d_sign(Tensor x, Tensor weight, SymInt channels, Tensor? bias, Tensor? scale, int[] stride, int[] padding, "
    "int[] dilation, int groups, float pad_value, bool binarize, Tensor threshold, Tensor flip, int out_groups) "
    "-> Tensor",
    check=_conv_sign_check,
    reference=conv2d_sign_reference,
    cuda=_conv_sign_cuda,
    fake=_conv_sign_fake,
)
