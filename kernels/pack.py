"""Triton kernels that pack float signs into int32 words and unpack words back to +-1.

Format (the contract of every bnnops kernel, see ``bnnops.packing``): along the last
dimension K, bit j of word w holds element 32*w + j; bit 1 means -1, bit 0 means +1 (so
sign(0) = +1, and NaN, for which ``x < 0`` is false, packs as +1); the padding bits of the last
word, for k >= K, are 0.

Tiling: both kernels see the tensor as a flat list of words (rows times ``words_per_row``) and give
each program BLOCK_WORDS consecutive words, that is a [BLOCK_WORDS, 32] tile of elements; grid
(cdiv(n_words, BLOCK_WORDS),). A row with few words (small K) then still fills whole programs, and
consecutive programs read and write consecutive memory.
"""

import torch
import triton
import triton.language as tl

from bnnops.kernels import cdiv

# 128 words = 4096 elements per program: 16 KB of fp32 read per program, enough bytes in
# flight per SM for a memory-bound pass without spilling the [128, 32] tile out of registers.
# One block size for both kernels and every GPU: no config table.
BLOCK_WORDS = 128


@triton.jit
def _pack_signs_kernel(x_ptr, words_ptr, n_words, K, words_per_row, BLOCK_WORDS: tl.constexpr):
    """x (rows, K) contiguous floats -> words (rows, words_per_row) contiguous int32, n_words in all."""
    word = tl.program_id(0).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    row = word // words_per_row
    bit = tl.arange(0, 32)
    k = (word % words_per_row)[:, None] * 32 + bit[None, :]
    mask = (word[:, None] < n_words) & (k < K)
    # Masked elements (the padding k >= K) read as 0.0, which packs to bit 0 as required.
    x = tl.load(x_ptr + row[:, None] * K + k, mask=mask, other=0.0)
    # The 32 shifted bits are distinct powers of two, so their sum is their OR; bit 31 makes
    # the int32 word negative, which is the intended two's-complement bit pattern.
    # Compare in fp32: exact for every input dtype, and the interpreter has no bf16 arithmetic.
    bits = (x.to(tl.float32) < 0).to(tl.int32) << bit[None, :]
    tl.store(words_ptr + word, tl.sum(bits, axis=1), mask=word < n_words)


@triton.jit
def _unpack_signs_kernel(words_ptr, out_ptr, n_words, K, words_per_row, BLOCK_WORDS: tl.constexpr):
    """words (rows, words_per_row) contiguous int32 -> out (rows, K) contiguous, +-1 in out's dtype."""
    word = tl.program_id(0).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    row = word // words_per_row
    bit = tl.arange(0, 32)
    k = (word % words_per_row)[:, None] * 32 + bit[None, :]
    mask = (word[:, None] < n_words) & (k < K)
    w = tl.load(words_ptr + word, mask=word < n_words, other=0)
    # Arithmetic shift keeps the sign of negative words; the & 1 keeps only bit j.
    b = (w[:, None] >> bit[None, :]) & 1
    # Through fp32: the interpreter converts int to bf16 wrongly; on the GPU it costs nothing.
    values = (1 - 2 * b).to(tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row[:, None] * K + k, values, mask=mask)


def pack_signs(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack the signs of ``x`` (..., K), any float dtype, into int32 words (..., ceil(K/32)).

    Writes into ``out`` (contiguous int32, (..., ceil(K/32))) when given, else allocates. A
    non-contiguous ``x`` is copied to contiguous first. No input checks: ``bnnops.pack_signs``
    validates.
    """
    K = x.shape[-1]
    words = out if out is not None else x.new_empty(*x.shape[:-1], cdiv(K, 32), dtype=torch.int32)
    if words.numel() == 0:
        return words
    x = x.contiguous()
    grid = (cdiv(words.numel(), BLOCK_WORDS),)
    _pack_signs_kernel[grid](x, words, words.numel(), K, words.shape[-1], BLOCK_WORDS=BLOCK_WORDS)
    return words


def unpack_signs(words: torch.Tensor, K: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack int32 words (..., ceil(K/32)) into a +-1 tensor (..., K) of ``dtype``.

    Writes into ``out`` (contiguous, (..., K), ``dtype``) when given, else allocates. Padding
    bits (k >= K) are ignored. A non-contiguous ``words`` is copied to contiguous first.
    """
    out = out if out is not None else words.new_empty(*words.shape[:-1], K, dtype=dtype)
    if out.numel() == 0:
        return out
    words = words.contiguous()
    grid = (cdiv(words.numel(), BLOCK_WORDS),)
    _unpack_signs_kernel[grid](words, out, words.numel(), K, words.shape[-1], BLOCK_WORDS=BLOCK_WORDS)
    return out
