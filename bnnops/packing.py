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

import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bnnops import kernels
from bnnops.ops.library import FLOAT_DTYPES, call, define, unwatched

__all__ = [
    "pack_bits",
    "pack_signs",
    "pack_signs_reference",
    "pack_weight",
    "packed_length",
    "packed_weight_shape",
    "unpack_bits",
    "unpack_signs",
    "unpack_signs_reference",
    "unpack_weight",
]


def packed_length(K: int) -> int:
    """Number of int32 words that hold K signs: ceil(K / 32)."""
    return (K + 31) // 32


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (..., K) into int32 words (..., ceil(K/32)): bit j of word w is
    ``bits[..., 32*w + j]``, padding bits 0. Any device: torch ops, or NumPy for a large plain CPU
    tensor (:func:`_on_numpy`); the format's packing of a mask (:func:`pack_signs_reference` is
    ``pack_bits(x < 0)``)."""
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.bool:
        raise TypeError(
            f"pack_bits takes a bool tensor, got {bits.dtype if isinstance(bits, torch.Tensor) else type(bits).__name__}"
        )
    if bits.dim() == 0:
        raise ValueError("pack_bits needs at least one dimension (the packed one), got a scalar")
    K = bits.shape[-1]
    n_words = packed_length(K)
    if _on_numpy(bits):
        return _pack_array(array(bits))
    # Pad (a ragged K only) and reshape the bools (1 byte each) before widening them.
    padding = 32 * n_words - K
    if padding:
        bits = F.pad(bits, (0, padding))
    if _byte_views(bits) and bits.numel():
        # Each 8 bools (bytes 0/1) times (1, 2, ..., 128): one byte of the word, a uint8 matmul (the
        # sum of distinct powers of two is at most 255); 4 bytes in element order are the int32 word
        # on a little-endian host. A third of the host time of the shifts below on a tiny tensor.
        byte_values = bits.contiguous().view(torch.uint8).reshape(*bits.shape[:-1], 4 * n_words, 8)
        return torch.matmul(byte_values, _bit_values(bits)).view(torch.int32)
    bits = bits.reshape(*bits.shape[:-1], n_words, 32)
    # Distinct powers of two: the int32 sum is their OR (bit 31 wraps to the sign bit).
    return (bits.to(torch.int32) << _shifts(1, bits)).sum(-1, dtype=torch.int32)


def unpack_bits(words: torch.Tensor, K: int) -> torch.Tensor:
    """The bool tensor (..., K) held by int32 ``words`` (..., ceil(K/32)): the inverse of
    :func:`pack_bits` (True where the bit is 1; padding bits dropped).

    Raises:
        ValueError: K < 0 or more than the words hold (32 a word).
    """
    held = 32 * words.shape[-1]
    if not 0 <= K <= held:
        raise ValueError(f"unpack_bits: {words.shape[-1]} words a row hold at most {held} bits, not K={K}")
    return _unpack_bytes(words, K, _byte_bits(words))


def pack_signs_reference(x: torch.Tensor) -> torch.Tensor:
    """Packing of ``x`` (..., K), float, into int32 words (..., ceil(K/32)): the reference of the
    ``pack_signs`` op (torch ops, or NumPy for a large plain CPU tensor)."""
    return pack_bits(negative(x))


def negative(x: torch.Tensor) -> torch.Tensor:
    """``x < 0`` (bool, x's shape): the bits of the format (1 where x < 0; NaN, +-0.0 give 0)."""
    values = float_array(x)
    if values is None:
        return x < 0
    out = torch.empty(x.shape, dtype=torch.bool)
    np.less(values, 0, out=array(out))
    return out


def sign_values(x: torch.Tensor) -> torch.Tensor:
    """fp32 -1 where ``x < 0``, else +1 (x's shape and memory layout): the +-1 values a packed x
    stands for, as the references multiply them. A torch op on every route: the product that reads
    it ran slower on a NumPy-made operand (conv 1x32x8x8: 75 against 54 us a call, dev CPU)."""
    return torch.where(x < 0, -1.0, 1.0)


def float_array(x: torch.Tensor) -> np.ndarray | None:
    """x's values as a NumPy array (no copy) when the CPU path computes x's bits in NumPy: a
    float32 or float16 tensor that :func:`_on_numpy` accepts; else None (compute them in torch)."""
    if x.dtype in _NUMPY_FLOATS and _on_numpy(x):
        return array(x)
    return None


# NumPy compares and packs on plain CPU tensors of at least _NUMPY_MIN_ELEMENTS elements: the sign and
# mask words there are about 1.2x (16K elements), 1.7-2x (64K), 3x (256K) and 4x (1M) faster than
# torch's CPU compare and pack (2-core AMD EPYC, torch 2.13 CPU, NumPy 2.4: the words of a (4096, 64)
# fp32 x 290 against 844 us), while below 16K the views in and out (DLPack, about 3 us each) cost
# more than they save (256 elements: 60 against 44 us). Unpacking stays in torch (its table lookup
# was as fast or faster at every size). Results are written into tensors torch allocated. Floats
# NumPy holds:
_NUMPY_FLOATS = (torch.float32, torch.float16)
_NUMPY_MIN_ELEMENTS = 16384


def array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of the CPU tensor ``t``'s memory (no copy; writes go to ``t``), through DLPack:
    ``Tensor.numpy()`` would mark ``t``'s storage as never resizable again, a side effect on the
    caller's tensors (and on the results returned)."""
    return np.from_dlpack(t.detach())


def _on_numpy(t: torch.Tensor) -> bool:
    """Whether the compares and the pack of ``t`` run in NumPy: a plain CPU tensor (not a subclass
    such as a FakeTensor, not functorch-wrapped, no lazy negation or conjugation) of at least
    :data:`_NUMPY_MIN_ELEMENTS` elements on
    a little-endian host (the bytes of an int32 word in element order), with nothing watching the
    torch calls (:func:`bnnops.ops.library.unwatched`: a trace, mode or profiler sees the torch
    route's ops instead of a constant)."""
    return (
        _LITTLE_ENDIAN
        and type(t) is torch.Tensor
        and t.numel() >= _NUMPY_MIN_ELEMENTS
        and not t.is_neg()  # a lazily negated view (e.g. z.conj().imag): DLPack would hand over the
        and not t.is_conj()  # stored values, not the ones the tensor stands for
        and t.is_cpu
        and unwatched()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _pack_array(bits: np.ndarray) -> torch.Tensor:
    """int32 words (..., ceil(K/32)) of a bool array (..., K), any strides, padding bits 0."""
    n_words = packed_length(bits.shape[-1])
    if bits.size == 0:
        return torch.zeros((*bits.shape[:-1], n_words), dtype=torch.int32)
    words = torch.empty((*bits.shape[:-1], n_words), dtype=torch.int32)
    byte_values = array(words).view(np.uint8)  # (..., 4 n_words): the words' bytes in element order
    packed = np.packbits(bits, axis=-1, bitorder="little")  # (..., ceil(K/8)), the last byte zero-padded
    byte_values[..., : packed.shape[-1]] = packed
    byte_values[..., packed.shape[-1] :] = 0
    return words


# Small constant tables, made once per key. _BYTE_SIGNS: (dtype, device) -> the (256, 8) table whose
# row b holds the +-1 values of the 8 bits of byte b (dtype bool: the bits themselves). _SHIFTS:
# (bits per step, device) -> int32 shifts, arange(32) for packing bits and (0, 8, 16, 24) for
# unpacking bytes; step 0: the uint8 bit values (1, 2, ..., 128).
_BYTE_SIGNS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(tables: dict, key: tuple, make: Callable[[], torch.Tensor], operand: torch.Tensor) -> torch.Tensor:
    """``tables[key]``, made by ``make`` on first use. Only calls on a plain tensor ``operand``
    read or fill it: a trace's FakeTensors (export, make_fx) get a table of their own mode, and
    real calls never get a fake one. Nothing is stored while torch.compile traces (it cannot
    mutate a global inside an autograd function's backward)."""
    if type(operand) is not torch.Tensor:
        return make()
    table = tables.get(key)
    if table is None:
        table = make()
        if type(table) is torch.Tensor and not torch.compiler.is_compiling():
            tables[key] = table
    return table


def _byte_signs(dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    device = words.device

    def make():
        bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
        return (1 - 2 * bits).to(dtype)

    return _table(_BYTE_SIGNS, (dtype, device), make, words)


def _byte_bits(words: torch.Tensor) -> torch.Tensor:
    """The (256, 8) bool table whose row b holds the 8 bits of byte b, low bit first."""
    device = words.device

    def make():
        return ((torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1).bool()

    return _table(_BYTE_SIGNS, (torch.bool, device), make, words)


def _bit_values(operand: torch.Tensor) -> torch.Tensor:
    """uint8 (1, 2, 4, ..., 128): the value of each bit of a byte, low bit first."""
    device = operand.device
    return _table(
        _SHIFTS,
        (0, device),
        lambda: torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device),
        operand,
    )


def _byte_views(t: torch.Tensor) -> bool:
    """Whether packing and unpacking may read ``t``'s bytes through a dtype-changing view: a plain
    CPU tensor on a little-endian host, outside torch.compile (no such view in its graph)."""
    return _LITTLE_ENDIAN and not torch.compiler.is_compiling() and type(t) is torch.Tensor and t.is_cpu


def _shifts(step: int, operand: torch.Tensor) -> torch.Tensor:
    device = operand.device
    return _table(_SHIFTS, (step, device), lambda: torch.arange(0, 32, step, dtype=torch.int32, device=device), operand)


_LITTLE_ENDIAN = sys.byteorder == "little"


def unpack_signs_reference(words: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Pure-PyTorch unpacking of int32 words (..., ceil(K/32)) into +-1 (..., K) of ``dtype``.

    One table lookup per byte (byte i of a word holds elements 8i .. 8i + 7, bit j element 8i + j):
    about 4x faster than one shift per bit, and the CPU path of every op unpacks weights.
    """
    return _unpack_bytes(words, K, _byte_signs(dtype, words))


def _unpack_bytes(words: torch.Tensor, K: int, table: torch.Tensor) -> torch.Tensor:
    """``table``'s row for each byte of ``words`` (..., n), in element order: (..., K) of table's dtype."""
    if _LITTLE_ENDIAN and not torch.compiler.is_compiling():
        # The words' own bytes, in element order on a little-endian host: (..., 4n). Half the host
        # time of shifting them out on a tiny tensor (one op instead of three); torch.compile
        # traces the shifts (no dtype-changing view in its graph).
        values = F.embedding(words.contiguous().view(torch.uint8).int(), table).flatten(-2)  # (..., 4n * 8)
    else:
        byte_values = (words.unsqueeze(-1) >> _shifts(8, words)) & 0xFF  # (..., n, 4), shift masked
        values = F.embedding(byte_values, table).flatten(-3)  # (..., n * 4 * 8)
    return values if values.shape[-1] == K else values[..., :K].contiguous()


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
    return pack_bits(w) if w.dtype == torch.bool else call(torch.ops.bnnops.pack_signs.default, w)


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
