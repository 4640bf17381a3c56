"""Shared ``@triton.jit`` building blocks of the binary GEMM kernels (:mod:`bnnops.kernels.gemm_tensor_core`,
:mod:`bnnops.kernels.gemv`): unpacking words into +-1 tiles, loads, the tensor-core dot, the
epilogue and the store, and the kernel that finishes a split-K product.

Words follow the ``bnnops.packing`` format: int32, bit j of word w is column 32*w + j of its row,
bit 1 is -1 and bit 0 is +1; the bits of a row's last word past K are padding (zero by the format,
masked by the kernels wherever they could count). :func:`store_signs` is the epilogue of a layer
whose batch norm and sign are folded in: it writes packed sign words instead of y;
:func:`pass_masked` is grad_input's: y is 0 where a packed pass mask (the straight-through
estimator's, same bit layout) is 0, applied where y is stored, so the mask costs no pass over y.
"""

import torch
import triton
import triton.language as tl

# The Triton type of each float torch dtype (a sign epilogue's ROUND_T).
TRITON_FLOAT_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# What x holds (the kernels' X_MODE): real values, floats to binarize, or packed sign words.
X_REAL, X_SIGN, X_PACKED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def replicate(w, LOG2: tl.constexpr):
    """[..., C] -> [..., C, 2, ..., 2] (LOG2 new dims of 2): copies that stay in the same thread.

    ``tl.join`` puts its new dimension in registers, so every copy of a word lives in the thread
    that loaded it: the unpack needs no cross-thread traffic and every shift is an immediate
    (Triton's default layout would spread a word's 32 bits over 32 lanes).
    """
    for _ in tl.static_range(LOG2):
        w = tl.join(w, w)
    return w


