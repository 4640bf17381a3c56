"""Triton kernels for binary GEMM: packed +-1 weights times binary or real activations.

One kernel, ``_gemm_kernel``, computes ``y[M, N] = A[M, R] @ B[R, N]`` on the tensor cores with the
packed operand unpacked in registers, in three roles:

- **A1W1** (:func:`a1w1`): ``y = sign(x) W^T`` with W (N, K) packed. The +-1 operands are int8 and
  ``tl.dot`` accumulates exactly in int32. x is float (binarized in the kernel) or packed words.
- **W1A16** (:func:`w1a16`): ``y = x W^T`` for real x (fp32, bf16, fp16); W is unpacked to x's
  dtype and ``tl.dot`` accumulates in fp32 (fp32 x as two TF32 products, error about 2^-20 |x|).
- **grad_input** (:func:`grad_input`): ``y = g W`` (g (M, N), W (N, K) packed), the backward of both;
  here the packed dimension K is the output dimension.

Every launcher fuses the epilogue ``y = acc * scale[n] + bias[n]`` (per output channel, optional).

The two numbers (H100 SXM: 1979 dense int8 TOPS, 989 bf16 TFLOP/s, 3.35 TB/s HBM):

- A1W1, M = N = K = 8192: 2 * 8192^3 = 1.1e12 int8 ops, 0.56 ms at peak. Fewest bytes: x once
  (bf16 128 MB, or packed 8 MB) + W packed 8 MB + y fp32 256 MB, about 0.13 ms: compute-bound.
  bf16 ``torch.matmul`` on the same +-1 values runs at about 800 TFLOP/s (1.37 ms), so 1.6x of it
  is 0.86 ms, 65% of int8 peak.
- W1A16, M = 1, N = K = 8192: 1.3e8 flops (nothing). Fewest bytes: W packed 8 MB (+ 16 KB of x
  and y), 2.5 us at 3.35 TB/s; bf16 ``torch.matmul`` reads 128 MB, about 43 us, so 8x of it is
  5.4 us. Memory-bound on paper, but 67M weights must each be unpacked: at 64 INT32 lanes per SM
  per clock that is 4 us per integer op per weight, so the unpack must cost about one integer op
  per weight.

Why the code looks like this (measured by compiling offline for sm_90a and counting SASS in the
main loop; the lead's GPU run has the timings):

- Unpacking happens in registers, several values per integer op. ``tl.join`` replicates each word
  inside its thread, so a thread owns whole words and all shift amounts are immediates; Triton's
  default layout instead spreads a word's 32 bits over 32 lanes (one shared-memory load per bit).
  int8: one 32-bit lane holds four +-1 bytes, made by a shift, a mask and one multiply-add
  (``bits * 0xFE + 0x01010101``; the bytes cannot carry). In ``INTERLEAVED`` order (bits j, j+8,
  j+16, j+24 of a word share a lane) that is 0.5 ALU ops per weight; in natural order a nibble
  spread by a multiply costs 0.75. 16-bit: two +-1 halves per lane from two bits by one multiply
  (``* 0x40008000`` puts them at bits 15 and 31), then ``| 0x3F803F80`` (bf16 one).
- Both A1W1 operands are unpacked with the same (interleaved) permutation of K, which leaves the
  dot product unchanged, so packed activations cost what packed weights cost. Float activations
  binarized in the kernel cost about 2.5 ops per value and every column of tiles redoes them:
  :func:`a1w1` packs them once first (``pack_signs``, one pass over x) when the grid has more than
  one column of tiles and M is not small, and binarizes in the kernel otherwise.
- A1W1 tiles are 128 x 128 x 128 with 8 warps: about 170 instructions per warp per K step for
  512 tensor-core cycles, under 128 registers, so two CTAs share an SM and one's unpacking hides
  behind the other's wgmma (Triton waits for each wgmma before the next step's unpack).
- Small batch (M <= 16): BLOCK_M = 16 (mma.sync), long K steps and deep cp.async pipelining, so
  the packed weight streams at memory speed; the unpack cost per weight is paid once per weight.
- Padding: the word holding k >= K is masked to zero bits (+1) in both int8 operands, float
  activations past K load as 0.0 (+1), so each padded position adds exactly +1 to the int32 dot
  and the epilogue subtracts their count. Real activations past K load as 0 and add nothing.

Sweep block shapes on a GPU with :func:`sweep` (``python -c "from bnnops.kernels import gemm;
gemm.sweep()"``).
"""

