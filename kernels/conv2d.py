"""Triton implicit-GEMM conv2d over bit-packed +-1 weights (binary and binary-weight convolution).

What it computes (``bnnops.conv`` holds the pure-PyTorch reference): with ``x`` (N, C, H, W), the
packed weight of a logical +-1 weight (O, C/groups, kh, kw), and ``P`` the input padded with
``pad_value`` (0, or +1 / -1: larq's ``pad_values``, which keeps every binary input exactly +-1),

    y[n, o, p, q] = scale[o] * sum_{c,r,s} a(P[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw]) * w[o, c, r, s] + bias[o]

with g the group of output channel o, Cg = C/groups, and a() = sign() (W1A1, sign(0) = +1: the sum
is an exact integer) or the identity (W1A16: real inputs, e.g. a first layer).

Two launches per call:

1. ``_prepare_kernel`` writes both GEMM operands in the dot's dtype, in one launch (programs
   [0, n_x) do the input, the rest the weight): the input as a channels-last copy *with the padding
   written in* (N, H + pads, W + pads, C), holding sign(x) as +-1 (W1A1: fp8 e4m3 by default, or
   int8; 1 byte an element) or x itself (W1A16: fp32), and the pad value on the border; and the
   packed weight unpacked to +-1, (O, kh, kw, 32*ceil(Cg/32)), bit j of word [o, r, s, w] becoming
   element [o, r, s, 32w + j] (the ``bnnops.packing`` layout; padding bits unpack to +1 and meet
   zeros of A, see below).
2. ``_conv2d_kernel``, the implicit GEMM: rows are output pixels (M = N*OH*OW), columns the output
   channels of one group (Og; grid axis 1 is the group), and the reduction K = kh*kw*Cg walks tap by
   tap, BLOCK_K channels at a time. No im2col tensor exists: a K step loads the [BLOCK_M, BLOCK_K]
   window of its tap from the padded copy (every tap of every output pixel lies inside it: no
   bounds checks, no pad-value select; rows past M are clamped, not masked) and a [BLOCK_K,
   BLOCK_N] slab of weight, and does one ``tl.dot``: fp8 e4m3 into fp32 or int8 into int32 (both
   exact: fp8 while K <= FP8_EXACT_K, above which "int8" runs), or for W1A16 TF32 (exact products of
   a 16-bit input and +-1) or 3xTF32 (fp32 inputs). Channels past the group's Cg (the K tail) are
   masked to 0 on both operands, only when Cg is not a multiple of BLOCK_K (EVEN_K). The epilogue
   multiplies by the per-output-channel scale, then adds the bias, in fp32 *without FMA contraction*
   (``enable_fp_fusion=False``: two roundings, as torch's separate mul and add, so an W1A1 result
   equals the reference bit for bit), and stores in the input's dtype; the output is channels_last
   when the input is. A channels-last tile stores 16-byte vectors along the channels. An NCHW
   output has each channel's pixels consecutive instead: without more, the store went one
   element per channel per thread (scattered 2-byte stores, counted in SASS); when OH*OW is a
   multiple of 2, 4 or 8 (``OUT_VEC``, :func:`_pixel_run`) the kernel tells the compiler that aligned
   runs of that many rows are consecutive pixels of one image, and the store runs along them in
   vectors (16 bytes at 8; SASS for sm_90, Triton 3.9: every picked config, not yet timed). Full
   vectors also need the image and channel strides to be multiples of 16 elements (Triton
   specializes on that); otherwise the compiler stores narrower pieces, still correctly.

Why the operands are materialized (counted in the K loop's SASS, sm_90, Triton 3.6, per warp per K
step at BLOCK 128x128x128 and 8 warps, where the MMA takes 512 clocks): with 1-byte +-1 operands in
memory and no masks the loop is 87 instructions (168 with the row and K masks of the first version)
and Triton makes the fp8 wgmma asynchronous (``warp_group_dot_wait`` pendings=1: the next step's
loads overlap the MMA); binarizing x in the loop cost 545 instructions and a synchronous wgmma,
substituting the pad value in the loop 435, unpacking weight bits in the loop 680-780 with a
synchronous wgmma, reading bit-packed activations 1000-2600 with spills. Triton waits for an int8
wgmma at once (pendings=0), hence fp8 by default. Every config picked for ResNet-18 issues its loop
in a quarter of its MMA time or less (e.g. 128x256x128: 112 instructions, 224 issue clocks against
1024 MMA clocks), so the MMA issue rate is not what limits it.

Two numbers for ResNet-18's 3x3 stride-1 layers at batch 256, W1A1, bf16 in and out (every such
layer does 2*M*N*K = 59.2 G operations: 30 us at the H100's 1979 dense fp8/int8 TOPS, 60 us at the
989 bf16 TFLOP/s of the cuDNN baseline):

- fewest bytes, x read once and y written once in bf16: 206 MB for conv2_x (56x56x64: 51.4M
  elements each), 69 us at 3.0 TB/s. The prepare pass reads x (103 MB) and writes the padded fp8
  copy (55 MB, which the kernel reads back): ~55 us on conv2_x at 2.9 TB/s, ~8 us on conv5_x.
- what the K loop moves from L2 to the SMs, the real limit: each input element once per tap (9
  times for 3x3) and once per column tile, the weight once per row tile, BLOCK_M*BLOCK_K +
  BLOCK_K*BLOCK_N bytes per 2*BLOCK_M*BLOCK_N*BLOCK_K operations. An SM's tensor cores do 8192
  8-bit operations a clock but H100's L2 delivers ~5.5 TB/s in all, ~23 bytes per SM per clock.
  The first GPU run fits this: conv5_x at 128x128 tiles moved 462 MB in ~85 us (5.4 TB/s). Hence
  large tiles (pick_config): conv2_x 256x64 (577 MB + 103 MB of output: ~125 us), conv3_x 256x128
  (~370 MB: ~68 us); the model favoured 128x256 for conv4_x and conv5_x, but the second GPU run
  measured fuller waves of 128-wide tiles faster there (MIN_WAVES). Async copies bypass L1 (cp.async.cg, whatever the cache modifier), so the 9 taps'
  overlapping windows are not reused on chip; that, TMA multicast or a 256x256 tile (more registers
  than a Triton 3.6 warpgroup has) is what a faster design would need.

Predicted for the op at batch 256 (prepare + kernel), from these bytes: conv2_x ~180 us (cuDNN bf16
147.5 us in the first run; an earlier version of this estimate counted x's elements as bytes),
conv3_x ~90 (92.6), conv4_x ~75 (76.7), conv5_x ~70 (84): about 0.8-1.2x cuDNN, short of the 1.5x
target. Measured in the first GPU run with the previous version (three
launches, autotuned, BLOCK_K = 128 against Cg = 64 on conv2_x, i.e. half of every step masked):
256 us on conv2_x (sign pass alone 58.6 us, 1.8 TB/s) and 98-117 us on conv5_x; through the op at
batch 64 every layer took ~400 us: host time (custom-op dispatch, three Triton launches, the
autotuner, ~3 us per host call of triton.cdiv), which this version cuts to two launches and ~36 us
of launcher Python on a slow CPU.
Measured in the second GPU run (H100, batch 256, CUDA events; bench/results/): the kernel with the
configs picked then took 171.9 us on conv2_x (cuDNN bf16 146.7: 0.85x), 107.9 on conv3_x (92.3:
0.86x), 85.1 on conv4_x (75.3) and 88.8 on conv5_x (88.4); the 128x128 tiles now picked for the
last two ran 72.9 us (1.03x) and 60.1 us (1.47x, 985 TOPS). The op adds ~130 us of host time per
call (custom-op dispatch ~30 us, launcher ~75 us, on that machine), so eager calls on small problems
are host-bound: at batch 64 every layer took 170-230 us against cuDNN's 30-47 us.
"""

