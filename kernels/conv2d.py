"""Triton implicit-GEMM conv2d over bit-packed +-1 weights: W1A1 and W1A16 convolution.

What it computes (``bnnops.ops.reference`` holds the pure-PyTorch reference): with ``x`` (N, C, H, W), the
words of a logical +-1 weight (O, C/groups, kh, kw), and ``P`` the input padded with ``pad_value``
(0, or +1 / -1: larq's ``pad_values``, which keeps every binary input exactly +-1),

    y[n, o, p, q] = scale[o] * sum_{c,r,s} a(P[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw]) * w[o, c, r, s] + bias[o]

with g the group of output channel o, Cg = C/groups, and a() = sign() (W1A1, sign(0) = +1: the sum
is an exact integer) or the identity (W1A16: real inputs, e.g. a first layer).

Two launches per call:

1. ``conv2d_prepare.prepare`` writes both GEMM operands in the dot's dtype (``DOT_DTYPES``): the
   input channels-last with the padding written in, (N, H + pads, W + pads, C), as +-1 (W1A1) or
   as is (W1A16), and the words unpacked to +-1, (O, kh, kw, 32*ceil(Cg/32)).
2. ``_conv2d_kernel``, the implicit GEMM: rows are output pixels (M = N*OH*OW), columns the output
   channels of one group, the reduction K = kh*kw*Cg; no im2col tensor exists.

W1A1 sums are exact (fp8 e4m3 into fp32 while K <= FP8_EXACT_K, int8 into int32 above or by
choice), and the epilogue rounds scale, then bias, in fp32 without FMA contraction, as the
reference's separate mul and add, and then once to the output dtype, to nearest even (on every
backend, Triton's interpreter included: :func:`~bnnops.kernels.gemm_tiles.to_output`): a W1A1
result equals the reference bit for bit. W1A16 runs TF32 (exact products of a 16-bit input and
+-1) or 3xTF32 for fp32 inputs, summed in fp32. The output is in x's dtype (or ``out_dtype``),
channels_last when the input is (:func:`output_is_channels_last`).

Block configs: ``conv2d_configs``. The performance model (what bounds the K loop, the bytes per
layer) and the measured runs: docs/design.md.
"""

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from bnnops.kernels import cdiv
from bnnops.kernels.conv2d_configs import SM90, pick_config
from bnnops.kernels.conv2d_prepare import prepare
from bnnops.kernels.gemm_tiles import TRITON_FLOAT_TYPES, to_output

