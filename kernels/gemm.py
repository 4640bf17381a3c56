"""Triton kernels for binary GEMM: packed +-1 weights times binary or real activations.

``_gemm_kernel`` computes ``y[M, N] = A[M, R] @ B[R, N]`` on the tensor cores with the packed
operand unpacked in registers, in three roles (and ``_gemv_kernel`` does W1A16 for M <= 2 on the
CUDA cores, see below):

- **W1A1** (:func:`w1a1`): ``y = sign(x) W^T`` with W (N, K) packed. The +-1 operands are int8 and
  ``tl.dot`` accumulates exactly in int32. x is float (binarized in the kernel) or packed words.
- **W1A16** (:func:`w1a16`): ``y = x W^T`` for real x (fp32, bf16, fp16); W is unpacked to x's
  dtype and ``tl.dot`` accumulates in fp32 (fp32 x as two TF32 products, error about 2^-20 |x|:
  x itself is split, whichever side of the dot it is on; the interpreter cuts fp32 dot inputs to
  TF32 like the tensor cores, so CPU tests check this too).
- **grad_input** (:func:`grad_input`): ``y = g W`` (g (M, N), W (N, K) packed), the backward of both;
  here the packed dimension K is the output dimension.

Each fuses the epilogue ``y = acc * scale[n] + bias[n]`` (per output channel, optional) and rounds
to the output dtype once.

The two numbers (H100 SXM: 1979 dense int8 TOPS, 989 bf16 TFLOP/s, about 800 measured by
torch.matmul, 3.35 TB/s HBM, about 3.0 measured):

- W1A1, M = N = K = 8192: 2 * 8192^3 = 1.1e12 int8 ops, 0.56 ms at peak. Fewest bytes: x once
  (bf16, 128 MB), W packed 8 MB, y 128 MB (bf16) or 256 MB (fp32): about 0.1 ms, compute-bound.
  bf16 torch.matmul on the same +-1 values: about 1.37 ms; 1.6x of it is 0.86 ms, 65% of peak.
- W1A16, M = 1, N = K = 8192: 1.3e8 flops (nothing). Fewest bytes: W packed 8 MB (x and y are 16
  KB): 2.7 us at 3.0 TB/s. bf16 torch.matmul reads 128 MB, about 43 us; 8x of it is 5.4 us.
  Every one of the 67M weights must be unpacked: an SM issues 128 thread-instructions per clock
  (64 for the integer ALU), so each instruction per weight costs about 2.1 us (4.2 on the ALU).

How the kernel meets them (counted in SASS by compiling offline for sm_90a; only a GPU run times
them, see :func:`sweep`):

- Unpacking, several values per 32-bit instruction. ``tl.join`` replicates each loaded word
  inside its thread, so a thread owns whole words and every shift is an immediate (Triton's
  default layout spreads a word's 32 bits over 32 lanes: one shared-memory load per bit).
  int8: a lane holds four +-1 bytes, ``bits * 0xFE + 0x01010101`` (no byte carries). 16-bit: a
  lane holds two values, 1.0 or-ed onto the sign bits 15 and 31.
- INTERLEAVED K order: when x is packed (W1A1, both operands unpacked alike) or small (SWAP_AB
  below: x is loaded in that order as joined contiguous runs), a lane takes bits j, j+8, j+16,
  j+24 (int8: shift, mask, multiply-add for four values) or h, h+16 (16-bit: mask, shift, or for
  two). A common permutation of K leaves the dot product unchanged. Natural order (large-batch
  real or float activations) costs a multiply more per lane.
- W1A1 with float x: binarizing in the kernel costs about 2.5 instructions per value and every
  column of tiles redoes it, so for M > 16 and N > 128 :func:`w1a1` packs x once first
  (``pack_signs``, one pass over x, 6% of the ideal time at 8192) and runs packed x packed.
- W1A1 packed: measured on an H100 at 8192^3, 128 x 128 x 128 tiles (211 instructions per warp
  per K step, 127 registers, so two CTAs an SM) took 1450 us and 128 x 256 x 128 (316, 225
  registers, one CTA) 1339 us, which the table uses; the unpacking did not hide under the
  other CTA's wgmma (Triton waits for each step's wgmma before the next unpack, and both
  operands go registers -> shared memory -> wgmma every step). cuBLAS int8 takes 1.13 ms there.
- Large batch with few output tiles (at most half as many as SMs: a narrow layer, or M of a few
  hundred): K is split as well, up to 8 ways, towards one program per SM; BinaryNet's 8192 -> 1024
  linear at batch 256 had 8 programs for 132 SMs. Not yet timed.
- Small batch (M <= 16): SWAP_AB computes y^T = W x^T so the weight tile is the wgmma M operand
  (64 rows) and the batch its N operand (16), with 256-wide K steps in a 4-stage cp.async pipeline.
  W1A16 bf16: 2.6 instructions per weight (unpack about 1; the rest moves the tile through shared
  memory into wgmma's operand and runs the loop), 5.6 us at full issue rate, yet 39 us measured
  at M = 1 and 16 (latency and shared-memory bound, not issue bound). N = 8192 gives
  only 128 tiles of 64 rows, one warpgroup per SM, so K is split (SPLIT_K, up to 8) until every SM
  has two CTAs; the fp32 partial sums are added by a small second kernel in a fixed order, which
  runs the epilogue (about 2 us more).
- W1A16 at M <= 2 (``_gemv_kernel``): the tensor-core path above measured 39 us at M = 1 and
  N = K = 8192 on an H100 whatever its split (215 GB/s of weights: per step it moves x and the
  unpacked tile through shared memory twice, with two barriers, a proxy fence and a synchronous
  wgmma, and pads the batch to 16). The GEMV uses sum_k s_k x_k = S - 2 sum_{bit k = 1} x_k:
  per weight one LOP3 (the bit into a predicate) and one predicated FADD, x shared by the 8 rows
  a thread holds. SASS (Triton 3.6, sm_90a), bf16: 721 instructions per 256 weights per thread
  (2.8 each; about 390 on the integer ALU at half rate), 122 registers, no shared memory in the
  loop: about 6.5 to 7 us for 67M weights at full issue, plus the split-K sum (K split 8 ways so
  that each SM has four programs: 128 rows per program leave only 64). It measured 19.9 us
  there (split 9 ways then, the ninth share empty), so most of the time was not issue; our reading (not profiled): each step waited for its
  own word loads (DRAM latency, about a microsecond, every warp of an SM in the same phase). The
  words are now loaded one step ahead, and S is summed in a pass of its own after the loop (in
  the tile's layout every x value was loaded and added a second time), per lane and bit like
  neg, so S - 2 neg cancels per accumulator (rounding within about 2x of the old kernel's on
  inputs with a large mean). Compiled offline with Triton 3.9 for sm_90a (the only version at
  hand; not yet timed): before, 653 loop instructions per 256 weights and 118 registers; now 641
  and 101 (4 accumulators per row and word instead of 8 pay for the prefetched words: up to 128
  registers keep four programs of 4 warps on an SM).
- Padding: the word holding k >= K is masked to zero bits (+1) in both int8 operands, float
  activations past K load as 0.0 (+1), so each padded position adds exactly +1 to the int32 dot
  and the epilogue subtracts their count. Real activations past K load as 0 and add nothing.
- bf16 output is rounded to nearest even by hand (Triton's interpreter truncates), matching
  torch's cast bit for bit; the interpreter also computes bf16 dots in fp32 (exact products).

Block configs come from :func:`default_config` (a table by batch size and mode). Sweep them on a
GPU with ``python -c "from bnnops.kernels import gemm; gemm.sweep()"``.
"""