import functools
import os

import torch
import triton
import triton.language as tl

# A-operand modes of the kernel (constexpr): what the padded copy holds and how the dot runs.
A_REAL = 0  # fp32 copy of x (W1A16): TF32 / 3xTF32 dot into fp32
A_INT8 = 1  # int8 +-1 (W1A1): int8 dot into int32
A_FP8 = 2  # fp8 e4m3 +-1 (W1A1): fp8 dot into fp32
ROUTES = {"fp8": A_FP8, "int8": A_INT8}
# Hopper's fp8 MMA adds into an accumulator of about 14 significant bits (1 sign, 8 exponent, 13
# mantissa: the DeepSeek-V3 report's "around 14 bits"), so sums of +-1 products are exact while
# |sum| <= K <= 2**14; beyond that the "fp8" route falls back to "int8".
FP8_EXACT_K = 2**14
# Operand dtype of the dot, per A mode: what the prepare pass writes.
DOT_DTYPES = {A_REAL: torch.float32, A_INT8: torch.int8, A_FP8: torch.float8_e4m3fn}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter runs one program at a time in numpy: one small config.
INTERPRETER_CONFIG = (32, 32, 32, 4, 1)
# W1A16's fp32 operand tiles take 4 bytes an element: a small BLOCK_K keeps its stages in shared memory.
W1A16_CONFIG = (64, 64, 32, 4, 3)
# Output tiles per SM below which pick_config shrinks the tile. Two, measured on an H100 (batch 256,
# bench/results/ second run): conv5_x (7x7x512) ran 88.8 us in 196 tiles of 128x256, 71.7 us in 196
# of 256x128 and 60.1 us in 392 of 128x128; conv4_x 85.1 / 74.1 / 72.9 us. Fuller waves won, and
# 256-wide column tiles lost to 128-wide ones everywhere, so columns stop at 128.
MIN_WAVES = 2
# Prepare pass: elements of x per program (16 KB of bf16 read) and words of weight per program.
PREP_ELEMENTS = 8192
PREP_WORDS = 128


