"""The operand pass of the conv2d kernel: both GEMM operands of ``bnnops.kernels.conv2d``, one launch.

The implicit GEMM reads its operands in the dot's dtype, with no work left in its K loop: the input
as a channels-last copy with the padding written in, and the weight words unpacked to +-1. Either
done in the K loop costs 5-9x its instructions (SASS for sm_90, Triton 3.6: 87 a step per warp
against 435-780) and binarizing or unpacking there makes the wgmma synchronous (docs/design.md,
"Decisions"); here it is one memory-bound pass.

The input is float x (N, C, H, W), binarized or not, or x's sign words: int32 (N, H, W,
groups * ceil(Cg/32)) in the per-group channels-last layout of
:mod:`bnnops.kernels.saved_activations` (word g * ceil(Cg/32) + v of a pixel, bit j, holds channel
g * Cg + 32 v + j; bit 1 means -1). From words the pass reads 1 bit per input element instead of
16 or 32: a training forward that packs x once for its backward convolves those words and never
reads x again.
"""

import torch
import triton
import triton.language as tl

from bnnops.kernels import cdiv

# Elements of x per program (16 KB of bf16 read) and words of weight per program.
PREP_ELEMENTS = 8192
PREP_WORDS = 128


@triton.jit
def _prepare_kernel(
    x_ptr,
    a_ptr,
    words_ptr,
    w_ptr,
    P,
    C,
    H,
    W,
    HWp,
    Wp,
    pad_h,
    pad_w,
    pad_value,
    sxn,
    sxc,
    sxh,
    sxw,
    n_x_programs,
    n_words,
    Cg,
    words_per_group,
    BINARIZE: tl.constexpr,
    X_PACKED: tl.constexpr,
    X_CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    """Programs [0, n_x_programs): x (N, C, H, W), any strides -> a (N, Hp, Wp, C) contiguous in a's
    dtype: sign(x) as +-1 (BINARIZE, sign(0) = +1) or x, and pad_value on the border (pad_h above,
    pad_w left); a [BLOCK_P pixels, BLOCK_C channels] tile each, P = N*Hp*Wp. X_PACKED: x is sign
    words (N, H, W, groups * words_per_group) instead, strides sxn, sxh, sxw per pixel and sxc per
    word, channel c held by bit (c % Cg) % 32 of word (c // Cg) * words_per_group + (c % Cg) // 32
    (Cg and words_per_group are read only then). The rest: BLOCK_WORDS int32 words (of n_words)
    each -> w (n_words, 32) as +-1 in w's dtype, bit j of a word becoming element j (bit 1: -1)."""
    pid = tl.program_id(0)
    if pid < n_x_programs:
        n_c = tl.cdiv(C, BLOCK_C)
        # Pixel indices in int32 (P < 2**31), element offsets in int64 (int64 division is slow).
        p = (pid // n_c) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        hw = p % HWp
        h = hw // Wp - pad_h
        w = hw % Wp - pad_w
        inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        mask = (p < P)[:, None] & (c < C)[None, :]
        src = (p // HWp).to(tl.int64) * sxn + h * sxh + w * sxw
        if X_PACKED:
            # Each element loads its own word: the 32 channels of a word hit one cache line.
            c_in_group = c % Cg
            word = (c // Cg) * words_per_group + c_in_group // 32
            bits = tl.load(x_ptr + src[:, None] + word[None, :] * sxc, mask=mask & inside[:, None], other=0)
            x = 1 - 2 * ((bits >> (c_in_group % 32)[None, :]) & 1)
        elif X_CHANNELS_LAST:
            x = tl.load(x_ptr + src[:, None] + c[None, :] * sxc, mask=mask & inside[:, None], other=0)
        else:
            # NCHW: neighbouring pixels are neighbours in memory, so the load is [BLOCK_C, BLOCK_P]
            # (a warp reads along a row of the image), transposed on chip.
            x = tl.trans(
                tl.load(
                    x_ptr + src[None, :] + c[:, None] * sxc,
                    mask=(c < C)[:, None] & ((p < P) & inside)[None, :],
                    other=0,
                )
            )
        x = x.to(tl.float32)
        if BINARIZE:
            # Compare in fp32: exact for every float dtype (the interpreter has no bf16 arithmetic).
            x = tl.where(x < 0, -1.0, 1.0)
        v = tl.where(inside[:, None], x, pad_value)
        tl.store(a_ptr + p.to(tl.int64)[:, None] * C + c[None, :], v.to(a_ptr.dtype.element_ty), mask=mask)
    else:
        word = (pid - n_x_programs).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
        bit = tl.arange(0, 32)
        words = tl.load(words_ptr + word, mask=word < n_words, other=0)
        # Arithmetic shift keeps the sign of negative words; & 1 keeps only bit j; bit 1 means -1.
        # Through fp32: the interpreter converts int to 8-bit floats wrongly; free on the GPU.
        unpacked = (1 - 2 * ((words[:, None] >> bit[None, :]) & 1)).to(tl.float32)
        tl.store(
            w_ptr + word[:, None] * 32 + bit[None, :],
            unpacked.to(w_ptr.dtype.element_ty),
            mask=(word < n_words)[:, None],
        )


def prepare(
    x: torch.Tensor,
    words: torch.Tensor,
    dtype: torch.dtype,
    binarize: bool = True,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    pad_value: float = 0.0,
    channels: int | None = None,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two GEMM operands of ``conv2d`` in ``dtype``, written by one launch.

    Args:
        x: (N, C, H, W) float tensor, any strides (NCHW and channels_last are both read natively);
            or int32 sign words (N, H, W, groups * ceil(Cg/32)), any strides, Cg = C / groups (the
            module docstring's layout; binarize must be True), with C given as ``channels``.
        words: int32 (O, kh, kw, n) packed weight (``bnnops.packing`` layout), contiguous.
        dtype: the dot's operand dtype (``conv2d.DOT_DTYPES``): fp8 e4m3 or int8 for W1A1, fp32 for
            W1A16.
        binarize: write sign(x) as +-1 (sign(0) = +1) instead of x.
        padding: (top, bottom, left, right). pad_value: the value written on the border.
        channels, groups: for int32 x only: C, and the groups its words are laid out in.

    Returns:
        ``(a, w)``: a (N, H + top + bottom, W + left + right, C) contiguous, the padded input; w
        (O, kh, kw, 32 n) contiguous, the words unpacked to +-1: element [o, r, s, 32 v + j] is bit
        j of word [o, r, s, v] (padding bits become +1).
    """
    packed = x.dtype == torch.int32
    if packed:
        (N, H, W, _), C = x.shape, channels
        # Strides as the float path reads them: (n, c, h, w), c here per word.
        x_strides = (x.stride(0), x.stride(3), x.stride(1), x.stride(2))
        Cg = C // groups
    else:
        N, C, H, W = x.shape
        x_strides, Cg = x.stride(), 1
    pt, pb, pl, pr = padding
    Hp, Wp = H + pt + pb, W + pl + pr
    P, n_words = N * Hp * Wp, words.numel()
    a = torch.empty((N, Hp, Wp, C), dtype=dtype, device=x.device)
    w = torch.empty((*words.shape[:-1], 32 * words.shape[-1]), dtype=dtype, device=x.device)
    block_c = min(64, 1 << max(C - 1, 0).bit_length())
    block_p = PREP_ELEMENTS // block_c
    n_x = cdiv(P, block_p) * cdiv(C, block_c) if P * C else 0
    n_w = cdiv(n_words, PREP_WORDS)
    if n_x + n_w:
        _prepare_kernel[(n_x + n_w,)](
            x,
            a,
            words,
            w,
            P,
            C,
            H,
            W,
            Hp * Wp,
            Wp,
            pt,
            pl,
            float(pad_value),
            *x_strides,
            n_x,
            n_words,
            max(Cg, 1),
            cdiv(Cg, 32),
            BINARIZE=binarize,
            X_PACKED=packed,
            X_CHANNELS_LAST=not packed and x.stride(1) == 1,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            BLOCK_WORDS=PREP_WORDS,
            num_warps=8,
        )
    return a, w