import os

import torch
import triton
import triton.language as tl

from bnnops.kernels import conv2d
from bnnops.kernels.pack import pack_signs

# What x holds (the kernel's X_MODE): real values, floats to binarize, or packed sign words.
X_REAL, X_SIGN, X_PACKED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# Batch sizes up to this use the small-batch configs (BLOCK_M = 16, weight streaming).
SMALL_M = 16
# W1A16 batch sizes up to this run the CUDA-core kernel ``_gemv_kernel``; GEMV_LANES: the words of
# a row it reads per step (one 32-byte sector).
GEMV_M = 2
GEMV_LANES = tl.constexpr(8)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _replicate(w, LOG2: tl.constexpr):
    """[..., C] -> [..., C, 2, ..., 2] (LOG2 new dims of 2): copies that stay in the same thread.

    ``tl.join`` puts its new dimension in registers, so after this every copy of a word lives in
    the thread that loaded it and the unpack below needs no cross-thread traffic.
    """
    for _ in tl.static_range(LOG2):
        w = tl.join(w, w)
    return w


@triton.jit
def _unpack_tile(words, R: tl.constexpr, BKW: tl.constexpr, DTYPE: tl.constexpr, INTERLEAVED: tl.constexpr):
    """int32 words [R, BKW] -> +-1 values [R, 32 * BKW] of DTYPE (int8, bfloat16, float16, float32).

    Bit 1 is -1, bit 0 is +1. Natural order: column 32*w + j is bit j of word w. INTERLEAVED (not
    float32): with L values per 32-bit lane (4 for int8, 2 for 16-bit), column 32*w + L*j + i is
    bit j + (32/L)*i, a permutation of K that is cheaper to produce; the other operand of the dot
    must be permuted alike (:func:`_load_interleaved`), which leaves the dot product unchanged.
    """
    w = words.to(tl.uint32, bitcast=True)
    if tl.float32 == DTYPE:
        w = tl.reshape(_replicate(w, 5), (R, BKW, 32))
        j = tl.arange(0, 32)[None, None, :]
        values = (((w << (31 - j)) & 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)
    elif tl.int8 == DTYPE:
        # Four values per 32-bit lane, one per byte: first bytes of 0 or 1 ...
        w = tl.reshape(_replicate(w, 3), (R, BKW, 8))
        g = tl.arange(0, 8)[None, None, :]
        if INTERLEAVED:
            bits = (w >> g) & 0x01010101
        else:
            # Nibble g spread to the low bit of each byte (bit i moves up by 7 * i).
            bits = (((w >> (4 * g)) & 0xF) * 0x00204081) & 0x01010101
        # ... then 0 -> 0x01 (+1) and 1 -> 0xFF (-1); no byte carries into the next.
        lanes = bits * 0xFE + 0x01010101
        lanes = tl.reshape(_replicate(lanes, 2), (R, BKW, 8, 4)) >> (8 * tl.arange(0, 4))[None, None, None, :]
        values = lanes.to(tl.int8)
    else:
        # Two 16-bit values per lane; the sign bits are bits 15 and 31. ONE: 1.0 in both halves.
        ONE: tl.constexpr = 0x3F803F80 if tl.bfloat16 == DTYPE else 0x3C003C00
        w = tl.reshape(_replicate(w, 4), (R, BKW, 16))
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
        lanes = tl.reshape(_replicate(lanes, 1), (R, BKW, 16, 2)) >> (16 * tl.arange(0, 2))[None, None, None, :]
        values = lanes.to(tl.int16).to(DTYPE, bitcast=True)
    return tl.reshape(values, (R, BKW * 32))


@triton.jit
def _load_interleaved(rows, stride, mask_rows, k0, K, BRW: tl.constexpr, LANES: tl.constexpr):
    """Load x[:, k0 : k0 + 32 * BRW] (rows: pointers to the row starts) in the INTERLEAVED column
    order of :func:`_unpack_tile`. Each of the LANES parts is a contiguous run of 32/LANES values
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
def _tf32(x):
    """fp32 x with its low 13 mantissa bits cleared: the part of x a TF32 tensor-core input keeps."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, SWAP_AB: tl.constexpr, EMULATE_TC: tl.constexpr):
    """acc + a @ b, or with SWAP_AB acc + b^T @ a^T (acc transposed: see the kernel), on the
    tensor cores: int8 into int32, 16-bit into fp32, fp32 as TF32 (inputs cut to 10 mantissa bits).

    EMULATE_TC (Triton's interpreter, which computes every dot exactly in fp32 and gets bf16 dots
    wrong) does the tensor cores' arithmetic by hand: bf16 products are exact in fp32, and fp32
    inputs are cut to TF32 first, so a CPU test sees the rounding the GPU does.
    """
    # One chain of static branches, no early returns (Triton 3.6 compiles the code after them).
    if SWAP_AB:
        a, b = tl.trans(b), tl.trans(a)
    if a.dtype == tl.int8:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    elif a.dtype == tl.float32 and EMULATE_TC:
        acc = tl.dot(_tf32(a), _tf32(b), acc)
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif EMULATE_TC:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _valid_bits(word_index, K):
    """Per word index: the mask of its bits that hold k < K (so padding bits never count)."""
    n_valid = K - 32 * word_index
    partial = (tl.full(word_index.shape, 1, tl.int32) << tl.minimum(tl.maximum(n_valid, 0), 31)) - 1
    return tl.where(n_valid >= 32, -1, tl.where(n_valid > 0, partial, 0))


@triton.jit
def _to_output(y, OUT_T: tl.constexpr):
    """fp32 -> OUT_T rounded to nearest even, done by hand for bf16 so that every backend (Triton's
    interpreter truncates) gives the bits of torch's cast; NaN stays NaN."""
    if tl.bfloat16 == OUT_T:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(y != y, y.to(tl.bfloat16), rounded)
    return y.to(OUT_T)


@triton.jit
def _epilogue(y, n, mask_n, pad, scale_ptr, bias_ptr, has_scale, has_bias):
    """(y - pad) * scale[n] + bias[n] in fp32 (n, mask_n broadcast against y)."""
    y = y - pad
    if has_scale:
        y = y * tl.load(scale_ptr + n, mask=mask_n, other=0).to(tl.float32)
    if has_bias:
        y = y + tl.load(bias_ptr + n, mask=mask_n, other=0).to(tl.float32)
    return y


@triton.jit
def _split_range(n_steps, split_k, SPLIT: tl.constexpr):
    """The K steps [first, end) of this program: with SPLIT, the program_id(1)-th of split_k shares."""
    if SPLIT:
        per_split = tl.cdiv(n_steps, split_k)
        first = tl.program_id(1) * per_split
        return first, tl.minimum(first + per_split, n_steps)
    return 0, n_steps


@triton.jit
def _store_result(
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
):
    """Write the fp32 tile acc[rm, rn]: with SPLIT as part[program_id(1)] (fp32, (split_k, M, N)
    contiguous) for ``_split_k_epilogue_kernel``, else y = epilogue(acc) in y's dtype."""
    mask_n = rn < N
    mask = (rm < M)[:, None] & mask_n[None, :]
    if SPLIT:
        part = part_ptr + (tl.program_id(1) * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=mask)
    else:
        y = _epilogue(acc, rn[None, :], mask_n[None, :], pad, scale_ptr, bias_ptr, has_scale, has_bias)
        y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, _to_output(y, y_ptr.dtype.element_ty), mask=mask)