def _cdiv(a, b):
    # Not triton.cdiv on the host: a ConstexprFunction call costs ~3 us, a launch needs several.
    return -(-a // b)


def _tile(block_m, block_n, block_k):
    # 8 warps (two warpgroups) from 128x128 up: the fp32 accumulator takes 64-128 registers a thread.
    # Stages: 3 at BLOCK_K = 128 (147 KB of shared memory at 256x128), 4 below.
    return block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 128 else 4, 3 if block_k == 128 else 4


def pick_config(M, Og, Cg, a_mode, n_sms=132, out_bytes=2):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a problem, without tuning.

    The K loop is bound by what L2 delivers to the SMs (module docstring): BLOCK_M*BLOCK_K +
    BLOCK_K*BLOCK_N bytes per 2*BLOCK_M*BLOCK_N*BLOCK_K operations, so the tile is as large as
    the registers allow: 256x64 or 256x128 by Og (no column tile wider than the group's channels;
    128x256 compiles too but measured slower), at most 128x128 for fp32 outputs (``out_bytes`` 4: the epilogue then spills at
    256x128). It is halved along its longer side while it would give fewer than MIN_WAVES tiles
    per SM (small batches, small maps), down to 64x64. BLOCK_K <= Cg: a larger one masks part of
    every step (half of it on ResNet's Og = Cg = 64 layers at 128). The configs it picks for
    ResNet-18's layers compile for sm_90 without spills (tests/test_conv2d.py).
    """
    if _INTERPRET:
        return INTERPRETER_CONFIG
    if a_mode == A_REAL:
        return W1A16_CONFIG
    block_k = 128 if Cg >= 128 else 64 if Cg >= 64 else 32
    block_n = 128 if Og >= 128 else 64
    block_m = 256
    largest = 128 * 128 if out_bytes > 2 else 256 * 128
    while block_m * block_n > 64 * 64 and (
        block_m * block_n > largest or _cdiv(M, block_m) * _cdiv(Og, block_n) < MIN_WAVES * n_sms
    ):
        if block_n > block_m:
            block_n //= 2
        else:
            block_m //= 2
    return _tile(block_m, block_n, block_k)


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
    BINARIZE: tl.constexpr,
    X_CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    """Programs [0, n_x_programs): x (N, C, H, W), any strides -> a (N, Hp, Wp, C) contiguous in a's
    dtype: sign(x) as +-1 (BINARIZE, sign(0) = +1) or x, and pad_value on the border (pad_h above,
    pad_w left). The rest: int32 words (n_words) -> w (n_words, 32) as +-1 in w's dtype."""
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
        if X_CHANNELS_LAST:
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


@triton.jit
def _conv2d_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    bias_ptr,
    M,
    OH,
    OW,
    Wp,
    HWp,
    C,
    Cg,
    Og,
    n_taps,
    KW,
    son,
    soc,
    soh,
    sow,  # strides of the output
    stride_h,
    stride_w,
    dil_h,
    dil_w,
    A_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_VEC: tl.constexpr,
):
    # Output-channel tiles of one pixel tile are neighbours in launch order, so they share its
    # input window in L2; the weight (a few MB at most) stays in L2 for the whole launch.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(Og, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    group = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # Rows past M load row M - 1 (their results are never stored): no row mask in the K loop.
    m = tl.minimum(offs_m, M - 1)
    img = m // (OH * OW)
    pix = m % (OH * OW)
    # Element offset of the window's top-left corner in the padded copy (N, Hp, Wp, C), this group's
    # first channel; tap (r, s) adds (r*dil_h*Wp + s*dil_w) * C.
    a_row = (img.to(tl.int64) * HWp + (pix // OW) * stride_h * Wp + (pix % OW) * stride_w) * C + group * Cg

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Og
    o_glob = group * Og + offs_n
    # The unpacked weight is (O, kh, kw, Kw) contiguous, Kw = 32 * ceil(Cg / 32); columns past Og
    # load the group's last channel (never stored).
    Kw = tl.cdiv(Cg, 32) * 32
    w_col = (group * Og + tl.minimum(offs_n, Og - 1)).to(tl.int64) * (n_taps * Kw)

    offs_k = tl.arange(0, BLOCK_K)
    if A_MODE == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # One flat loop over (tap, channel block) so the compiler can software-pipeline all of K; the
    # tap's offsets advance as scalar counters (a division by runtime values costs ~20 instructions).
    row_jump = (dil_h * Wp - KW * dil_w) * C  # from past the last tap of a row to the next row
    s = 0
    c0 = 0
    a_tap = 0  # (r*dil_h*Wp + s*dil_w) * C
    w_tap = 0  # (r*KW + s) * Kw
    for _ in range(0, n_taps * tl.cdiv(Cg, BLOCK_K)):
        c = c0 + offs_k
        a_ptrs = a_ptr + a_row[:, None] + (a_tap + c)[None, :]
        b_ptrs = w_ptr + w_col[None, :] + (w_tap + c)[:, None]
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            # Past the group's channels (the K tail) both operands read 0: the weight's padding
            # bits (+1) then meet zeros, and A never reads the next group's channels.
            c_ok = c < Cg
            a = tl.load(a_ptrs, mask=c_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=c_ok[:, None], other=0.0)
        if A_MODE == 0:
            # TF32 products of a 16-bit input and +-1 are exact (tf32 holds bf16's exponent and
            # fp16's mantissa); fp32 inputs use 3xTF32 (PRECISION) for fp32 accuracy. W1A16 is
            # the few-channel first layer, not the hot path.
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)
        elif A_MODE == 1:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            # +-1 and 0 are exact in fp8 and so are their products; the sums are exact integers
            # for K <= FP8_EXACT_K. Triton pipelines an fp8 wgmma (the next step's loads and
            # address math overlap it) but waits for an int8 one at once: the point of this mode.
            acc = tl.dot(a, b, acc)

        # Selects, not branches: the loop body stays one block for the software pipeliner.
        c0 += BLOCK_K
        next_tap = c0 >= Cg
        c0 = tl.where(next_tap, 0, c0)
        s = tl.where(next_tap, s + 1, s)
        a_tap = tl.where(next_tap, a_tap + dil_w * C, a_tap)
        w_tap = tl.where(next_tap, w_tap + Kw, w_tap)
        next_row = s == KW
        s = tl.where(next_row, 0, s)
        a_tap = tl.where(next_row, a_tap + row_jump, a_tap)

    # ---- epilogue: per-output-channel scale, then bias, in fp32 (no FMA: see the launch) ----
    y = acc.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)[None, :]
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    if OUT_VEC > 1:
        # NCHW-like output (soh == OW, sow == 1) and OH*OW a multiple of OUT_VEC: every aligned run
        # of OUT_VEC rows stays in one image at consecutive pixels. Said to the compiler, the store
        # runs along the pixels (16-byte vectors) instead of one scattered element per channel.
        img = tl.max_constancy(img, OUT_VEC)
        pix = tl.max_contiguous(tl.multiple_of(pix, OUT_VEC), OUT_VEC)
        out_row = img.to(tl.int64) * son + pix
        m_ok = img < M // (OH * OW)  # the same rows as offs_m < M, visibly constant over a run
    else:
        out_row = img.to(tl.int64) * son + (pix // OW) * soh + (pix % OW) * sow
    out_ptrs = out_ptr + out_row[:, None] + o_glob.to(tl.int64)[None, :] * soc
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache
def _sm_count(device):
    return 1 if _INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _pixel_run(out):
    """The kernel's OUT_VEC: for an output whose pixels are consecutive per channel (NCHW), the
    largest power of two up to 8 (16 bytes of bf16) that divides OH*OW, so aligned runs of that
    many rows never cross an image; 1 (no promise) for any other layout."""
    OH, OW = out.shape[2:]
    if out.stride(3) != 1 or out.stride(2) != OW:
        return 1
    hw = OH * OW
    return min(8, hw & -hw)


def output_size(size, kernel, stride, pad_before, pad_after, dilation):
    """Output length of one spatial dimension (the formula of torch.nn.Conv2d)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def output_is_channels_last(x):
    """The output takes the input's memory format: channels_last when x is only channels_last-contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def prepare(x, words, dtype, binarize=True, padding=(0, 0, 0, 0), pad_value=0.0):
    """The two GEMM operands of :func:`conv2d` in ``dtype``, written by one launch.

    Returns ``(a, w)``: a = the input, binarized to +-1 (``binarize``) or as is, channels-last and
    padded with ``pad_value``: (N, H + top + bottom, W + left + right, C); w = the packed ``words``
    (O, kh, kw, n) unpacked to +-1: (O, kh, kw, 32 n).
    """
    N, C, H, W = x.shape
    pt, pb, pl, pr = padding
    Hp, Wp = H + pt + pb, W + pl + pr
    P, n_words = N * Hp * Wp, words.numel()
    a = torch.empty((N, Hp, Wp, C), dtype=dtype, device=x.device)
    w = torch.empty((*words.shape[:-1], 32 * words.shape[-1]), dtype=dtype, device=x.device)
    block_c = min(64, 1 << max(C - 1, 0).bit_length())
    block_p = PREP_ELEMENTS // block_c
    n_x = _cdiv(P, block_p) * _cdiv(C, block_c) if P * C else 0
    n_w = _cdiv(n_words, PREP_WORDS)
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
            *x.stride(),
            n_x,
            n_words,
            BINARIZE=binarize,
            X_CHANNELS_LAST=x.stride(1) == 1,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            BLOCK_WORDS=PREP_WORDS,
            num_warps=8,
        )
    return a, w


def conv2d(
    x,
    words,
    *,
    bias=None,
    scale=None,
    stride=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    groups=1,
    pad_value=0.0,
    binarize=True,
    route="fp8",
    out=None,
    config=None,
):
    """Binary (W1A1) or binary-weight (W1A16) conv2d of ``x`` with a packed +-1 weight.

    Args:
        x: (N, C, H, W) float32, bfloat16 or float16, any strides (NCHW and channels_last are read
            natively by the prepare pass; channels_last is the fast one).
        words: int32 (O, kh, kw, ceil(Cg/32)) packed weight, Cg = C / groups (``bnnops.packing``
            layout), contiguous.
        bias, scale: optional contiguous (O,) float tensors: y = scale * conv + bias, in fp32.
        stride, dilation: (sh, sw), (dh, dw). padding: (top, bottom, left, right).
        groups: divides C and O. pad_value: 0.0, 1.0 or -1.0, the value the input is padded with.
        binarize: True for W1A1 (sign of x, exact sums), False for W1A16 (x as is).
        route: the W1A1 operand dtype, "fp8" (runs "int8" when kh*kw*Cg > FP8_EXACT_K) or
            "int8"; ignored for W1A16.
        out: optional output (N, O, OH, OW) of x's dtype to write into (any strides).
        config: optional (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) instead of
            :func:`pick_config` (sweeps).

    Returns:
        (N, O, OH, OW) in x's dtype, channels_last when x is (:func:`output_is_channels_last`).
        No input checks: ``bnnops.conv`` validates.
    """
    N, C, H, W = x.shape
    O, KH, KW, _ = words.shape
    Cg, Og = C // groups, O // groups
    pt, pb, pl, pr = padding
    OH = output_size(H, KH, stride[0], pt, pb, dilation[0])
    OW = output_size(W, KW, stride[1], pl, pr, dilation[1])
    if out is None:
        fmt = torch.channels_last if output_is_channels_last(x) else torch.contiguous_format
        out = torch.empty((N, O, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out

    a_mode = ROUTES[route] if binarize else A_REAL
    if a_mode == A_FP8 and KH * KW * Cg > FP8_EXACT_K:
        a_mode = A_INT8
    a, w = prepare(x, words, DOT_DTYPES[a_mode], binarize, padding, pad_value)

    M = N * OH * OW
    block_m, block_n, block_k, warps, stages = config or pick_config(
        M, Og, Cg, a_mode, _sm_count(x.device), out.element_size()
    )
    dummy = out  # never read when HAS_SCALE / HAS_BIAS is False
    grid = (_cdiv(M, block_m) * _cdiv(Og, block_n), groups)
    _conv2d_kernel[grid](
        a,
        w,
        out,
        dummy if scale is None else scale,
        dummy if bias is None else bias,
        M,
        OH,
        OW,
        a.shape[2],
        a.shape[1] * a.shape[2],
        C,
        Cg,
        Og,
        KH * KW,
        KW,
        *out.stride(),
        stride[0],
        stride[1],
        dilation[0],
        dilation[1],
        A_MODE=a_mode,
        PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
        EVEN_K=Cg % block_k == 0,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        OUT_VEC=_pixel_run(out),
        num_warps=warps,
        num_stages=stages,
        # Two roundings in the epilogue (scale, then bias), as the reference's separate mul and add.
        enable_fp_fusion=False,
    )
    return out