import os

import torch
import triton
import triton.language as tl

from bnnops.kernels.pack import pack_signs

# What x holds (the kernel's X_MODE): real values, floats to binarize, or packed sign words.
X_REAL, X_SIGN, X_PACKED = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# Batch sizes up to this use the small-batch configs (BLOCK_M = 16, weight streaming).
SMALL_M = 16

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

    Bit 1 is -1, bit 0 is +1. Natural order: column 32*w + j is bit j of word w. INTERLEAVED (int8
    only): column 32*w + 4*j + i is bit j + 8*i of word w, a permutation of K that is cheaper to
    produce; use it for both operands of a dot, whose sum it leaves unchanged.
    """
    w = words.to(tl.uint32, bitcast=True)
    if DTYPE == tl.float32:
        w = tl.reshape(_replicate(w, 5), (R, BKW, 32))
        j = tl.arange(0, 32)[None, None, :]
        values = (((w << (31 - j)) & 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)
    elif DTYPE == tl.int8:
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
        # Two 16-bit values per lane, bits j = 2h and j + 1 of the word (j <= 14; the upper half
        # of the word is shifted down first): masked, one multiply moves them to bits 15 and 31
        # (the sign bits; the copies it also makes at bits 16 and 30 are masked off), then the
        # exponent of 1.0 is or-ed in. Two integer ops and one multiply per two values.
        ONE: tl.constexpr = 0x3F803F80 if DTYPE == tl.bfloat16 else 0x3C003C00
        w = tl.reshape(_replicate(w, 4), (R, BKW, 16))
        h = tl.arange(0, 16)[None, None, :]
        j = 2 * (h % 8)
        pair = tl.where(h < 8, w, w >> 16) & (3 << j)
        lanes = ((pair * ((1 << (15 - j)) + (1 << (30 - j)))) & 0x80008000) | ONE
        lanes = tl.reshape(_replicate(lanes, 1), (R, BKW, 16, 2)) >> (16 * tl.arange(0, 2))[None, None, None, :]
        values = lanes.to(tl.int16).to(DTYPE, bitcast=True)
    return tl.reshape(values, (R, BKW * 32))


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
    if OUT_T == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(y != y, y.to(tl.bfloat16), rounded)
    return y.to(OUT_T)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, y_ptr, scale_ptr, bias_ptr,
    M, N, R, KW,
    stride_xm, stride_xr, stride_ym, stride_yn,
    X_MODE: tl.constexpr, TRANS_W: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = (A[M, R] @ B[R, N]) * scale[N] + bias[N], B from packed words w.

    A is x: real values (X_REAL), floats binarized here (X_SIGN), or int32 sign words (X_PACKED,
    (M, ceil(R/32)) with strides in words). B: TRANS_W = 0 -> B = W^T, W (N, R) as words (N, KW),
    KW = ceil(R/32); TRANS_W = 1 -> B = W, W (R, N) as words (R, KW), KW = ceil(N/32).
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
    if INT:
        DOT_T: tl.constexpr = tl.int8
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    else:
        DOT_T: tl.constexpr = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if TRANS_W:
        cw = pid_n * BNW + tl.arange(0, BNW)
    else:
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW

    n_steps = tl.cdiv(R, BLOCK_R)
    for step in range(n_steps):
        r = step * BLOCK_R + tl.arange(0, BLOCK_R)
        rw = step * BRW + tl.arange(0, BRW)
        if X_MODE == X_PACKED:
            xw = tl.load(x_rows + rw[None, :] * stride_xr, mask=mask_m[:, None] & (rw < KW)[None, :], other=0)
            if step == n_steps - 1:  # only the last word can hold padding bits
                xw = xw & _valid_bits(rw, R)[None, :]
            a = _unpack_tile(xw, BLOCK_M, BRW, tl.int8, True)
        else:
            xv = tl.load(x_rows + r[None, :] * stride_xr, mask=mask_m[:, None] & (r < R)[None, :], other=0.0)
            if X_MODE == X_SIGN:
                # Compare through fp32: exact for every dtype (and the interpreter lacks bf16 math).
                a = tl.where(xv.to(tl.float32) < 0, -1, 1).to(tl.int8)
            else:
                a = xv
        if TRANS_W:
            words = tl.load(w_ptr + r.to(tl.int64)[:, None] * KW + cw[None, :],
                            mask=(r < R)[:, None] & (cw < KW)[None, :], other=0)
            b = _unpack_tile(words, BLOCK_R, BNW, DOT_T, False)
        else:
            words = tl.load(w_rows + rw[None, :], mask=mask_n[:, None] & (rw < KW)[None, :], other=0)
            if INT and step == n_steps - 1:
                words = words & _valid_bits(rw, R)[None, :]
            b = tl.trans(_unpack_tile(words, BLOCK_N, BRW, DOT_T, X_MODE == X_PACKED))
        if INT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif DOT_T == tl.float32:
            # Two TF32 products: +-1 is exact in TF32 and x = hi + lo with hi its top 10
            # mantissa bits, so only lo (already < 2^-10 |x|) is rounded: about 2^-20 |x|.
            a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            acc = tl.dot(a_hi, b, acc, input_precision="tf32")
            acc = tl.dot(a - a_hi, b, acc, input_precision="tf32")
        elif UPCAST_BF16:
            # Triton's interpreter gets bf16 dots wrong; bf16 products are exact in fp32, so this
            # is the tensor cores' arithmetic (exact products, fp32 sums) on the unpacked bf16.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)

    y = acc.to(tl.float32)
    if INT:
        # Each padded position k in [R, n_steps * BLOCK_R) was +1 times +1.
        y = y - (n_steps * BLOCK_R - R)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, _to_output(y, y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def default_config(x_mode, trans_w, M, N, x_dtype):
    """Block shapes and launch options for one call (see the module docstring for why).

    Returns a dict with BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M, num_warps, num_stages.
    """
    if M <= SMALL_M:
        # Weight streaming: the packed W is the traffic, so long K steps, many stages in flight.
        if trans_w:
            return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_R=64, GROUP_M=1, num_warps=4, num_stages=4)
        if x_mode == X_REAL:
            return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=256, GROUP_M=1, num_warps=4, num_stages=4)
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=512, GROUP_M=1, num_warps=4, num_stages=4)
    if x_mode == X_PACKED:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=128, GROUP_M=8, num_warps=8, num_stages=3)
    if x_mode == X_SIGN:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)
    if x_dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)


def _launch(x, words, out, M, N, R, KW, x_mode, trans_w, scale, bias, config):
    config = dict(config or default_config(x_mode, trans_w, M, N, x.dtype))
    if out.numel() == 0:
        return out
    if R == 0:
        # An empty reduction: the dot is 0, the epilogue still applies.
        y = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        y = y * scale.float() if scale is not None else y
        return out.copy_(y + bias.float() if bias is not None else y)
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    _gemm_kernel[grid](
        x, words, out,
        scale if scale is not None else out, bias if bias is not None else out,
        M, N, R, KW,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        X_MODE=x_mode, TRANS_W=trans_w, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        UPCAST_BF16=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        **config,
    )
    return out


def _prepack(x, M, N, config):
    """Whether :func:`a1w1` packs float activations first: see the module docstring."""
    if config is not None:
        return False
    return M > SMALL_M and N > default_config(X_PACKED, False, M, N, x.dtype)["BLOCK_N"]


def a1w1(x, words, K, *, scale=None, bias=None, out_dtype=torch.float32, out=None, config=None, prepack=None):
    """Binary GEMM: y = sign(x) @ W^T, exact in int32, then y * scale + bias.

    Args:
        x: (M, K) fp32/bf16/fp16 activations (binarized here: x < 0 -> -1, else +1) or int32
            sign words (M, ceil(K/32)) in the bnnops packing format. Any strides.
        words: int32 (N, ceil(K/32)) packed weight, contiguous.
        K: the reduction length.
        scale, bias: optional (N,) float tensors, contiguous.
        out_dtype: dtype of y (fp32, bf16 or fp16); ``out``: a contiguous (M, N) buffer to write.
        config: block shapes (see :func:`default_config`), for sweeps and tests.
        prepack: pack float x with ``pack_signs`` first (True), binarize in the kernel (False), or
            choose by shape (None).

    Returns:
        (M, N) tensor of ``out_dtype``.
    """
    M, N = x.shape[0], words.shape[0]
    out = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=x.device)
    x_mode = X_PACKED if x.dtype == torch.int32 else X_SIGN
    if x_mode == X_SIGN and (prepack if prepack is not None else _prepack(x, M, N, config)):
        x, x_mode = pack_signs(x), X_PACKED
    return _launch(x, words, out, M, N, K, words.shape[1], x_mode, False, scale, bias, config)


def w1a16(x, words, *, scale=None, bias=None, out=None, config=None):
    """Binary-weight GEMM: y = x @ W^T (fp32 accumulation), then y * scale + bias, in x's dtype.

    Args:
        x: (M, K) fp32/bf16/fp16, any strides. words: int32 (N, ceil(K/32)), contiguous.
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