# has_scale / has_bias / split_k are runtime values (they only touch the loop bounds and the
# epilogue) and M only masks rows: not specializing on them keeps the compiled variants few.
@triton.jit(do_not_specialize=["M", "has_scale", "has_bias", "split_k"])
def _gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    part_ptr,
    M,
    N,
    R,
    KW,
    stride_xm,
    stride_xr,
    stride_ym,
    stride_yn,
    has_scale,
    has_bias,
    split_k,
    X_MODE: tl.constexpr,
    TRANS_W: tl.constexpr,
    EMULATE_TC: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """y[M, N] = (A[M, R] @ B[R, N]) * scale[N] + bias[N], B from packed words w.

    A is x: real values (X_REAL), floats binarized here (X_SIGN), or int32 sign words (X_PACKED,
    (M, ceil(R/32)) with strides in words). B: TRANS_W = 0 -> B = W^T, W (N, R) as words (N, KW),
    KW = ceil(R/32); TRANS_W = 1 -> B = W, W (R, N) as words (R, KW), KW = ceil(N/32).
    With SPLIT (split_k > 1), program (tile, s) sums the s-th share of the K steps into part[s]
    (fp32, (split_k, M, N) contiguous) and ``_split_k_epilogue_kernel`` finishes y. (SPLIT is
    compiled in, so the unsplit kernel keeps the registers of one epilogue; the count is not.)
    """
    # Grouped tile order: GROUP_M row tiles share each column of W tiles while it is in L2.
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
    # SWAP_AB computes y^T = B^T A^T: the weight tile is the tensor cores' M operand (64+ rows)
    # and a small batch their N operand (16), so small M still runs wgmma.
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
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW

    # Interleave K when x is packed (both operands unpacked alike) or small (SWAP_AB: cheap to
    # permute); the grad's packed dimension is its output, which must stay in order.
    INTERLEAVED: tl.constexpr = (X_MODE == X_PACKED or SWAP_AB) and not TRANS_W and tl.float32 != DOT_T
    LANES: tl.constexpr = 4 if INT else 2
    n_steps = tl.cdiv(R, BLOCK_R)
    first_step, end_step = _split_range(n_steps, split_k, SPLIT)
    for step in range(first_step, end_step):
        r = step * BLOCK_R + tl.arange(0, BLOCK_R)
        rw = step * BRW + tl.arange(0, BRW)
        if X_MODE == X_PACKED:
            xw = tl.load(x_rows + rw[None, :] * stride_xr, mask=mask_m[:, None] & (rw < KW)[None, :], other=0)
            if step == n_steps - 1:  # only the last word can hold padding bits
                xw = xw & _valid_bits(rw, R)[None, :]
            a = _unpack_tile(xw, BLOCK_M, BRW, tl.int8, INTERLEAVED)
        else:
            if INTERLEAVED:
                xv = _load_interleaved(x_rows, stride_xr, mask_m[:, None], step * BLOCK_R, R, BRW, LANES)
            else:
                xv = tl.load(x_rows + r[None, :] * stride_xr, mask=mask_m[:, None] & (r < R)[None, :], other=0.0)
            if X_MODE == X_SIGN:
                # Compare through fp32: exact for every dtype (and the interpreter lacks bf16 math).
                a = tl.where(xv.to(tl.float32) < 0, -1, 1).to(tl.int8)
            else:
                a = xv
        if TRANS_W:
            words = tl.load(
                w_ptr + r.to(tl.int64)[:, None] * KW + cw[None, :], mask=(r < R)[:, None] & (cw < KW)[None, :], other=0
            )
            b = _unpack_tile(words, BLOCK_R, BNW, DOT_T, False)
        else:
            words = tl.load(w_rows + rw[None, :], mask=mask_n[:, None] & (rw < KW)[None, :], other=0)
            if INT and step == n_steps - 1:
                words = words & _valid_bits(rw, R)[None, :]
            b = tl.trans(_unpack_tile(words, BLOCK_N, BRW, DOT_T, INTERLEAVED))
        # a holds x (or g), b the unpacked weight, whichever operand order the dot uses.
        if tl.float32 == DOT_T:
            # Two TF32 products: +-1 is exact in TF32 and x = hi + lo with hi its top 10
            # mantissa bits, so only lo (already < 2^-10 |x|) is rounded: about 2^-20 |x|.
            # The split is of x itself, before SWAP_AB decides which side of the dot it is on.
            a_hi = _tf32(a)
            acc = _dot(a_hi, b, acc, SWAP_AB, EMULATE_TC)
            acc = _dot(a - a_hi, b, acc, SWAP_AB, EMULATE_TC)
        else:
            acc = _dot(a, b, acc, SWAP_AB, EMULATE_TC)

    if SWAP_AB:
        acc = tl.trans(acc)
    # INT: each padded position k in [R, n_steps * BLOCK_R) added +1 times +1.
    pad = n_steps * BLOCK_R - R if INT else 0
    _store_result(
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
    )


