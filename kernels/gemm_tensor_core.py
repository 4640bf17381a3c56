"""The tensor-core binary GEMM kernel: ``y[M, N] = A[M, R] @ B[R, N] * scale[N] + bias[N]`` with the
packed operand B unpacked to +-1 in registers (launched by :mod:`bnnops.kernels.gemm`).

Roles (X_MODE, TRANS_W):

- W1A1 (X_SIGN or X_PACKED, TRANS_W = 0): ``y = sign(x) W^T``. Both operands are int8 +-1 and
  ``tl.dot`` accumulates exactly in int32. Padding: bits of the last word at k >= R are masked to
  0 (+1) on both operands and float x past R loads as 0.0 (+1), so each padded position adds
  exactly +1 and the epilogue subtracts their count.
- W1A16 (X_REAL, TRANS_W = 0): ``y = x W^T`` for real x. The weight is unpacked to x's dtype and
  the dot accumulates in fp32. fp32 x runs as two TF32 products (x = hi + lo, hi its top 10
  mantissa bits; +-1 is exact in TF32, so only lo is rounded: error about 2^-20 |x|). x past R
  loads as 0 and adds nothing.
- grad_input (X_REAL, TRANS_W = 1): ``y = g W``; the packed dimension is the output dimension N.
  With HAS_MASK, y is 0 where the straight-through estimator's packed pass mask is 0 (the
  backward of a layer that saved its input packed).

Why the layouts:

- INTERLEAVED K order (:func:`~bnnops.kernels.gemm_tiles.unpack_tile`) when x is packed (both
  operands unpacked alike) or the batch is small (SWAP_AB: x is loaded in that order as joined
  contiguous runs): cheaper to unpack than natural order. A common permutation of K leaves the
  dot product unchanged. grad_input's packed dimension is its output, which must stay in order.
- SWAP_AB computes y^T = B^T A^T so the weight tile is the tensor cores' M operand (64+ rows) and a
  small batch their N operand (16): small M still runs wgmma.
- SPLIT (split_k > 1): program (tile, s) sums the s-th share of the K steps into part[s] (fp32,
  (split_k, M, N) contiguous) and :func:`~bnnops.kernels.gemm_tiles.split_k_epilogue_kernel`
  finishes y. SPLIT is a constexpr so the unsplit kernel keeps the registers of one epilogue.
"""

import triton
import triton.language as tl

from bnnops.kernels.gemm_tiles import (
    X_PACKED,
    X_REAL,
    X_SIGN,
    dot,
    load_interleaved,
    split_range,
    store_result,
    store_signs,
    tf32,
    unpack_tile,
    valid_bits,
)


