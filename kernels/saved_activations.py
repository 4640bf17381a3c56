"""The saved input of a binary layer with the ``ste_sign`` quantizer, packed in one pass over x.

A layer that keeps only what its backward needs saves two bits per input element instead of x:
``sign_words`` (bit 1 where x < 0, the ``bnnops.packing`` format) for the weight gradient, and
``mask_words`` (bit 1 where |x| <= clip, the straight-through estimator's pass mask) for the input
gradient. Both are packed along the reduction dimension, like the weight:

- linear x (..., K) -> int32 (..., ceil(K/32)) each (:func:`pack_sign_and_mask`);
- conv x (N, C, H, W) -> int32 (N, H, W, groups * ceil(Cg/32)) each, Cg = C / groups, every group
  starting a new word, as the weight's in_channels/groups do (:func:`pack_sign_and_mask_conv`).

The comparison |x| <= clip is made in x's dtype, as ``SteSign`` makes it (torch rounds the Python
clip to x's dtype): the launchers round clip to x's dtype and the kernel compares in fp32, where
both sides are exact. NaN gives sign bit 0 (+1) and mask bit 0. Padding bits are 0 in both.
References: :mod:`bnnops.ops.backward_reference`. :func:`unpack_bits` is how the backward kernels
(:mod:`bnnops.kernels.linear_backward`, :mod:`bnnops.kernels.conv2d_backward`) read mask words.
"""

import functools

import torch
import triton
import triton.language as tl

from bnnops.kernels import next_power_of_2
from bnnops.kernels.gemm_tiles import replicate

# Elements per program: 4096 (16 KB of fp32 read), as the pack kernel of bnnops.kernels.pack.
PACK_ELEMENTS = 4096