# KW is not specialized: a row start not known to be 16-byte aligned keeps the word loads scalar,
# so a thread holds one word of each of its rows (x shared by them), not four words of one row.
@triton.jit(do_not_specialize=["M", "KW", "has_scale", "has_bias", "split_k"])
def _gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    part_ptr,
    M,
    N,
    K,
    KW,
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
    """W1A16 for a batch of one or two: y[M, N] = x[M, K] @ W^T * scale + bias on the CUDA cores.

    sum_k s_k x_k = S - 2 * sum_{k: bit k = 1} x_k with S = sum_k x_k, so each weight bit costs a
    test (one LOP3 writing a predicate) and a predicated fp32 add of x_k; S is one add per x
    value, in a short pass of its own. No tensor cores, shared memory or barriers: 8 lanes read
    32 bytes of a row (a sector) per step, one step ahead of their use; each thread holds one
    word of BLOCK_N / (4 * num_warps) rows and the 32 x values of that word, and neg has one fp32
    accumulator per bit of a nibble (4 x 8 rows = 32 independent chains a thread, so the adds do
    not wait on each other). fp32 arithmetic, no TF32. Grid: (cdiv(N, BLOCK_N), split_k),
    M <= BLOCK_M; with SPLIT, program (tile, s) writes its share of K to part[s] like
    ``_gemm_kernel``.
    """
    LANES: tl.constexpr = GEMV_LANES
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    lane = tl.arange(0, LANES)
    bit = tl.arange(0, 4)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW + lane[None, :]
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm
    mask_n = rn < N
    mask_m = rm < M
    neg = tl.zeros((BLOCK_M, BLOCK_N, LANES, 4), tl.float32)
    first_step, end_step = _split_range(tl.cdiv(KW, LANES), split_k, SPLIT)
    # Each step's words are loaded one step ahead, so their DRAM latency hides under the previous
    # step's adds (8 registers more; without it every step stalls on its loads first).
    kw_end = tl.minimum(KW, end_step * LANES)
    kw = first_step * LANES + lane
    words = tl.load(w_rows + first_step * LANES, mask=mask_n[:, None] & (kw < kw_end)[None, :], other=0)
    for step in range(first_step, end_step):
        w = tl.reshape(_replicate(words, 2), (1, BLOCK_N, LANES, 4))
        next_kw = kw + LANES
        words = tl.load(w_rows + (step + 1) * LANES, mask=mask_n[:, None] & (next_kw < kw_end)[None, :], other=0)
        for nibble in tl.static_range(8):
            # Bits 4 * nibble + bit of each word; x past K loads as 0, so padding bits add nothing.
            k = 32 * kw[:, None] + 4 * nibble + bit[None, :]
            xv = tl.load(
                x_rows[:, None, None] + k[None, :, :] * stride_xk,
                mask=mask_m[:, None, None] & (k < K)[None, :, :],
                other=0.0,
            ).to(tl.float32)[:, None, :, :]
            neg = tl.where((w & (1 << (4 * nibble + bit))[None, None, None, :]) != 0, neg + xv, neg)
        kw = next_kw
    # S over this program's share of K, in a pass of its own (in the tile's layout each x value
    # would be loaded and added once more for the rows' copies), summed per lane and bit like neg
    # so that S - 2 neg cancels accumulator by accumulator before the large sums are added up.
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
    _store_result(
        y, rm, rn, M, N, 0, y_ptr, part_ptr, scale_ptr, bias_ptr, stride_ym, stride_yn, has_scale, has_bias, SPLIT
    )


