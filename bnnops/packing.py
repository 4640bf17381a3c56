"""The bit-packing format, its pure-PyTorch reference, and the ``bnnops::pack_signs`` /
``bnnops::unpack_signs`` ops.

Format of a packed tensor (every bnnops kernel and reference reads and writes this):

- Signs are packed along the last dimension K, 32 per int32 word: a float tensor of shape
  (..., K) becomes int32 words of shape (..., ceil(K / 32)), and bit j of word w,
  ``(word >> j) & 1``, holds element 32*w + j. Bit 31 is the int32 sign bit, so a word whose
  element 32*w + 31 is negative is a negative int32 (two's complement).
- Bit 1 means -1 and bit 0 means +1, so all-zero words are all +1 and sign(0) = +1 for both
  +0.0 and -0.0 (larq's convention). +inf packs as +1, -inf as -1.
- A bit cannot hold NaN. The ops are sync-free and pack NaN as +1 (``x < 0`` is false for NaN);
  the public :func:`pack_signs` refuses NaN with a ValueError instead, and
  :meth:`bnnops.BinaryTensor.from_float` refuses any non-finite value.
- K is padded up to a multiple of 32 and the padding bits are 0; kernels mask k >= K, so the
  padding never changes a result.

Layout of a packed *weight* (``bnnops.BinaryTensor``): the packed dimension is the reduction
dimension, which is dim 1 of a PyTorch weight: ``in_features`` of a linear weight (out, in) and
``in_channels / groups`` of a conv weight (out, in/groups, *kernel). The words are stored with
that dimension moved last::

    linear weight (N, K)                -> words (N, ceil(K/32))
    conv2d weight (O, C/groups, kh, kw) -> words (O, kh, kw, ceil((C/groups)/32))
    any weight (d0, d1, d2, ...)        -> words (d0, d2, ..., ceil(d1/32))
    rank-1 weight (K,)                  -> words (ceil(K/32),)

so for conv, word [o, r, s, w] bit j holds weight[o, 32*w + j, r, s]: each kernel tap (r, s)
holds whole words of input channels, which lines up with a channels-last input and lets an
implicit-GEMM kernel walk the reduction tap by tap, channel word by channel word.
:func:`pack_weight` and :func:`unpack_weight` convert between a logical float weight and its
words; :func:`packed_weight_shape` gives the words' shape.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bnnops import kernels
from bnnops.ops.library import FLOAT_DTYPES, define

__all__ = [
    "pack_bits",
    "pack_signs",
    "pack_signs_reference",
    "pack_weight",
    "packed_length",
    "packed_weight_shape",
    "unpack_signs",
    "unpack_signs_reference",
    "unpack_weight",
]


def packed_length(K: int) -> int:
    """Number of int32 words that hold K signs: ceil(K / 32)."""
    return (K + 31) // 32


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (..., K) into int32 words (..., ceil(K/32)): bit j of word w is
    ``bits[..., 32*w + j]``, padding bits 0. Pure PyTorch, any device (the format's packing of a
    mask: :func:`pack_signs_reference` is ``pack_bits(x < 0)``)."""
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.bool:
        raise TypeError(
            f"pack_bits takes a bool tensor, got {bits.dtype if isinstance(bits, torch.Tensor) else type(bits).__name__}"
        )
    if bits.dim() == 0:
        raise ValueError("pack_bits needs at least one dimension (the packed one), got a scalar")
    K = bits.shape[-1]
    n_words = packed_length(K)
    # Pad and reshape the bools (1 byte each) before widening to int32 for the shifts.
    bits = F.pad(bits, (0, 32 * n_words - K)).reshape(*bits.shape[:-1], n_words, 32)
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    # Distinct powers of two: the int32 sum is their OR (bit 31 wraps to the sign bit).
    return (bits.to(torch.int32) << shifts).sum(-1, dtype=torch.int32)


def pack_signs_reference(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch packing of ``x`` (..., K), float, into int32 words (..., ceil(K/32))."""
    return pack_bits(x < 0)


# (dtype, device) -> the (256, 8) table whose row b holds the +-1 values of the 8 bits of byte b.
_BYTE_SIGNS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _byte_signs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    table = _BYTE_SIGNS.get((dtype, device))
    if table is None:
        bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
        table = (1 - 2 * bits).to(dtype)
        # Cached only from real calls: not a FakeTensor of a trace (export, make_fx), and not while
        # torch.compile traces (it cannot mutate a global inside an autograd function's backward).
        if type(table) is torch.Tensor and not torch.compiler.is_compiling():
            _BYTE_SIGNS[(dtype, device)] = table
    return table


def unpack_signs_reference(words: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Pure-PyTorch unpacking of int32 words (..., ceil(K/32)) into +-1 (..., K) of ``dtype``.

    One table lookup per byte (byte i of a word holds elements 8i .. 8i + 7, bit j element 8i + j):
    about 4x faster on a CPU than one shift per bit, and the CPU path of every op unpacks weights.
    """
    byte_shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=words.device)
    byte_values = (words.unsqueeze(-1) >> byte_shifts) & 0xFF  # (..., n, 4), arithmetic shift masked
    values = F.embedding(byte_values, _byte_signs(dtype, words.device))  # (..., n, 4, 8)
    return values.flatten(-3)[..., :K].contiguous()