@triton.jit
def _pack_sign_and_mask_kernel(
    x_ptr,
    sign_ptr,
    mask_ptr,
    P,
    HW,
    W,
    Cg,
    words_per_group,
    words_per_pixel,
    sxn,
    sxc,
    sxh,
    sxw,
    clip,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    """x (N, C, H, W) with strides sxn, sxc, sxh, sxw -> sign and mask words (P, words_per_pixel)
    contiguous, P = N*H*W pixels (n, h, w) in that order, word g * words_per_group + v of a pixel
    holding channels g * Cg + 32 v + j. A [BLOCK_P pixels, BLOCK_WORDS words] tile per program;
    grid (cdiv(P, BLOCK_P), cdiv(words_per_pixel, BLOCK_WORDS)).

    CHANNELS_LAST (sxc == 1): the tile is [pixel, word, bit], bits of a word consecutive in memory
    and in a thread; else (NCHW) [word, bit, pixel], so that neighbouring threads read neighbouring
    pixels of a channel.
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    word = tl.program_id(1) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    bit = tl.arange(0, 32)
    group = word // words_per_group
    c_in_group = (word % words_per_group)[:, None] * 32 + bit[None, :]
    channel_ok = (c_in_group < Cg) & (word < words_per_pixel)[:, None]
    channel = (group[:, None] * Cg + c_in_group) * sxc
    hw = p % HW
    pixel = (p // HW).to(tl.int64) * sxn + (hw // W) * sxh + (hw % W) * sxw
    p_ok = p < P
    if CHANNELS_LAST:
        ok = p_ok[:, None, None] & channel_ok[None, :, :]
        ptrs = x_ptr + pixel[:, None, None] + channel[None, :, :]
        shifts = bit[None, None, :]
        BIT_AXIS: tl.constexpr = 2
    else:
        ok = channel_ok[:, :, None] & p_ok[None, None, :]
        ptrs = x_ptr + channel[:, :, None] + pixel[None, None, :]
        shifts = bit[None, :, None]
        BIT_AXIS: tl.constexpr = 1
    # Compare in fp32: exact for every float dtype (and the interpreter has no bf16 arithmetic).
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    # Distinct powers of two: their sum is their OR (bit 31 wraps to the sign bit, as intended).
    sign_bits = tl.sum((x < 0).to(tl.int32) << shifts, axis=BIT_AXIS)
    # Masked elements read 0.0, which passes |x| <= clip: ``ok`` keeps the padding bits 0.
    mask_bits = tl.sum(((tl.abs(x) <= clip) & ok).to(tl.int32) << shifts, axis=BIT_AXIS)
    if CHANNELS_LAST:
        out = p.to(tl.int64)[:, None] * words_per_pixel + word[None, :]
        out_ok = p_ok[:, None] & (word < words_per_pixel)[None, :]
    else:
        out = p.to(tl.int64)[None, :] * words_per_pixel + word[:, None]
        out_ok = p_ok[None, :] & (word < words_per_pixel)[:, None]
    tl.store(sign_ptr + out, sign_bits, mask=out_ok)
    tl.store(mask_ptr + out, mask_bits, mask=out_ok)


@triton.jit
def unpack_bits(words, R: tl.constexpr, TILE_WORDS: tl.constexpr):
    """int32 words [R, TILE_WORDS] -> their bits [R, 32 * TILE_WORDS] as int32 0 / 1, column
    32 w + j being bit j of word w (each word's copies stay in the thread that loaded it): how the
    backward kernels read mask words."""
    w = tl.reshape(replicate(words, 5), (R, TILE_WORDS, 32))
    bits = (w >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (R, TILE_WORDS * 32))


@functools.lru_cache
def _clip_in_dtype(clip_value: float, dtype: torch.dtype) -> float:
    """clip rounded to ``dtype``, as torch rounds a Python scalar compared with a tensor of it."""
    return torch.tensor(clip_value, dtype=dtype).item()


def _launch(x4, sign_words, mask_words, Cg, words_per_group, clip_value):
    N, _, H, W = x4.shape
    P = N * H * W
    words_per_pixel = sign_words.shape[-1]
    if P == 0 or words_per_pixel == 0:
        return
    block_words = min(next_power_of_2(words_per_pixel), 4)
    block_p = PACK_ELEMENTS // (32 * block_words)
    grid = (-(-P // block_p), -(-words_per_pixel // block_words))
    _pack_sign_and_mask_kernel[grid](
        x4,
        sign_words,
        mask_words,
        P,
        H * W,
        W,
        Cg,
        words_per_group,
        words_per_pixel,
        *x4.stride(),
        _clip_in_dtype(float(clip_value), x4.dtype),
        CHANNELS_LAST=x4.stride(1) == 1,
        BLOCK_P=block_p,
        BLOCK_WORDS=block_words,
    )


def _outputs(shape, device, out):
    if out is None:
        return torch.empty(shape, dtype=torch.int32, device=device), torch.empty(
            shape, dtype=torch.int32, device=device
        )
    for words in out:
        if tuple(words.shape) != tuple(shape) or words.dtype != torch.int32 or not words.is_contiguous():
            raise ValueError(
                f"out must hold two contiguous int32 tensors of shape {tuple(shape)}, got {words.dtype} {tuple(words.shape)}"
            )
    return out


def pack_sign_and_mask(
    x: torch.Tensor, clip_value: float, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved input of a binary linear layer: (sign_words, mask_words), each int32
    (..., ceil(K/32)) contiguous, from x (..., K) float32 / bfloat16 / float16, any strides.

    Bit 1 of sign_words where x < 0; bit 1 of mask_words where |x| <= clip_value (in x's dtype).
    ``out``: the two word tensors to write instead (contiguous). No checks of x (the layer
    validates it).

    Raises:
        ValueError: ``out`` of the wrong shape, dtype or layout.
    """
    K = x.shape[-1]
    rows = x.reshape(x.shape[:-1].numel(), K)
    shape = (*x.shape[:-1], -(-K // 32))
    sign_words, mask_words = _outputs(shape, x.device, out)
    # (M, K) is the channels-last batch (M, K, 1, 1) of one-pixel images.
    x4 = rows.as_strided((rows.shape[0], K, 1, 1), (rows.stride(0), rows.stride(1), 1, 1))
    _launch(x4, sign_words, mask_words, K, shape[-1], clip_value)
    return sign_words, mask_words


def pack_sign_and_mask_conv(
    x: torch.Tensor, clip_value: float, groups: int = 1, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The saved input of a binary conv: (sign_words, mask_words), each int32
    (N, H, W, groups * ceil(Cg/32)) contiguous, Cg = C / groups, from x (N, C, H, W) float32 /
    bfloat16 / float16, any strides (NCHW and channels_last read in place).

    Word [n, h, w, g * ceil(Cg/32) + v] bit j is channel g * Cg + 32 v + j. ``out``: the two word
    tensors to write instead (contiguous). No checks of x (the layer validates it; groups must
    divide C).

    Raises:
        ValueError: ``out`` of the wrong shape, dtype or layout.
    """
    N, C, H, W = x.shape
    Cg = C // groups
    words_per_group = -(-Cg // 32)
    shape = (N, H, W, groups * words_per_group)
    sign_words, mask_words = _outputs(shape, x.device, out)
    _launch(x, sign_words, mask_words, Cg, words_per_group, clip_value)
    return sign_words, mask_words
