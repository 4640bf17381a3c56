"""The modules of a folded inference model (:func:`bnnops.fold_for_inference` builds them).

Between two binary layers a folded model carries packed sign words, never real values:

- linear activations: int32 words (N, ceil(C/32)), bit j of word w holds channel 32w + j;
- conv activations: int32 words (N, H, W, groups * ceil((C/groups)/32)), channels-last, each of the
  reading conv's ``groups`` starting a new word (the layout of :mod:`bnnops.ops.backward_reference`).

Bit 1 means -1, padding bits are 0 (:mod:`bnnops.packing`).

- :class:`FoldedBinaryLinear`, :class:`FoldedBinaryConv2d`: a binary layer with packed weight
  words that reads real or packed input and writes either packed sign words (``threshold`` set:
  the ops of :mod:`bnnops.ops.threshold`, batch norm and sign folded in) or its real output (the
  layer's op, for a consumer that needs real values: the last layer's batch norm, a shortcut).
- :class:`PackedMaxPool2d`: ``nn.MaxPool2d`` of the real values followed by a monotone per-channel
  threshold, computed on the words: a window's AND where the threshold's bit is 1 below it, OR
  where it is 1 above it.
- :class:`PackedFlatten`: ``nn.Flatten`` of conv words into linear words.

Inference only: the buffers are not parameters and nothing has a gradient.
"""

import torch
from torch import nn

import bnnops.ops.conv
import bnnops.ops.linear
import bnnops.ops.threshold  # noqa: F401  (defines the sign-emitting ops)
from bnnops.ops.checks import DtypeError, ShapeError
from bnnops.packing import pack_bits, packed_length, unpack_bits

__all__ = ["FoldedBinaryConv2d", "FoldedBinaryLinear", "PackedFlatten", "PackedMaxPool2d"]


def _check_words(x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if x.dtype != torch.int32:
        raise DtypeError(f"{what} takes int32 packed sign words, got {x.dtype}")
    if tuple(x.shape[1:]) != shape:
        raise ShapeError(f"{what} expects words of shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")


class _Folded(nn.Module):
    """What both folded layers hold: packed ``words``, ``scale`` and ``bias`` (or None), the dtype of
    the real values (``dtype``), input kind, and ``threshold`` / ``flip`` (None: real output).

    The thresholds were derived for ``dtype`` (and the float buffers' dtypes), so a dtype change
    (``.half()``, ``.to(torch.bfloat16)``, ...) raises DtypeError before changing the layer (modules
    of the model that the cast reached before it are cast already: fold again from the unfolded
    model); moving to another device is fine.
    """

    def __init__(self, words, bias, dtype, packed_input, binarize, threshold, flip, scale=None):
        super().__init__()
        self.register_buffer("words", words)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("threshold", threshold)
        self.register_buffer("flip", flip)
        self.dtype, self.packed_input, self.binarize = dtype, packed_input, binarize

    def _apply(self, fn, recurse=True):
        # Probe fn on empty tensors of the layer's dtypes first, so a refused call changes nothing.
        device = self.words.device
        for dtype in {self.dtype} | {b.dtype for b in self.buffers() if b.is_floating_point()}:
            probe = fn(torch.empty(0, dtype=dtype, device=device))
            if probe.dtype != dtype:
                raise DtypeError(
                    f"{type(self).__name__} was folded for {dtype} and cannot be cast to {probe.dtype}: its "
                    f"thresholds hold for the folding dtype only; fold after the final .to(dtype)"
                )
        return super()._apply(fn, recurse)


class FoldedBinaryLinear(_Folded):
    """A binary linear layer of a folded model.

    Args:
        words: int32 (out_features, ceil(in_features/32)), the packed +-1 weight.
        in_features: K.
        bias: (out_features,) float or None.
        dtype: the dtype of real input and real output.
        packed_input: the input is int32 words (N, ceil(K/32)) (else float (N, K) of ``dtype``).
        binarize: W1A1 (packed input, or float input binarized); False: W1A16 on real input.
        threshold, flip: (out_features,) int32 (W1A1: integer sums; scale and bias folded in) or
            ``dtype`` (W1A16: v after scale and bias, rounded to ``dtype``), and bool: the output is
            int32 words (N, ceil(out_features/32)) of ``(v < threshold) XOR flip``. None: the
            output is the layer's real (N, out_features).
        scale: (out_features,) float or None, the per-channel scale of a ``bnnops.scaled`` layer
            (None with an int32 threshold, which holds it).
    """

    def __init__(self, words, in_features, bias, dtype, packed_input, binarize, threshold=None, flip=None, scale=None):
        super().__init__(words, bias, dtype, packed_input, binarize, threshold, flip, scale)
        self.in_features, self.out_features = in_features, words.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_input:
            _check_words(x, (packed_length(self.in_features),), "FoldedBinaryLinear")
        ops = torch.ops.bnnops
        if self.threshold is None:
            if self.binarize:
                return ops.binary_linear_w1a1(x, self.words, self.in_features, self.scale, self.bias, self.dtype)
            return ops.binary_linear_w1a16(x, self.words, self.scale, self.bias, self.dtype)
        if self.binarize:
            return ops.binary_linear_w1a1_sign(x, self.words, self.in_features, self.threshold, self.flip)
        return ops.binary_linear_w1a16_sign(x, self.words, self.scale, self.bias, self.threshold, self.flip)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, packed_input={self.packed_input}, "
            f"binarize={self.binarize}, packed_output={self.threshold is not None}"
        )