@triton.jit
def unpack_tile(words, R: tl.constexpr, TILE_WORDS: tl.constexpr, DTYPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """int32 words [R, TILE_WORDS] -> +-1 values [R, 32 * TILE_WORDS] of DTYPE (int8, bf16, fp16, fp32).

    Natural order: column 32*w + j is bit j of word w. INTERLEAVED (not float32): with L values per
    32-bit lane (4 for int8, 2 for 16-bit), column 32*w + L*j + i is bit j + (32/L)*i, a permutation
    of K that costs fewer instructions per value (int8: shift, mask, multiply-add for four values;
    16-bit: mask, shift, or for two); the other operand of the dot must be permuted alike
    (:func:`load_interleaved`), which leaves the dot product unchanged.
    """
    w = words.to(tl.uint32, bitcast=True)
    if tl.float32 == DTYPE:
        w = tl.reshape(replicate(w, 5), (R, TILE_WORDS, 32))
        j = tl.arange(0, 32)[None, None, :]
        values = (((w << (31 - j)) & 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)
    elif tl.int8 == DTYPE:
        # Four values per 32-bit lane, one per byte: first bytes of 0 or 1 ...
        w = tl.reshape(replicate(w, 3), (R, TILE_WORDS, 8))
        g = tl.arange(0, 8)[None, None, :]
        if INTERLEAVED:
            bits = (w >> g) & 0x01010101
        else:
            # Nibble g spread to the low bit of each byte (bit i moves up by 7 * i).
            bits = (((w >> (4 * g)) & 0xF) * 0x00204081) & 0x01010101
        # ... then 0 -> 0x01 (+1) and 1 -> 0xFF (-1); no byte carries into the next.
        lanes = bits * 0xFE + 0x01010101
        lanes = tl.reshape(replicate(lanes, 2), (R, TILE_WORDS, 8, 4)) >> (8 * tl.arange(0, 4))[None, None, None, :]
        values = lanes.to(tl.int8)
    else:
        # Two 16-bit values per lane; the sign bits are bits 15 and 31. ONE: 1.0 in both halves.
        ONE: tl.constexpr = 0x3F803F80 if tl.bfloat16 == DTYPE else 0x3C003C00
        w = tl.reshape(replicate(w, 4), (R, TILE_WORDS, 16))
        h = tl.arange(0, 16)[None, None, :]
        if INTERLEAVED:
            # Bits h and h + 16 share a lane: one mask, one shift to bits 15 and 31.
            lanes = ((w & (0x00010001 << h)) << (15 - h)) | ONE
        else:
            # Bits j = 2h and j + 1 (j <= 14; the upper half of the word is shifted down first):
            # masked, one multiply moves them to bits 15 and 31 (its copies at bits 16 and 30
            # are masked off).
            j = 2 * (h % 8)
            pair = tl.where(h < 8, w, w >> 16) & (3 << j)
            lanes = ((pair * ((1 << (15 - j)) + (1 << (30 - j)))) & 0x80008000) | ONE
        lanes = tl.reshape(replicate(lanes, 1), (R, TILE_WORDS, 16, 2)) >> (16 * tl.arange(0, 2))[None, None, None, :]
        values = lanes.to(tl.int16).to(DTYPE, bitcast=True)
    return tl.reshape(values, (R, TILE_WORDS * 32))


@triton.jit
def load_interleaved(rows, stride, mask_rows, k0, K, BRW: tl.constexpr, LANES: tl.constexpr):
    """Load x[:, k0 : k0 + 32 * BRW] (rows: pointers to the row starts) in the INTERLEAVED column
    order of :func:`unpack_tile`. Each of the LANES parts is a contiguous run of 32/LANES values
    per word (a vector load); tl.join lays them side by side in registers. Past K reads 0.
    """
    SPAN: tl.constexpr = 32 // LANES
    k = k0 + (32 * tl.arange(0, BRW))[:, None] + tl.arange(0, SPAN)[None, :]
    ptrs = rows[:, :, None] + k[None, :, :] * stride
    mask = mask_rows[:, :, None]
    part0 = tl.load(ptrs, mask=mask & (k < K)[None, :, :], other=0.0)
    part1 = tl.load(ptrs + SPAN * stride, mask=mask & (k + SPAN < K)[None, :, :], other=0.0)
    if LANES == 2:
        x = tl.join(part0, part1)
    else:
        part2 = tl.load(ptrs + 2 * SPAN * stride, mask=mask & (k + 2 * SPAN < K)[None, :, :], other=0.0)
        part3 = tl.load(ptrs + 3 * SPAN * stride, mask=mask & (k + 3 * SPAN < K)[None, :, :], other=0.0)
        # join(join(p0, p2), join(p1, p3))[..., a, b] is part 2a + b: the lane index.
        x = tl.join(tl.join(part0, part2), tl.join(part1, part3))
    return tl.reshape(x, (rows.shape[0], BRW * 32))


@triton.jit
def tf32(x):
    """fp32 x with its low 13 mantissa bits cleared: the part of x a TF32 tensor-core input keeps."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, SWAP_AB: tl.constexpr, EMULATE_TC: tl.constexpr):
    """acc + a @ b, or with SWAP_AB acc + b^T @ a^T (acc transposed), on the tensor cores: int8
    into int32, 16-bit into fp32, fp32 as TF32 (inputs cut to 10 mantissa bits).

    EMULATE_TC (for Triton's interpreter, which computes every dot exactly in fp32 and gets bf16
    dots wrong) does the tensor cores' arithmetic by hand: bf16 products are exact in fp32, and
    fp32 inputs are cut to TF32 first, so a CPU test sees the rounding the GPU does.
    """
    # One chain of static branches, no early returns (Triton 3.6 compiles the code after them).
    if SWAP_AB:
        a, b = tl.trans(b), tl.trans(a)
    if a.dtype == tl.int8:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    elif a.dtype == tl.float32 and EMULATE_TC:
        acc = tl.dot(tf32(a), tf32(b), acc)
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif EMULATE_TC:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def valid_bits(word_index, K):
    """Per word index: the mask of its bits that hold k < K (so padding bits never count)."""
    n_valid = K - 32 * word_index
    partial = (tl.full(word_index.shape, 1, tl.int32) << tl.minimum(tl.maximum(n_valid, 0), 31)) - 1
    return tl.where(n_valid >= 32, -1, tl.where(n_valid > 0, partial, 0))


@triton.jit
def to_output(y, OUT_T: tl.constexpr):
    """fp32 -> OUT_T rounded to nearest even, done by hand for bf16 so that every backend (Triton's
    interpreter truncates) gives the bits of torch's cast; NaN stays NaN."""
    if tl.bfloat16 == OUT_T:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(y != y, y.to(tl.bfloat16), rounded)
    return y.to(OUT_T)


@triton.jit
def epilogue(y, n, mask_n, pad, scale_ptr, bias_ptr, has_scale, has_bias):
    """(y - pad) * scale[n] + bias[n] in fp32 (n, mask_n broadcast against y).

    pad: the number of padded positions k >= K that added exactly +1 each to an int8 dot (their
    bits are masked to +1 on both operands); 0 for real activations, which load as 0 past K.
    """
    y = y - pad
    if has_scale:
        y = y * tl.load(scale_ptr + n, mask=mask_n, other=0).to(tl.float32)
    if has_bias:
        y = y + tl.load(bias_ptr + n, mask=mask_n, other=0).to(tl.float32)
    return y


@triton.jit
def pass_masked(y, m, n, ok, mask_ptr, stride_mm, stride_mw):
    """y where bit n % 32 of pass-mask word [m, n // 32] is 1, else 0 (a select: a blocked position
    is 0 even where y is inf or NaN). mask_ptr: int32 words (rows, ceil(cols/32)) with strides
    stride_mm, stride_mw, bit j of word w is column 32*w + j (the layout of the weight words);
    m, n and ``ok`` (where to read) broadcast against y."""
    words = tl.load(mask_ptr + m.to(tl.int64) * stride_mm + (n // 32) * stride_mw, mask=ok, other=0)
    return tl.where(((words >> (n % 32)) & 1) != 0, y, 0.0)


@triton.jit
def pass_masked_tile(y, rm, rn, M, N, mask_ptr, stride_mm, stride_mw):
    """:func:`pass_masked` of a tile y[rm, rn], rn = n0 + arange(BLOCK_N) with n0 and BLOCK_N
    multiples of 32: the tile's BLOCK_M x BLOCK_N/32 words are loaded once and unpacked in the
    thread that loaded them. Compiled for sm_90 in the 128 x 128 wgmma tile (bf16, 8 warps) it
    takes 115 registers where pass_masked takes 166 (118 without a mask); in the 16-column
    SWAP_AB tile (4 warps) 105 where pass_masked takes 72 (72 without)."""
    BLOCK_M: tl.constexpr = y.shape[0]
    BNW: tl.constexpr = y.shape[1] // 32
    cw = tl.min(rn, axis=0) // 32 + tl.arange(0, BNW)
    words = tl.load(
        mask_ptr + rm.to(tl.int64)[:, None] * stride_mm + cw[None, :] * stride_mw,
        mask=(rm < M)[:, None] & (cw < tl.cdiv(N, 32))[None, :],
        other=0,
    )
    w = tl.reshape(replicate(words, 5), (BLOCK_M, BNW, 32))
    keep = tl.reshape((w >> tl.arange(0, 32)[None, None, :]) & 1, (BLOCK_M, BNW * 32))
    return tl.where(keep != 0, y, 0.0)


@triton.jit
def split_range(n_steps, split_k, SPLIT: tl.constexpr):
    """The K steps [first, end) of this program: with SPLIT, the program_id(1)-th of split_k shares
    of cdiv(n_steps, split_k) steps each (the last may be shorter or empty)."""
    if SPLIT:
        per_split = tl.cdiv(n_steps, split_k)
        first = tl.program_id(1) * per_split
        return first, tl.minimum(first + per_split, n_steps)
    return 0, n_steps


@triton.jit
def store_result(
    acc,
    rm,
    rn,
    M,
    N,
    pad,
    y_ptr,
    part_ptr,
    scale_ptr,
    bias_ptr,
    stride_ym,
    stride_yn,
    has_scale,
    has_bias,
    SPLIT: tl.constexpr,
    mask_ptr=None,
    stride_mm=0,
    stride_mw=0,
    HAS_MASK: tl.constexpr = False,
    MASK_PER_ELEMENT: tl.constexpr = False,
):
    """Write the fp32 tile acc[rm, rn]: with SPLIT as part[program_id(1)] (fp32, (split_k, M, N)
    contiguous) for :func:`split_k_epilogue_kernel`, which applies the epilogue and the mask; else
    y = epilogue(acc) in y's dtype, with HAS_MASK 0 where the pass mask at mask_ptr (int32 words
    (M, ceil(N/32)), strides stride_mm, stride_mw) has bit 0: by :func:`pass_masked` with
    MASK_PER_ELEMENT, else :func:`pass_masked_tile` (rn then n0 + arange, n0 a multiple of 32)."""
    mask_n = rn < N
    mask = (rm < M)[:, None] & mask_n[None, :]
    if SPLIT:
        part = part_ptr + (tl.program_id(1) * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=mask)
    else:
        y = epilogue(acc, rn[None, :], mask_n[None, :], pad, scale_ptr, bias_ptr, has_scale, has_bias)
        if HAS_MASK and MASK_PER_ELEMENT:
            y = pass_masked(y, rm[:, None], rn[None, :], mask, mask_ptr, stride_mm, stride_mw)
        elif HAS_MASK:
            y = pass_masked_tile(y, rm, rn, M, N, mask_ptr, stride_mm, stride_mw)
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, to_output(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_signs(
    acc,
    rm,
    n0,
    M,
    N,
    pad,
    out_ptr,
    scale_ptr,
    bias_ptr,
    threshold_ptr,
    flip_ptr,
    stride_om,
    has_scale,
    has_bias,
    ROUND_T: tl.constexpr,
):
    """Write the sign words of the fp32 tile acc[rm, n0 : n0 + BLOCK_N] (n0 a multiple of 32):
    bit n of row m is ``(v < threshold[n]) XOR flip[n]``, v = epilogue(acc) rounded to ROUND_T,
    packed 32 columns to an int32 word; columns n >= N give 0 bits. out: int32 (M, ceil(N/32)),
    row stride ``stride_om``, unit stride along words.

    threshold is int32 (W1A1 sums, v exact in fp32) or ROUND_T; flip is int8 0/1.
    """
    BLOCK_M: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = acc.shape[1]
    BNW: tl.constexpr = BLOCK_N // 32
    rn = n0 + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    v = epilogue(acc, rn[None, :], mask_n[None, :], pad, scale_ptr, bias_ptr, has_scale, has_bias)
    v = to_output(v, ROUND_T).to(tl.float32)
    t = tl.load(threshold_ptr + rn, mask=mask_n, other=0).to(tl.float32)
    flip = tl.load(flip_ptr + rn, mask=mask_n, other=0) != 0
    neg = ((v < t[None, :]) != flip[None, :]) & mask_n[None, :]
    bits = neg.to(tl.int32) << (tl.arange(0, BLOCK_N) % 32)[None, :]
    # Distinct powers of two: their int32 sum is their OR (bit 31 wraps to the sign bit).
    words = tl.sum(tl.reshape(bits, (BLOCK_M, BNW, 32)), axis=2)
    cw = n0 // 32 + tl.arange(0, BNW)
    mask = (rm < M)[:, None] & (cw < tl.cdiv(N, 32))[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + cw[None, :], words, mask=mask)


@triton.jit(do_not_specialize=["M", "pad", "has_scale", "has_bias", "split_k"])
def split_k_epilogue_kernel(
    part_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    M,
    N,
    pad,
    stride_ym,
    stride_yn,
    has_scale,
    has_bias,
    split_k,
    mask_ptr,
    stride_mm,
    stride_mw,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y[m, n] = epilogue(sum_s part[s, m, n]), the end of a split-K product: the shares are added
    in a fixed order (deterministic results), then with HAS_MASK y is 0 where the pass mask
    (int32 words (M, ceil(N/32)) at mask_ptr, strides stride_mm, stride_mw; :func:`pass_masked`)
    has bit 0. part: fp32 (split_k, M, N) contiguous. Grid: (cdiv(M * N, BLOCK),)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    y = tl.zeros((BLOCK,), tl.float32)
    for s in range(split_k):
        y += tl.load(part_ptr + s * M * N + i, mask=mask, other=0.0)
    m, n = i // N, i % N
    y = epilogue(y, n, mask, pad, scale_ptr, bias_ptr, has_scale, has_bias)
    if HAS_MASK:
        y = pass_masked(y, m, n, mask, mask_ptr, stride_mm, stride_mw)
    tl.store(y_ptr + m * stride_ym + n * stride_yn, to_output(y, y_ptr.dtype.element_ty), mask=mask)