def _check_floats(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (the packed one), got a scalar")


def _check_words(words: torch.Tensor, K: int, dtype: torch.dtype) -> None:
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32:
        got = words.dtype if isinstance(words, torch.Tensor) else type(words).__name__
        raise TypeError(f"packed words must be an int32 tensor, got {got}")
    if words.dim() == 0:
        raise ValueError("packed words must have at least one dimension, got a scalar")
    if K < 0 or words.shape[-1] != packed_length(K):
        raise ValueError(
            f"packed words of last size {words.shape[-1]} cannot hold K={K} signs "
            f"(need ceil(K/32) = {packed_length(K)} words)"
        )
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"unpack dtype must be float32, bfloat16 or float16, got {dtype}")


def _pack_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed_length(x.shape[-1]), dtype=torch.int32)


define(
    "pack_signs(Tensor x) -> Tensor",
    check=lambda x: _check_floats(x, "pack_signs input"),
    reference=pack_signs_reference,
    cuda=lambda x: kernels.load("pack").pack_signs(x),
    fake=_pack_fake,
)
define(
    "unpack_signs(Tensor words, SymInt K, ScalarType dtype) -> Tensor",
    check=_check_words,
    reference=unpack_signs_reference,
    cuda=lambda words, K, dtype: kernels.load("pack").unpack_signs(words, K, dtype),
    fake=lambda words, K, dtype: words.new_empty(*words.shape[:-1], K, dtype=dtype),
)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of a float tensor into int32 words.

    Args:
        x: float32, bfloat16 or float16 tensor of shape (..., K), any strides, CPU or CUDA.

    Returns:
        int32 tensor of shape (..., ceil(K/32)) on x's device, in the format of this module:
        bit j of word w is 1 where x[..., 32*w + j] < 0 (sign(0) = +1), padding bits 0.

    Raises:
        TypeError for a non-float dtype, ValueError for a scalar or for NaN in ``x`` (a bit
        cannot hold NaN; the raw op ``torch.ops.bnnops.pack_signs`` skips this check, which costs
        one device sync, and packs NaN as +1).
    """
    _check_floats(x, "pack_signs input")
    if torch.isnan(x).any():
        raise ValueError("pack_signs input holds NaN, which has no sign to pack")
    return torch.ops.bnnops.pack_signs(x)


def unpack_signs(words: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack int32 words (..., ceil(K/32)) into a +-1 tensor (..., K) of ``dtype``.

    The inverse of :func:`pack_signs` up to the sign: ``unpack_signs(pack_signs(x), K)`` is
    ``where(x < 0, -1, +1)``. Padding bits are ignored.
    """
    return torch.ops.bnnops.unpack_signs(words, K, dtype)


def packed_weight_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the words that hold a weight of logical ``shape`` (see the layout above)."""
    if len(shape) == 1:
        return (packed_length(shape[0]),)
    return (shape[0], *shape[2:], packed_length(shape[1]))


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """Words of a logical float weight (bit 1 where w < 0), or of a bool mask of its shape (bit 1
    where True), packed along dim 1 (see the layout above).

    (N, K) -> (N, ceil(K/32)); (O, C, *kernel) -> (O, *kernel, ceil(C/32)); (K,) -> (ceil(K/32),).
    """
    if w.dim() >= 2:
        w = w.movedim(1, -1)
    return pack_bits(w) if w.dtype == torch.bool else torch.ops.bnnops.pack_signs(w)


def unpack_weight(
    words: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """The dense +-1 weight of logical ``shape`` held by ``words`` (inverse of pack_weight), contiguous
    in ``memory_format``: ``torch.contiguous_format``, or for a 4-D conv weight ``torch.channels_last``,
    which costs no copy (the words are in channels-last order)."""
    K = shape[1] if len(shape) >= 2 else shape[0]
    dense = torch.ops.bnnops.unpack_signs(words, K, dtype)
    if len(shape) >= 2:
        dense = dense.movedim(-1, 1).contiguous(memory_format=memory_format)
        if memory_format == torch.contiguous_format:
            # With size-1 dims (a 1x1 kernel) the moved view is already "contiguous" but keeps
            # channels-last strides, which torch then reads as channels_last (cuDNN would convert
            # an NCHW input and gradient to match): the standard strides, same memory.
            strides = [1] * len(shape)
            for i in range(len(shape) - 2, -1, -1):
                strides[i] = strides[i + 1] * shape[i + 1]
            dense = dense.as_strided(dense.shape, strides)
    return dense
