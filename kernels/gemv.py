"""The CUDA-core W1A16 kernel for small batches (launched by :mod:`bnnops.kernels.gemm`; the config
table runs it at M <= GEMV_M, see :mod:`bnnops.kernels.gemm_configs`).

At such batches the tensor-core kernel pads the batch to 16 and moves x and the unpacked weight
tile through shared memory every step; this kernel reads the words straight into registers and
issues about three instructions per weight (counted in SASS; measurements in ``docs/design.md``).
"""

import triton
import triton.language as tl

from bnnops.kernels.gemm_tiles import replicate, split_range, store_result

# The words of a row one step reads: 8 lanes x 4 bytes, one 32-byte sector.
GEMV_LANES = tl.constexpr(8)


# words_per_row is not specialized: a row start not known to be 16-byte aligned keeps the word
# loads scalar, so a thread holds one word of each of its rows (x shared by them), not four words
# of one row.
@triton.jit(do_not_specialize=["M", "words_per_row", "has_scale", "has_bias", "split_k"])
def gemv_kernel(
    x_ptr,
    words_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    part_ptr,
    M,
    N,
    K,
    words_per_row,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    has_scale,
    has_bias,
    split_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """W1A16 for small M: y[M, N] = x[M, K] @ W^T * scale + bias on the CUDA cores, fp32 arithmetic
    (no TF32). W (N, K) as words (N, words_per_row), rows contiguous; x and y any strides.

    sum_k s_k x_k = S - 2 * sum_{k: bit k = 1} x_k with S = sum_k x_k, so each weight bit costs a
    test (one LOP3 writing a predicate) and a predicated fp32 add of x_k. GEMV_LANES lanes read a
    32-byte sector of a row per step, one step ahead of their use (the loads' DRAM latency hides
    under the previous step's adds); each thread holds one word of BLOCK_N / (4 * num_warps) rows
    and the 32 x values of that word. neg has one fp32 accumulator per bit of a nibble (4 x 8 rows:
    32 independent add chains a thread). S is summed in a pass of its own after the loop (in the
    tile's layout each x value would be loaded and added again for every row copy), per lane and
    bit like neg, so S - 2 neg cancels accumulator by accumulator before the large sums are added.

    Grid: (cdiv(N, BLOCK_N), split_k), M <= BLOCK_M. With SPLIT, program (tile, s) writes its share
    of K to part[s] like the tensor-core kernel.
    """
    LANES: tl.constexpr = GEMV_LANES
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    lane = tl.arange(0, LANES)
    bit = tl.arange(0, 4)
    w_rows = words_ptr + rn.to(tl.int64)[:, None] * words_per_row + lane[None, :]
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm
    mask_n = rn < N
    mask_m = rm < M
    neg = tl.zeros((BLOCK_M, BLOCK_N, LANES, 4), tl.float32)
    first_step, end_step = split_range(tl.cdiv(words_per_row, LANES), split_k, SPLIT)
    # Words are loaded one step ahead of their use.
    word_end = tl.minimum(words_per_row, end_step * LANES)
    word_index = first_step * LANES + lane
    words = tl.load(w_rows + first_step * LANES, mask=mask_n[:, None] & (word_index < word_end)[None, :], other=0)
    for step in range(first_step, end_step):
        w = tl.reshape(replicate(words, 2), (1, BLOCK_N, LANES, 4))
        next_word_index = word_index + LANES
        words = tl.load(
            w_rows + (step + 1) * LANES, mask=mask_n[:, None] & (next_word_index < word_end)[None, :], other=0
        )
        for nibble in tl.static_range(8):
            # Bits 4 * nibble + bit of each word; x past K loads as 0, so padding bits add nothing.
            k = 32 * word_index[:, None] + 4 * nibble + bit[None, :]
            xv = tl.load(
                x_rows[:, None, None] + k[None, :, :] * stride_xk,
                mask=mask_m[:, None, None] & (k < K)[None, :, :],
                other=0.0,
            ).to(tl.float32)[:, None, :, :]
            neg = tl.where((w & (1 << (4 * nibble + bit))[None, None, None, :]) != 0, neg + xv, neg)
        word_index = next_word_index
    # S over this program's share of K, summed per lane and bit like neg.
    total = tl.zeros((BLOCK_M, LANES, 4), tl.float32)
    for step in range(first_step, end_step):
        k = 32 * (lane + step * LANES)[:, None] + tl.arange(0, 32)[None, :]
        xs = tl.load(
            x_rows[:, None, None] + k[None, :, :] * stride_xk,
            mask=mask_m[:, None, None] & (k < K)[None, :, :],
            other=0.0,
        ).to(tl.float32)
        total += tl.sum(tl.reshape(xs, (BLOCK_M, LANES, 8, 4)), 2)  # bit 4 * nibble + b into accumulator b
    y = tl.sum(tl.sum(tl.expand_dims(total, 1) - 2 * neg, 3), 2)
    store_result(
        y, rm, rn, M, N, 0, y_ptr, part_ptr, scale_ptr, bias_ptr, stride_ym, stride_yn, has_scale, has_bias, SPLIT
    )