# A-operand modes of the kernel (A_MODE): what the padded copy holds and how the dot runs.
A_REAL = tl.constexpr(0)  # fp32 copy of x (W1A16): TF32 / 3xTF32 dot into fp32
A_INT8 = tl.constexpr(1)  # int8 +-1 (W1A1): int8 dot into int32
A_FP8 = tl.constexpr(2)  # fp8 e4m3 +-1 (W1A1): fp8 dot into fp32
# The W1A1 ``route`` keyword: the A mode of each operand dtype.
ROUTES = {"fp8": A_FP8, "int8": A_INT8}
# Hopper's fp8 MMA adds into an accumulator of about 14 significant bits (1 sign, 8 exponent, 13
# mantissa: the DeepSeek-V3 report's "around 14 bits"), so sums of +-1 products are exact while
# |sum| <= K <= 2**14; beyond that the "fp8" route runs "int8".
FP8_EXACT_K = 2**14
# Operand dtype of the dot, per A mode: what the prepare pass writes.
DOT_DTYPES = {A_REAL: torch.float32, A_INT8: torch.int8, A_FP8: torch.float8_e4m3fn}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
    threshold_ptr,
    flip_ptr,
    words_per_pixel,
    A_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_VEC: tl.constexpr,
    SIGN_OUT: tl.constexpr = False,
    ROUND_T: tl.constexpr = tl.float32,
):
    """One [BLOCK_M pixels, BLOCK_N output channels] tile of y for one group.

    a: the padded input (N, Hp, Wp, C) contiguous, HWp = Hp*Wp; w: the unpacked weight (O, kh, kw,
    32*ceil(Cg/32)) contiguous; out: (N, O, OH, OW) with strides son, soc, soh, sow; scale, bias:
    (O,) fp32-convertible, read only with HAS_SCALE / HAS_BIAS. n_taps = kh*kw, KW = kw.
    Grid: (cdiv(M, BLOCK_M) * cdiv(Og, BLOCK_N), groups).

    SIGN_OUT (BLOCK_N a multiple of 32): out is int32 sign words (N, OH, OW, words_per_pixel)
    contiguous, each group's channels starting a word (group g's channel j: word
    g * ceil(Og/32) + j // 32, bit j % 32); the bit is ``(v < threshold[o]) XOR flip[o]`` with v
    the epilogue's value rounded to ROUND_T, threshold (O,) int32 or ROUND_T, flip (O,) int8 0/1.
    Otherwise threshold_ptr, flip_ptr and words_per_pixel are not read.

    Constexprs: A_MODE (A_REAL, A_INT8, A_FP8) the operand dtype and dot; PRECISION the W1A16
    dot's input_precision ("tf32" for 16-bit x, "tf32x3" for fp32 x); EVEN_K when BLOCK_K divides
    Cg (no K-tail mask); OUT_VEC > 1 when the output's pixels are consecutive per channel and
    aligned runs of OUT_VEC rows never cross an image (:func:`_pixel_run`).

    Each K step loads the [BLOCK_M, BLOCK_K] window of one tap from the padded copy and a
    [BLOCK_K, BLOCK_N] slab of the weight and does one ``tl.dot``. Every tap of every output pixel
    lies inside the padded copy, so the loop has no bounds checks and no pad-value select.
    """
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
    # The unpacked weight is (O, kh, kw, tap_len) contiguous, tap_len = 32 * ceil(Cg / 32); columns
    # past Og load the group's last channel (never stored).
    tap_len = tl.cdiv(Cg, 32) * 32
    w_col = (group * Og + tl.minimum(offs_n, Og - 1)).to(tl.int64) * (n_taps * tap_len)

    offs_k = tl.arange(0, BLOCK_K)
    if A_MODE == A_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # One flat loop over (tap, channel block) so the compiler can software-pipeline all of K; the
    # tap's offsets advance as scalar counters (a division by runtime values costs ~20 instructions).
    row_jump = (dil_h * Wp - KW * dil_w) * C  # from past the last tap of a row to the next row
    s = 0
    c0 = 0
    a_tap = 0  # (r*dil_h*Wp + s*dil_w) * C
    w_tap = 0  # (r*KW + s) * tap_len
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
        if A_MODE == A_REAL:
            # TF32 products of a 16-bit input and +-1 are exact (tf32 holds bf16's exponent and
            # fp16's mantissa); fp32 inputs use 3xTF32 (PRECISION) for fp32 accuracy. W1A16 is
            # the few-channel first layer, not the hot path.
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)
        elif A_MODE == A_INT8:
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
        w_tap = tl.where(next_tap, w_tap + tap_len, w_tap)
        next_row = s == KW
        s = tl.where(next_row, 0, s)
        a_tap = tl.where(next_row, a_tap + row_jump, a_tap)

    # ---- epilogue: per-output-channel scale, then bias, in fp32 (no FMA: see the launch) ----
    y = acc.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)[None, :]
    if SIGN_OUT:
        v = to_output(y, ROUND_T).to(tl.float32)
        t = tl.load(threshold_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)
        flip = tl.load(flip_ptr + o_glob, mask=n_ok, other=0) != 0
        neg = ((v < t[None, :]) != flip[None, :]) & n_ok[None, :]
        bits = neg.to(tl.int32) << (tl.arange(0, BLOCK_N) % 32)[None, :]
        # Distinct powers of two: their int32 sum is their OR (bit 31 wraps to the sign bit).
        packed = tl.sum(tl.reshape(bits, (BLOCK_M, BLOCK_N // 32, 32)), axis=2)
        word = group * tl.cdiv(Og, 32) + pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
        word_ok = pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32) < tl.cdiv(Og, 32)
        word_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * words_per_pixel + word[None, :]
        tl.store(word_ptrs, packed, mask=m_ok[:, None] & word_ok[None, :])
    else:
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
        tl.store(out_ptrs, to_output(y, out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache
def _device_info(device: torch.device) -> tuple[int, int]:
    """(SMs, compute capability as major*10 + minor) of a device, looked up once."""
    if _INTERPRET:
        return 1, SM90
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major * 10 + props.minor


def _pixel_run(out: torch.Tensor) -> int:
    """The kernel's OUT_VEC: for an output whose pixels are consecutive per channel (NCHW), the
    largest power of two up to 8 (16 bytes of bf16) that divides OH*OW, so aligned runs of that
    many rows never cross an image; 1 (no promise) for any other layout."""
    OH, OW = out.shape[2:]
    if out.stride(3) != 1 or out.stride(2) != OW:
        return 1
    hw = OH * OW
    return min(8, hw & -hw)


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of one spatial dimension (the formula of torch.nn.Conv2d)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def output_is_channels_last(x: torch.Tensor) -> bool:
    """The output takes the input's memory format: channels_last when x is only channels_last-contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def conv2d(
    x: torch.Tensor,
    words: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    pad_value: float = 0.0,
    binarize: bool = True,
    route: str = "fp8",
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: triton.Config | None = None,
    channels: int | None = None,
    signs: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None,
) -> torch.Tensor:
    """W1A1 (binarized input) or W1A16 (real input) conv2d of ``x`` with a packed +-1 weight.

    Args:
        x: (N, C, H, W) float32, bfloat16 or float16, any strides (NCHW and channels_last are read
            natively by the prepare pass; channels_last is the fast one). Or, for W1A1, x's sign
            words: int32 (N, H, W, groups * ceil(Cg/32)), any strides, each group starting a word
            (``conv2d_prepare``'s layout), with C given as ``channels``.
        words: int32 (O, kh, kw, ceil(Cg/32)) packed weight, Cg = C / groups (``bnnops.packing``
            layout), contiguous.
        bias, scale: optional contiguous (O,) float tensors: y = scale * conv + bias, in fp32.
        stride, dilation: (sh, sw), (dh, dw). padding: (top, bottom, left, right).
        groups: divides C and O. pad_value: 0.0, 1.0 or -1.0, the value the input is padded with.
        binarize: True for W1A1 (sign of x, exact sums), False for W1A16 (x as is).
        route: the W1A1 operand dtype, a key of ``ROUTES``: "fp8" (runs "int8" when kh*kw*Cg >
            FP8_EXACT_K) or "int8"; ignored for W1A16.
        out: optional float32, bfloat16 or float16 output (N, O, OH, OW) to write into (any
            strides). out_dtype: the dtype of a new output (None: x's dtype); ignored with ``out``.
        config: a ``triton.Config`` with BLOCK_M, BLOCK_N, BLOCK_K, num_warps and num_stages
            instead of ``conv2d_configs.pick_config``'s (sweeps, tests).
        channels: C, for int32 x only.
        signs: (threshold, flip, round dtype) to write sign words instead of y (a folded layer:
            ``bnnops::binary_conv2d_sign``): int32 (N, OH, OW, groups * ceil((O/groups)/32)),
            each group's channels starting a word, bit ``(v < threshold[o]) XOR flip[o]`` with v the
            epilogue's value rounded to the round dtype; threshold (O,) int32 or of that dtype,
            flip (O,) bool, both contiguous. ``out`` must then be such a contiguous int32 tensor.

    Returns:
        ``out`` or a new (N, O, OH, OW) tensor of ``out_dtype`` (None: x's dtype, float32 for
        words), channels_last when x is (:func:`output_is_channels_last`) or is words (their
        layout is channels-last). No input checks: ``bnnops.ops.conv`` validates.
    """
    packed = x.dtype == torch.int32
    N, C, H, W = (x.shape[0], channels, x.shape[1], x.shape[2]) if packed else x.shape
    O, KH, KW, _ = words.shape
    Cg, Og = C // groups, O // groups
    pt, pb, pl, pr = padding
    OH = output_size(H, KH, stride[0], pt, pb, dilation[0])
    OW = output_size(W, KW, stride[1], pl, pr, dilation[1])
    if out is None and signs is not None:
        out = torch.empty((N, OH, OW, groups * cdiv(Og, 32)), dtype=torch.int32, device=x.device)
    elif out is None:
        fmt = torch.channels_last if packed or output_is_channels_last(x) else torch.contiguous_format
        dtype = out_dtype or (torch.float32 if packed else x.dtype)
        out = torch.empty((N, O, OH, OW), dtype=dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out

    a_mode = ROUTES[route] if binarize else A_REAL
    if a_mode is A_FP8 and KH * KW * Cg > FP8_EXACT_K:  # identity: constexpr == builds objects
        a_mode = A_INT8
    a, w = prepare(x, words, DOT_DTYPES[a_mode], binarize, padding, pad_value, channels=C, groups=groups)

    M = N * OH * OW
    if config is None:
        n_sms, arch = _device_info(x.device)
        config = pick_config(M, Og, Cg, binarize, n_sms, out.element_size(), arch)
    block_m, block_n, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    dummy = out  # never read when HAS_SCALE / HAS_BIAS / SIGN_OUT is False
    threshold, flip, round_dtype = signs if signs is not None else (dummy, dummy, torch.float32)
    if signs is not None and block_n % 32:
        raise ValueError(f"sign words need BLOCK_N % 32 == 0, got {config}")
    grid = (cdiv(M, block_m) * cdiv(Og, block_n), groups)
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
        threshold,
        flip.view(torch.int8) if signs is not None else flip,
        out.shape[-1],
        A_MODE=a_mode,
        PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
        EVEN_K=Cg % block_k == 0,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        OUT_VEC=_pixel_run(out) if signs is None else 1,
        SIGN_OUT=signs is not None,
        ROUND_T=TRITON_FLOAT_TYPES[round_dtype],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        # Two roundings in the epilogue (scale, then bias), as the reference's separate mul and add.
        enable_fp_fusion=False,
    )
    return out