class FoldedBinaryConv2d(_Folded):
    """A binary 2-D convolution of a folded model.

    Args:
        words: int32 (O, kh, kw, ceil((C/groups)/32)), the packed +-1 weight.
        in_channels: C.
        stride, padding, dilation, groups, pad_value: the op's (padding as (top, bottom, left, right)).
        bias, dtype, packed_input, binarize, scale: as :class:`FoldedBinaryLinear`; packed input is
            words (N, H, W, groups * ceil((C/groups)/32)).
        threshold, flip: as :class:`FoldedBinaryLinear`; the output is int32 words
            (N, OH, OW, out_groups * ceil((O/out_groups)/32)). None: the real (N, O, OH, OW).
        out_groups: the groups of the conv that reads the words (1 for a linear after a flatten).

    Packed input is read by the ops as words (``binary_conv2d_sign``, ``binary_conv2d_packed``); a
    real output from packed input is channels_last.
    """

    def __init__(
        self,
        words,
        in_channels,
        stride,
        padding,
        dilation,
        groups,
        pad_value,
        bias,
        dtype,
        packed_input,
        binarize,
        threshold=None,
        flip=None,
        out_groups=1,
        scale=None,
    ):
        super().__init__(words, bias, dtype, packed_input, binarize, threshold, flip, scale)
        self.in_channels, self.out_channels = in_channels, words.shape[0]
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups, self.pad_value, self.out_groups = groups, float(pad_value), out_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geometry = (self.stride, self.padding, self.dilation, self.groups, self.pad_value)
        ops = torch.ops.bnnops
        if self.threshold is not None:
            return ops.binary_conv2d_sign(
                x,
                self.words,
                self.in_channels,
                self.bias,
                self.scale,
                *geometry,
                self.binarize,
                self.threshold,
                self.flip,
                self.out_groups,
            )
        if self.packed_input:
            return ops.binary_conv2d_packed(
                x, self.words, self.in_channels, self.bias, self.scale, *geometry, True, self.dtype
            )
        return ops.binary_conv2d(x, self.words, self.bias, self.scale, *geometry, self.binarize, self.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.words.shape[1:3])}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"packed_input={self.packed_input}, binarize={self.binarize}, packed_output={self.threshold is not None}"
        )


class PackedMaxPool2d(nn.Module):
    """Max pooling on conv words (N, H, W, words): per channel the AND of a window's bits where
    ``and_mask``'s bit is 1, else the OR; out (N, OH, OW, words) with ``nn.MaxPool2d``'s output
    size for the same arguments (ceil_mode included).

    Why it is exact: the words hold ``neg(y)`` of the real values y that the unfolded model pools,
    with neg monotone per channel. Where neg is true below a threshold, neg(max y) holds when
    every neg(y) does (AND); where it is true above one, when any does (OR). Padding positions
    (torch pads with -inf, never the max) take the word ``and_mask``: all ones for AND channels,
    zeros for OR channels, neither changes a window; padding bits stay 0 (OR of zeros).
    """

    def __init__(self, and_mask, kernel_size, stride, padding, dilation, ceil_mode):
        super().__init__()
        self.register_buffer("and_mask", and_mask)
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode

    def _out_size(self, size: int, i: int) -> int:
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        span = size + 2 * p - d * (k - 1) - 1
        out = (span + (s - 1 if self.ceil_mode else 0)) // s + 1
        if self.ceil_mode and (out - 1) * s >= size + p:
            out -= 1  # torch's rule: the last window starts inside the input or its left padding
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.int32:
            raise DtypeError(f"PackedMaxPool2d takes int32 packed sign words, got {x.dtype}")
        if x.dim() != 4 or x.shape[-1] != self.and_mask.shape[0]:
            raise ShapeError(
                f"PackedMaxPool2d expects int32 words (N, H, W, {self.and_mask.shape[0]}), got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        N, H, W, words = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        OH, OW = self._out_size(H, 0), self._out_size(W, 1)
        bottom = max(0, (OH - 1) * sh + dh * (kh - 1) + 1 - H - ph)
        right = max(0, (OW - 1) * sw + dw * (kw - 1) + 1 - W - pw)
        padded = self.and_mask.expand(N, H + ph + bottom, W + pw + right, words).clone()
        padded[:, ph : ph + H, pw : pw + W] = x
        all_neg = any_neg = None
        for r in range(kh):
            for c in range(kw):
                tap = padded[:, r * dh : r * dh + (OH - 1) * sh + 1 : sh, c * dw : c * dw + (OW - 1) * sw + 1 : sw]
                all_neg = tap if all_neg is None else all_neg & tap
                any_neg = tap if any_neg is None else any_neg | tap
        return (all_neg & self.and_mask) | (any_neg & ~self.and_mask)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


class PackedFlatten(nn.Module):
    """``nn.Flatten`` of conv words (N, H, W, ceil(C/32)) into linear words.

    ``repack=False`` (C a multiple of 32): the words themselves, (N, H * W * C/32), bits in
    (h, w, c) order; the folder permutes the reading linear layer's weight columns to that order.
    ``repack=True``: the bits in nn.Flatten's (c, h, w) order, packed again: (N, ceil(C*H*W/32)).
    """

    def __init__(self, channels: int, repack: bool):
        super().__init__()
        self.channels, self.repack = channels, repack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.int32:
            raise DtypeError(f"PackedFlatten takes int32 packed sign words, got {x.dtype}")
        if x.dim() != 4 or x.shape[-1] != packed_length(self.channels):
            raise ShapeError(
                f"PackedFlatten expects int32 words (N, H, W, {packed_length(self.channels)}), got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        if not self.repack:
            return x.flatten(1)
        bits = unpack_bits(x, self.channels).permute(0, 3, 1, 2)
        return pack_bits(bits.flatten(1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, repack={self.repack}"