@triton.jit(do_not_specialize=["M", "pad", "has_scale", "has_bias", "split_k"])
def _split_k_epilogue_kernel(
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
    BLOCK: tl.constexpr,
):
    """y[m, n] = epilogue(sum_s part[s, m, n]): the end of a split-K product, in a fixed order."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M * N
    y = tl.zeros((BLOCK,), tl.float32)
    for s in range(split_k):
        y += tl.load(part_ptr + s * M * N + i, mask=mask, other=0.0)
    m, n = i // N, i % N
    y = _epilogue(y, n, mask, pad, scale_ptr, bias_ptr, has_scale, has_bias)
    tl.store(y_ptr + m * stride_ym + n * stride_yn, _to_output(y, y_ptr.dtype.element_ty), mask=mask)


def default_config(x_mode, trans_w, M, N, R, x_dtype, device):
    """Block shapes and launch options for one call (see the module docstring for why).

    Returns a dict with BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages, and either GEMV=True
    (``_gemv_kernel``) or BLOCK_R, GROUP_M, SWAP_AB (``_gemm_kernel``).
    """
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 132
    if x_mode == X_REAL and not trans_w and M <= GEMV_M:
        return gemv_config(M, N, R, sms)
    if M > SMALL_M:
        if x_mode == X_PACKED:
            block_n, block_r = 256, 128  # H100 sweep at 8192^3: 1339 us against 1450 with BLOCK_N = 128
        elif x_mode == X_SIGN:
            block_n, block_r = 256, 64  # 1966 us against 2100
        else:
            block_n, block_r = 128, 64 if x_dtype != torch.float32 else 32
        # At most half as many output tiles as SMs (a moderate batch or a narrow layer: BinaryNet's
        # 8192 -> 1024 linear at batch 256 makes 8 tiles of 128 x 256 for 132 SMs): K is split too,
        # into at most one program per SM (no second wave) and at most 8 shares (the fp32 partial
        # sums cost split * M * N * 8 bytes). Not yet timed: the first H100 run had no such shape.
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, block_n)
        split = _split_k(triton.cdiv(R, block_r), min(sms // tiles, 8)) if 2 * tiles <= sms else 1
        return dict(
            BLOCK_M=128,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            GROUP_M=8,
            SWAP_AB=False,
            SPLIT_K=split,
            num_warps=8,
            num_stages=3,
        )
    # Weight streaming: the weight tile is the wgmma M operand (SWAP_AB, 64 rows), the batch its
    # N operand (16), long K steps with several in flight, and K split so that every SM gets at
    # least two CTAs (N = 8192 alone gives 128 tiles of 64 rows).
    block_n = 128 if trans_w else 64
    if trans_w:
        block_r = 64
    elif x_mode == X_PACKED:
        block_r = 512
    else:
        block_r = 128 if x_mode == X_REAL and x_dtype == torch.float32 else 256
    split = _split_k(triton.cdiv(R, block_r), min(triton.cdiv(2 * sms, triton.cdiv(N, block_n)), 8))
    return dict(
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=block_r, GROUP_M=1, SWAP_AB=True, SPLIT_K=split, num_warps=4, num_stages=4
    )


def gemv_config(M, N, K, sms, block_n=128):
    """The config of ``_gemv_kernel`` for an (M, K) x (N, K)^T product: BLOCK_N rows a program
    (BLOCK_N / 16 a thread: 8 at 128), K split until every SM has about four programs of 4 warps."""
    steps = triton.cdiv(triton.cdiv(K, 32), GEMV_LANES.value)
    split = _split_k(steps, triton.cdiv(4 * sms, triton.cdiv(N, block_n)))
    return dict(GEMV=True, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, SPLIT_K=split, num_warps=4, num_stages=1)


def _split_k(steps, wanted):
    """SPLIT_K for ``steps`` K steps: at most ``wanted`` shares of ``cdiv(steps, split)`` steps each,
    none empty (32 steps in 9 shares of 4 leave the ninth empty: 8 shares do the same work)."""
    share = triton.cdiv(steps, max(min(wanted, steps), 1))
    return triton.cdiv(steps, share)


_UNUSED = {}


def _unused_fp32(device):
    if device not in _UNUSED:
        _UNUSED[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _UNUSED[device]


def _launch(x, words, out, M, N, R, KW, x_mode, trans_w, scale, bias, config):
    if out.numel() == 0:
        return out
    if R == 0:
        # An empty reduction: the dot is 0, the epilogue still applies.
        y = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        y = y * scale.float() if scale is not None else y
        return out.copy_(y + bias.float() if bias is not None else y)
    config = dict(config or default_config(x_mode, trans_w, M, N, R, x.dtype, x.device))
    config.setdefault("SPLIT_K", 1)
    split = config.pop("SPLIT_K")
    gemv = config.pop("GEMV", False)
    # Absent scale / bias / workspace: any fp32 pointer, never read (one pointer type, so one
    # compiled variant).
    unused = _unused_fp32(out.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=out.device) if split > 1 else unused
    scale_ptr = scale if scale is not None else unused
    bias_ptr = bias if bias is not None else unused
    args = (
        x,
        words,
        out,
        scale_ptr,
        bias_ptr,
        part,
        M,
        N,
        R,
        KW,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        int(scale is not None),
        int(bias is not None),
        split,
    )
    # enable_fp_fusion=False: y * scale + bias rounded twice, like torch (bit-exact W1A1).
    if gemv:
        if x_mode != X_REAL or trans_w or config["BLOCK_M"] < M:
            raise ValueError(f"the GEMV kernel computes W1A16 for M <= BLOCK_M, got M={M} with {config}")
        _gemv_kernel[(triton.cdiv(N, config["BLOCK_N"]), split)](
            *args, SPLIT=split > 1, enable_fp_fusion=False, **config
        )
    else:
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]), split)
        _gemm_kernel[grid](
            *args,
            X_MODE=int(x_mode),
            TRANS_W=trans_w,
            SPLIT=split > 1,
            EMULATE_TC=_interpreting(),
            enable_fp_fusion=False,
            **config,
        )
    if split > 1:
        pad = triton.cdiv(R, config["BLOCK_R"]) * config["BLOCK_R"] - R if x_mode != X_REAL else 0
        block = 1024
        _split_k_epilogue_kernel[(triton.cdiv(M * N, block),)](
            part,
            out,
            scale_ptr,
            bias_ptr,
            M,
            N,
            pad,
            out.stride(0),
            out.stride(1),
            *args[-3:],
            BLOCK=block,
            enable_fp_fusion=False,
        )
    return out


def w1a1(
    x, words, K, *, scale=None, bias=None, out_dtype=torch.float32, out=None, config=None, prepack=None, route="int8"
):
    """Binary GEMM: y = sign(x) @ W^T, exact in int32, then y * scale + bias.

    Args:
        x: (M, K) fp32/bf16/fp16 activations (binarized here: x < 0 -> -1, else +1) or int32
            sign words (M, ceil(K/32)) in the bnnops packing format. Any strides.
        words: int32 (N, ceil(K/32)) packed weight, contiguous.
        K: the reduction length.
        scale, bias: optional (N,) float tensors, contiguous.
        out_dtype: dtype of y (fp32, bf16 or fp16); ``out``: a contiguous (M, N) buffer to write.
        config: block shapes (see :func:`default_config`), for sweeps and tests.
        prepack: pack float x with ``pack_signs`` first (True) or binarize it in the kernel
            (False); None: pack first when M > 16 and N > 128 (see the module docstring) unless
            ``config`` is given.
        route: "int8" (default): the kernels of this module. "fp8", for float x: the W1A1 GEMM as
            the 1x1 convolution it is, on ``bnnops.kernels.conv2d``: one launch writes sign(x) and
            the unpacked weight as fp8 e4m3 +-1 (1 byte an element: transient copies of M*K and
            N*K bytes, 64 MiB each at 8192^2), then an implicit GEMM whose fp8
            wgmma Triton 3.6 pipelines (it waits for every int8 one); exact while K <= 2**14, int8
            above. Not yet timed on a GPU: the benchmark case ``gemm_w1a1_fp8`` measures it.

    Returns:
        (M, N) tensor of ``out_dtype``.
    """
    M, N = x.shape[0], words.shape[0]
    out = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=x.device)
    if route == "fp8":
        return _w1a1_as_conv(x, words, scale, bias, out)
    if route != "int8":
        raise ValueError(f"route must be 'int8' or 'fp8', got {route!r}")
    x_mode = X_PACKED if x.dtype == torch.int32 else X_SIGN
    if prepack is None:
        prepack = config is None and M > SMALL_M and N > 128
    if x_mode == X_SIGN and prepack:
        x, x_mode = pack_signs(x), X_PACKED
    return _launch(x, words, out, M, N, K, words.shape[1], x_mode, False, scale, bias, config)


def _w1a1_as_conv(x, words, scale, bias, out):
    """y = sign(x) W^T as a 1x1 convolution of M one-pixel images of K channels (``w1a1``'s "fp8" route)."""
    if x.dtype == torch.int32:
        raise ValueError("w1a1's fp8 route takes float x; packed x runs route='int8'")
    M, K = x.shape
    N, KW = words.shape
    # (M, K) with unit stride along K is a channels-last (M, K, 1, 1) batch, which the prepare pass reads as is.
    images = x.as_strided((M, K, 1, 1), (x.stride(0), x.stride(1), 1, 1))
    conv2d.conv2d(images, words.view(N, 1, 1, KW), bias=bias, scale=scale, out=out.view(M, N, 1, 1))
    return out


def w1a16(x, words, *, scale=None, bias=None, out=None, config=None):
    """Binary-weight GEMM: y = x @ W^T (fp32 accumulation), then y * scale + bias, in x's dtype.

    Args:
        x: (M, K) fp32/bf16/fp16, any strides (fp32 x must be finite: the two-TF32 split turns
            +-inf into NaN). words: int32 (N, ceil(K/32)), contiguous.
        scale, bias: optional (N,) float tensors. out: a contiguous (M, N) buffer of x's dtype.
    """
    M, K = x.shape
    N = words.shape[0]
    out = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    return _launch(x, words, out, M, N, K, words.shape[1], X_REAL, False, scale, bias, config)


def grad_input(g, words, K, *, out=None, config=None):
    """y = g @ W for g (M, N) fp32/bf16/fp16 and W (N, K) packed as words (N, ceil(K/32)).

    The input gradient of both GEMMs: W is read packed, never built dense. y has g's dtype.
    """
    M, N = g.shape
    out = out if out is not None else torch.empty(M, K, dtype=g.dtype, device=g.device)
    return _launch(g, words, out, M, K, N, words.shape[1], X_REAL, True, None, None, config)


def graph_replay(fn):
    """One call of fn captured in a CUDA graph, returned as the graph's replay: fn's GPU work without
    the host's launch cost (how a latency-bound caller runs small batches). fn runs once first, so
    compiling and allocating happen outside the capture."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sweep(shapes=None, configs=None, dtype=torch.bfloat16):
    """Time the table's config and a few others per case on the GPU; print median us and rates.

    ``python -c "from bnnops.kernels import gemm; gemm.sweep()"``: about 12 compiles (1 to 4 s
    each on an H100 host) plus about 0.2 s of timing each, under 40 s. The table's choice is
    marked ``*``; "op" rows time ``torch.ops.bnnops.*`` itself. Batches up to 16 are timed as CUDA
    graph replays (:func:`graph_replay`: GPU time only, split-K's second kernel included), larger
    ones eagerly (host cost included, op dispatch in the "op" rows).

    Args:
        shapes: (name, M, N, K) cases, name one of "w1a1" (the public call with float x: large x is
            packed first), "w1a1-packed" (x given packed), "w1a16"; default the benchmark shapes.
        configs: extra configs (dicts like :func:`default_config` returns) to try in every case.
        dtype: the activations' dtype.
    """
    from triton.testing import do_bench

    shapes = shapes or [
        ("w1a16", 1, 8192, 8192),
        ("w1a16", 16, 8192, 8192),
        ("w1a16", 128, 8192, 8192),
        ("w1a1-packed", 8192, 8192, 8192),
        ("w1a1", 8192, 8192, 8192),
    ]
    sms = torch.cuda.get_device_properties().multi_processor_count
    # What the table does not decide from measurements yet: where the GEMV stops beating the
    # tensor-core small-batch path (39 us at M = 1 and 16 on the first H100 run; counted in SASS
    # from Triton 3.9, the GEMV is about 13 us of instruction issue on 132 SMs at M = 4 with 64-row
    # programs and 27 us at M = 8 with 32-row ones, against about 6 at M = 1),
    # its split and rows per program; the large W1A16 config at M = 128 (100 us in the sweep,
    # 179 us through the op in the benchmark).
    small_batch = dict(
        BLOCK_M=16, BLOCK_N=64, BLOCK_R=256, GROUP_M=1, SWAP_AB=True, SPLIT_K=3, num_warps=4, num_stages=4
    )
    candidates = {
        "w1a16": [
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=128, GROUP_M=8, SWAP_AB=False, SPLIT_K=1, num_warps=8, num_stages=3)
        ],
        "w1a1-packed": [
            dict(BLOCK_M=128, BLOCK_N=256, BLOCK_R=128, GROUP_M=8, SWAP_AB=False, SPLIT_K=1, num_warps=8, num_stages=4)
        ],
    }
    for name, M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        # do_bench flushes L2 before every call, so the weight is read from HBM each time.
        words = torch.randint(-(2**31), 2**31, (N, triton.cdiv(K, 32)), device="cuda", dtype=torch.int64).to(
            torch.int32
        )
        x_mode = {"w1a1": X_SIGN, "w1a1-packed": X_PACKED, "w1a16": X_REAL}[name]
        if x_mode == X_PACKED:
            x = pack_signs(x)
        default = default_config(x_mode, False, M, N, K, x.dtype, x.device)
        if x_mode == X_REAL and M <= SMALL_M:
            # The GEMV at 256 // BLOCK_M and 128 // BLOCK_M rows a program, within 16..128 (its
            # registers grow with BLOCK_M * BLOCK_N), the first with its split halved and doubled;
            # then the tensor-core path.
            bm = triton.next_power_of_2(M)
            gemv = [gemv_config(M, N, K, sms, rows) for rows in (256 // bm, 128 // bm) if 16 <= rows <= 128]
            gemv += [
                dict(gemv[0], SPLIT_K=max(gemv[0]["SPLIT_K"] // 2, 1)),
                dict(gemv[0], SPLIT_K=2 * gemv[0]["SPLIT_K"]),
            ]
            tried = [default] + [c for c in gemv + [small_batch] if c != default] + ["op"]
        elif x_mode == X_REAL:
            tried = [default] + candidates["w1a16"] + ["op"]
        elif x_mode == X_PACKED:
            tried = [default] + candidates[name]
        else:
            tried = ["op"]
        for config in tried + list(configs or []):

            def call(config=config):
                if config == "op" and x_mode == X_REAL:
                    return torch.ops.bnnops.binary_linear_w1a16(x, words, None, None)
                if config == "op":
                    return torch.ops.bnnops.binary_linear_w1a1(x, words, K, None, None, dtype)
                if x_mode == X_REAL:
                    return w1a16(x, words, config=config)
                return w1a1(x, words, K, out_dtype=dtype, config=config)

            try:
                # Small batches as graph replays: eagerly the host's launch cost (tens of us) hides the kernel.
                ms = do_bench(graph_replay(call) if M <= SMALL_M else call, warmup=10, rep=40, return_mode="median")
            except Exception as e:  # a config that does not fit (shared memory, registers) is skipped
                print(f"{name} M={M} N={N} K={K}: {config} failed: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            tops, weight_gbs = 2 * M * N * K / ms / 1e9, words.numel() * 4 / ms / 1e6
            what = "torch.ops.bnnops (the table's config)" if config == "op" else config
            print(
                f"{'*' if config is default else ' '} {name:11s} M={M:5d} N={N} K={K}: {ms * 1e3:9.1f} us "
                f"{tops:7.1f} TOPS {weight_gbs:7.1f} GB/s of packed W  {what}",
                flush=True,
            )