# has_scale / has_bias / split_k are runtime values (they only touch the loop bounds and the
# epilogue) and M only masks rows: not specializing on them keeps the compiled variants few.
@triton.jit(do_not_specialize=["M", "has_scale", "has_bias", "split_k"])
def gemm_kernel(
    x_ptr,
    words_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    part_ptr,
    M,
    N,
    R,
    words_per_row,
    stride_xm,
    stride_xr,
    stride_ym,
    stride_yn,
    has_scale,
    has_bias,
    split_k,
    threshold_ptr,
    flip_ptr,
    mask_ptr,
    stride_mm,
    stride_mw,
    X_MODE: tl.constexpr,
    TRANS_W: tl.constexpr,
    EMULATE_TC: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr,
    SIGN_OUT: tl.constexpr = False,
    ROUND_T: tl.constexpr = tl.float32,
    HAS_MASK: tl.constexpr = False,
):
    """y[M, N] = (A[M, R] @ B[R, N]) * scale[N] + bias[N], B from the words at words_ptr.

    A is x: real values (X_REAL), floats binarized here (X_SIGN: x < 0 -> -1, else +1), or int32
    sign words (X_PACKED, (M, ceil(R/32)) with strides in words). B: TRANS_W = 0 -> B = W^T, W (N, R)
    as words (N, words_per_row), words_per_row = ceil(R/32); TRANS_W = 1 -> B = W, W (R, N) as
    words (R, words_per_row), words_per_row = ceil(N/32). y: any strides, its dtype the output's.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), split_k), tiles in groups of GROUP_M row tiles.
    EMULATE_TC: the interpreter's tensor-core arithmetic (see :func:`~bnnops.kernels.gemm_tiles.dot`).
    SIGN_OUT (not with SPLIT or TRANS_W; BLOCK_N a multiple of 32): y_ptr is int32 sign words
    (M, ceil(N/32)) written by :func:`~bnnops.kernels.gemm_tiles.store_signs` with threshold_ptr,
    flip_ptr and ROUND_T (stride_ym its row stride); otherwise those two pointers are not read.
    HAS_MASK (grad_input; not with SIGN_OUT): y is 0 where bit n % 32 of word [m, n // 32] of the
    int32 pass mask at mask_ptr (strides stride_mm, stride_mw) is 0, applied where y is written
    (with SPLIT by :func:`~bnnops.kernels.gemm_tiles.split_k_epilogue_kernel`, not to the shares);
    otherwise mask_ptr is not read.
    """
    # Grouped tile order: GROUP_M row tiles share each column of weight tiles while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    BRW: tl.constexpr = BLOCK_R // 32
    BNW: tl.constexpr = BLOCK_N // 32
    INT: tl.constexpr = X_MODE != X_REAL
    ACC_SHAPE: tl.constexpr = (BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N)
    if INT:
        DOT_T: tl.constexpr = tl.int8
        acc = tl.zeros(ACC_SHAPE, tl.int32)
    else:
        DOT_T: tl.constexpr = x_ptr.dtype.element_ty
        acc = tl.zeros(ACC_SHAPE, tl.float32)
    if TRANS_W:
        cw = pid_n * BNW + tl.arange(0, BNW)
    else:
        w_rows = words_ptr + rn.to(tl.int64)[:, None] * words_per_row

    INTERLEAVED: tl.constexpr = (X_MODE == X_PACKED or SWAP_AB) and not TRANS_W and tl.float32 != DOT_T
    LANES: tl.constexpr = 4 if INT else 2
    n_steps = tl.cdiv(R, BLOCK_R)
    first_step, end_step = split_range(n_steps, split_k, SPLIT)
    for step in range(first_step, end_step):
        r = step * BLOCK_R + tl.arange(0, BLOCK_R)
        rw = step * BRW + tl.arange(0, BRW)
        if X_MODE == X_PACKED:
            xw = tl.load(
                x_rows + rw[None, :] * stride_xr, mask=mask_m[:, None] & (rw < words_per_row)[None, :], other=0
            )
            if step == n_steps - 1:  # only the last word can hold padding bits
                xw = xw & valid_bits(rw, R)[None, :]
            a = unpack_tile(xw, BLOCK_M, BRW, tl.int8, INTERLEAVED)
        else:
            if INTERLEAVED:
                xv = load_interleaved(x_rows, stride_xr, mask_m[:, None], step * BLOCK_R, R, BRW, LANES)
            else:
                xv = tl.load(x_rows + r[None, :] * stride_xr, mask=mask_m[:, None] & (r < R)[None, :], other=0.0)
            if X_MODE == X_SIGN:
                # Compare through fp32: exact for every dtype (and the interpreter lacks bf16 math).
                a = tl.where(xv.to(tl.float32) < 0, -1, 1).to(tl.int8)
            else:
                a = xv
        if TRANS_W:
            words = tl.load(
                words_ptr + r.to(tl.int64)[:, None] * words_per_row + cw[None, :],
                mask=(r < R)[:, None] & (cw < words_per_row)[None, :],
                other=0,
            )
            b = unpack_tile(words, BLOCK_R, BNW, DOT_T, False)
        else:
            words = tl.load(w_rows + rw[None, :], mask=mask_n[:, None] & (rw < words_per_row)[None, :], other=0)
            if INT and step == n_steps - 1:
                words = words & valid_bits(rw, R)[None, :]
            b = tl.trans(unpack_tile(words, BLOCK_N, BRW, DOT_T, INTERLEAVED))
        # a holds x (or g), b the unpacked weight, whichever operand order the dot uses.
        if tl.float32 == DOT_T:
            # Two TF32 products (see the module docstring). The split is of x itself, before
            # SWAP_AB decides which side of the dot it is on.
            a_hi = tf32(a)
            acc = dot(a_hi, b, acc, SWAP_AB, EMULATE_TC)
            acc = dot(a - a_hi, b, acc, SWAP_AB, EMULATE_TC)
        else:
            acc = dot(a, b, acc, SWAP_AB, EMULATE_TC)

    if SWAP_AB:
        acc = tl.trans(acc)
    # INT: each padded position k in [R, n_steps * BLOCK_R) added +1 times +1.
    pad = n_steps * BLOCK_R - R if INT else 0
    if SIGN_OUT:
        store_signs(
            acc.to(tl.float32),
            rm,
            pid_n * BLOCK_N,
            M,
            N,
            pad,
            y_ptr,
            scale_ptr,
            bias_ptr,
            threshold_ptr,
            flip_ptr,
            stride_ym,
            has_scale,
            has_bias,
            ROUND_T,
        )
    else:
        store_result(
            acc.to(tl.float32),
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
            SPLIT,
            mask_ptr,
            stride_mm,
            stride_mw,
            HAS_MASK,
            # Fewer registers in each layout (see pass_masked_tile).
            MASK_PER_ELEMENT=SWAP_AB,
        )