def sweep(shapes=None, configs=None, dtype=torch.bfloat16):
    """Time a few block configs per case on the GPU and print them (median ms, TOPS, config).

    Args:
        shapes: (name, M, N, K) cases; default the A1W1 and W1A16 benchmark shapes.
        configs: extra configs (dicts as :func:`default_config` returns) to try in every case.
    """
    from triton.testing import do_bench

    shapes = shapes or [("a1w1", 8192, 8192, 8192), ("a1w1-packed", 8192, 8192, 8192),
                        ("w1a16", 1, 8192, 8192), ("w1a16", 16, 8192, 8192), ("w1a16", 128, 8192, 8192)]
    candidates = {
        "a1w1": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3),
                 dict(BLOCK_M=128, BLOCK_N=256, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)],
        "a1w1-packed": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=128, GROUP_M=8, num_warps=8, num_stages=3),
                        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=4),
                        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_R=128, GROUP_M=8, num_warps=8, num_stages=3)],
        "w1a16": [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=512, GROUP_M=1, num_warps=4, num_stages=4),
                  dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=256, GROUP_M=1, num_warps=4, num_stages=4),
                  dict(BLOCK_M=16, BLOCK_N=128, BLOCK_R=128, GROUP_M=1, num_warps=4, num_stages=5),
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, num_warps=4, num_stages=4),
                  dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)],
    }
    for name, M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = torch.randint(-(2**31), 2**31, (N, triton.cdiv(K, 32)), device="cuda", dtype=torch.int64).to(torch.int32)
        if name == "a1w1-packed":
            x = pack_signs(x)
        call = w1a16 if name == "w1a16" else (lambda x, w, config: a1w1(x, w, K, config=config, prepack=False))
        default = default_config(X_REAL if name == "w1a16" else X_PACKED if x.dtype == torch.int32 else X_SIGN,
                                 False, M, N, x.dtype)
        for config in [default] + [c for c in candidates[name] + list(configs or []) if c != default]:
            try:
                ms = do_bench(lambda: call(x, w, config=config), warmup=25, rep=100)
            except Exception as e:  # a config that does not fit (shared memory, registers) is skipped
                print(f"{name} M={M} N={N} K={K} {config}: failed ({type(e).__name__})")
                continue
            print(f"{name} M={M} N={N} K={K}: {ms * 1e3:9.1f} us  {2 * M * N * K / ms / 1e9:8.1f} TOPS  {config}")
