"""Triton implicit-GEMM conv2d over bit-packed +-1 weights (binary and binary-weight convolution).

What it computes (``bnnops.conv`` holds the pure-PyTorch reference): with ``x`` (N, C, H, W), the
packed weight of a logical +-1 weight (O, C/groups, kh, kw), and ``P`` the input padded with
``pad_value`` (0, or +1 / -1: larq's ``pad_values``, which keeps every binary input exactly +-1),

    y[n, o, p, q] = scale[o] * sum_{c,r,s} a(P[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw]) * w[o, c, r, s] + bias[o]

with g the group of output channel o, Cg = C/groups, and a() = sign() (A1W1, sign(0) = +1: the sum
is an exact integer) or the identity (W1A16: real inputs, e.g. a first layer).

Implicit GEMM: rows are output pixels (M = N*OH*OW), columns the output channels of one group (Og,
grid axis 1 is the group), and the reduction K = kh*kw*Cg walks tap by tap, BLOCK_K channels at a
time, in the order of the packed weight layout (``bnnops.packing``: words (O, kh, kw, ceil(Cg/32)),
bit j of word [o, r, s, w] is weight[o, 32w + j, r, s]). No im2col tensor exists: each K step loads
the [BLOCK_M, BLOCK_K] input window of its tap (from a pre-padded copy, or masked at the borders
where the pad value is put in) and a [BLOCK_K, BLOCK_N] slab of weight signs, and does one ``tl.dot`` (A1W1: +-1 in fp8 e4m3 or
int8, exact; W1A16: TF32 products, exact for 16-bit inputs times +-1, 3xTF32 for fp32). The epilogue
applies the per-output-channel scale, then the bias, in fp32, and stores in the input's dtype; the
output is channels_last when the input is.

Operand routes (``a_route`` / ``b_route`` of :func:`conv2d`; the defaults are the fast ones):

- A, the activations (A1W1). ``"fp8"`` (default) and ``"int8"``: one pre-pass writes sign(x) as +-1
  channels-last *with the padding written in* (N, H + pads, W + pads, C), 1 byte per element, so the
  K loop's A operand is a plain load (masked only at the last pixel tile and the channel tail) that
  goes through cp.async straight to shared memory and the tensor cores, with no bounds checks and no
  pad-value select. fp8 e4m3 accumulates in fp32, int8 in int32: both exact (fp8 while K = kh*kw*Cg
  <= 2^14, see FP8_EXACT_K; above, "int8" runs). ``"sign"``: the K loop reads x itself
  (channels_last; an NCHW x is copied first), binarizes every loaded element in registers and
  substitutes the pad value at the borders.
- B, the weights. ``"unpacked"`` (default): the packed words are unpacked once per call (the pack
  module's unpack kernel) into a +-1 workspace (O, kh, kw, 32*ceil(Cg/32)) in the dot's dtype: 8
  times the packed bytes (2.4 MB for ResNet-18's largest layer, read from L2 by every program).
  ``"bits"``: every K step loads the packed words and unpacks them in registers, so no dense weight
  ever exists.

Two numbers for one layer: ResNet-18's conv3_x 3x3 (28x28, 128 -> 128 channels, stride 1, pad 1)
at batch 256, A1W1, bf16 in and out (M = 200704, N = 128, K = 1152):

- operations: 2*M*N*K = 59.2 G (every 3x3 stride-1 layer of ResNet-18 has the same count): 30 us at
  the H100's 1979 dense int8/fp8 TOPS; the cuDNN bf16 baseline's peak (989 TFLOP/s) gives it 60 us.
- fewest bytes: x read once and y written once in bf16, 2 * 25.7 M elements * 2 B = 103 MB (the
  packed weight is 18 KB): 34 us at 3.0 TB/s. The 1-byte padded A pre-pass adds 1 B written and 1 B
  read per (padded) input element (+55 MB, +18 us); packing x to bits instead would add 1/4 B.

So the layer sits near the ridge (575 ops per byte against the H100's ~650), and what decides the
speed is the *work per operand element inside the K loop*: an H100 SM does 4096 8-bit MACs per clock
on its tensor cores but issues only 4 warp-instructions per clock, and implicit GEMM reloads every
input element once per tap (9 times for 3x3) and once per BLOCK_N column tile. Counting the SASS of
the K loop (sm_90, compiled offline with Triton 3.6, the GPU machine's version; per warp per K step
at BLOCK 128x128x128 and 8 warps, where the MMA takes 512 clocks per step):

- A fp8 or int8 (pre-padded) + B unpacked: 168 instructions (336 issue clocks), no spills, for every
  pad value. Triton makes the fp8 wgmma asynchronous (``warp_group_dot_wait`` pendings=1: the next
  step's address math and cp.async overlap the MMA, a step costs about max(336, 512)) but waits for
  an int8 wgmma right after issuing it (pendings=0: about 336 + 512). Hence fp8 by default.
  Substituting the pad value in the loop instead (before pre-padding) cost 435 and a synchronous MMA.
- B bits: 680-780 (unpacking and shuffling through shared memory), and the wgmma turns synchronous.
- A sign (binarize in the loop): 545-550 with a channels_last x and a synchronous wgmma; an NCHW x
  (gathers along C) reached 2500-4100 with register spills, hence the channels_last copy.
- A unpacked from a bit-packed pre-pass (the bytes-minimal design): 1000-2600 with spills; not offered.

Hence the defaults: both operands reach the K loop as ready 1-byte +-1 values (the 1-bit minimum of
bytes is not worth its unpacking work on Hopper), at the cost of +55 MB for this layer and of a
weight workspace. Tiles: BLOCK_K is a multiple of 32 (a packed word, and the 8-bit MMA's K); BLOCK_M
of 128-256 pixels and BLOCK_N of 64-128 channels keep the per-step address and mask work (the
implicit GEMM's overhead: a tap offset and four bounds compares per row) at or below the MMA time,
with the accumulator in registers (a 256x128 or 128x256 tile needs 255 registers and spills, so none
is listed; every listed config compiles with no spill in Triton 3.6 and 3.9). ``Og`` prunes BLOCK_N
above it. The autotune list is short on purpose: each config is a compile on the GPU's time budget.
W1A16 (a few-channel first layer, not the hot path) runs one fixed config.
"""

import os

import torch
import triton
import triton.language as tl

from bnnops.kernels.pack import unpack_signs

# A-operand modes of the kernel (constexpr): what the A pointer holds and how it becomes a tl.dot operand.
A_REAL = 0  # float input used as is (W1A16)
A_SIGN = 1  # float input binarized in registers (A1W1)
A_INT8 = 2  # int8 +-1 channels-last input from the sign pre-pass (A1W1), int32 accumulator
A_FP8 = 3  # fp8 e4m3 +-1 channels-last input from the sign pre-pass (A1W1), fp32 accumulator
A_ROUTES = {"fp8": A_FP8, "int8": A_INT8, "sign": A_SIGN}
# Hopper's fp8 MMA adds into an accumulator of about 14 significant bits (1 sign, 8 exponent, 13
# mantissa: the DeepSeek-V3 report's "around 14 bits"), so sums of +-1 products are exact while
# |sum| <= K <= 2**14; beyond that the "fp8" route falls back to "int8".
FP8_EXACT_K = 2**14
# Operand dtype of the dot, per A mode: what the pre-pass and the unpacked weight are written in.
DOT_DTYPES = {A_REAL: torch.float32, A_SIGN: torch.int8, A_INT8: torch.int8, A_FP8: torch.float8_e4m3fn}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); see the module docstring for the choice.
GPU_CONFIGS = [
    (128, 64, 128, 4, 3),  # Og = 64 (ResNet conv2_x)
    (256, 64, 128, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 64, 128, 4, 4),  # few pixels (7x7 maps at small batch)
]
# The interpreter runs one program at a time in numpy: one small config, no tuning.
INTERPRETER_CONFIGS = [(32, 32, 32, 4, 1)]
# Problems under SMALL_MACS multiply-adds (0.14 us of the H100's int8 peak: launch latency
# dominates) run this config untuned; tuning them would cost compiles and gain nothing.
SMALL_CONFIG = (64, 64, 64, 4, 3)
SMALL_MACS = 2**27
# W1A16's fp32 operand tiles take 4 bytes an element: a small BLOCK_K keeps its stages in shared memory.
W1A16_CONFIG = (64, 64, 32, 4, 3)


def _config(m, n, k, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    # A BLOCK_N far above the group's output channels only wastes MMA work and compile time.
    limit = max(64, triton.next_power_of_2(named_args["Og"]))
    return [c for c in configs if c.kwargs["BLOCK_N"] <= limit] or configs


@triton.jit
def _signs_of_words(words, BLOCK_K: tl.constexpr):
    """[R, BLOCK_K // 32] int32 words -> [R, BLOCK_K] int8 +-1 (bit j of word w is element 32w + j)."""
    bit = tl.arange(0, 32)
    # Arithmetic shift keeps the sign of negative words; & 1 keeps only bit j. 1 - 2b maps bit 1 to -1.
    bits = (words[:, :, None] >> bit[None, None, :]) & 1
    return tl.reshape((1 - 2 * bits).to(tl.int8), (words.shape[0], BLOCK_K))


@triton.autotune(configs=[_config(*c) for c in (INTERPRETER_CONFIGS if _INTERPRET else GPU_CONFIGS)], key=["M", "Cg", "Og", "KW", "n_taps", "A_MODE", "B_BITS", "PAD_VALUE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _conv2d_kernel(
    a_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr,
    M, H, W, OH, OW, Cg, Og, n_taps, KW,
    san, sac, sah, saw,  # strides of the A source (x, or the padded pre-pass) in elements
    swo, swr, sws,  # strides of the weight source over (o, r, s); its last dim is contiguous
    son, soc, soh, sow,  # strides of the output
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    PAD_VALUE: tl.constexpr, A_MODE: tl.constexpr, B_BITS: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    ih0 = (pix // OW) * stride_h - pad_h
    iw0 = (pix % OW) * stride_w - pad_w
    a_row = img.to(tl.int64) * san

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Og
    o_glob = group * Og + offs_n
    w_col = o_glob.to(tl.int64) * swo

    offs_k = tl.arange(0, BLOCK_K)
    n_words = tl.cdiv(Cg, 32)  # words per tap of the packed weight

    if A_MODE == 0 or A_MODE == 3:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    # One flat loop over (tap, channel block) so the compiler can software-pipeline all of K; the
    # tap (r, s) and channel offset c0 advance as counters (integer division by runtime values
    # would cost ~20 instructions per step).
    r = 0
    s = 0
    c0 = 0
    for _ in range(0, n_taps * tl.cdiv(Cg, BLOCK_K)):
        # ---- A: [BLOCK_M, BLOCK_K] input window of this tap, pad value outside the image ----
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        if A_MODE == 2 or A_MODE == 3:
            # The pre-pass wrote the padding, pad value included: every tap reads inside it.
            inside = m_ok
        else:
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        rows = a_row + ih * sah + iw * saw
        c = c0 + offs_k
        c_ok = c < Cg
        valid = inside[:, None] & c_ok[None, :]
        a = tl.load(a_ptr + rows[:, None] + (group * Cg + c)[None, :] * sac, mask=valid, other=0.0)
        if A_MODE == 0:
            # W1A16 multiplies in fp32 (see the dot below).
            a = a.to(tl.float32)
        elif A_MODE == 1:
            # Compare in fp32: exact for every float dtype, and sign(0) = +1 as in bnnops.packing.
            a = tl.where(a.to(tl.float32) < 0, -1, 1).to(tl.int8)
        # Outside the image the pad value; past the group's channels (the K tail) always 0, so the
        # weight's padding bits (+1) meet a zero. Masked loads already read 0 for both.
        if A_MODE == 1 or PAD_VALUE != 0:
            fill = tl.where(c_ok, PAD_VALUE * 1.0, 0.0).to(a.dtype)
            a = tl.where(valid, a, fill[None, :])

        # ---- B: [BLOCK_K, BLOCK_N] weight signs of this tap ----
        w_tap = w_col + r * swr + s * sws
        if B_BITS:
            wrd = c0 // 32 + tl.arange(0, BLOCK_K // 32)
            words = tl.load(w_ptr + w_tap[:, None] + wrd[None, :],
                            mask=n_ok[:, None] & (wrd < n_words)[None, :], other=0)
            b = tl.trans(_signs_of_words(words, BLOCK_K))
            if A_MODE == 3:
                b = b.to(tl.float32).to(tl.float8e4nv)
        else:
            # The unpacked workspace (O, kh, kw, 32 * n_words); the K tail is masked like A's.
            b = tl.load(w_ptr + w_tap[None, :] + c[:, None], mask=c_ok[:, None] & n_ok[None, :], other=0.0)

        if A_MODE == 0:
            # TF32 products of a 16-bit input and +-1 are exact (tf32 holds bf16's exponent and
            # fp16's mantissa); fp32 inputs use 3xTF32 (PRECISION) for fp32 accuracy. A bf16 dot
            # would run twice as fast, but the interpreter cannot do bf16 arithmetic and W1A16 is
            # the few-channel first layer, not the hot path.
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision=PRECISION)
        elif A_MODE == 3:
            # +-1 and 0 are exact in fp8 and so are their products; the sums are exact integers
            # for K <= FP8_EXACT_K. Triton pipelines an fp8 wgmma (the next step's loads and
            # address math overlap it) but waits for an int8 one at once: the point of this mode.
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)

        c0 += BLOCK_K
        next_tap = c0 >= Cg
        c0 = tl.where(next_tap, 0, c0)
        s = tl.where(next_tap, s + 1, s)
        next_row = s == KW
        s = tl.where(next_row, 0, s)
        r = tl.where(next_row, r + 1, r)

    # ---- epilogue: per-output-channel scale, then bias, in fp32; store in the output dtype ----
    y = acc.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + o_glob, mask=n_ok, other=0).to(tl.float32)[None, :]
    out_row = img.to(tl.int64) * son + (pix // OW) * soh + (pix % OW) * sow
    out_ptrs = out_ptr + out_row[:, None] + o_glob.to(tl.int64)[None, :] * soc
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sign_nhwc_kernel(x_ptr, out_ptr, P, C, H, W, HWp, Wp, pad_h, pad_w, pad_value, sxn, sxc, sxh, sxw,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """x (N, C, H, W) any strides, float -> padded +-1 (N, Hp, Wp, C) contiguous in out's dtype (int8
    or fp8): sign(x) (sign(0) = +1) inside, pad_value on the border of pad_h / pad_w before."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = p % HWp
    h = hw // Wp - pad_h
    w = hw % Wp - pad_w
    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    mask = (p < P)[:, None] & (c < C)[None, :]
    src = (p // HWp) * sxn + h * sxh + w * sxw
    x = tl.load(x_ptr + src[:, None] + c[None, :] * sxc, mask=mask & inside[:, None], other=0)
    s = tl.where(inside[:, None], tl.where(x.to(tl.float32) < 0, -1.0, 1.0), pad_value)
    tl.store(out_ptr + p[:, None] * C + c[None, :], s.to(out_ptr.dtype.element_ty), mask=mask)


def output_size(size, kernel, stride, pad_before, pad_after, dilation):
    """Output length of one spatial dimension (the formula of torch.nn.Conv2d)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def output_is_channels_last(x):
    """The output takes the input's memory format: channels_last when x is only channels_last-contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _sign_nhwc(x, dtype, padding=(0, 0, 0, 0), pad_value=0.0):
    """sign(x) as +-1 of ``dtype``, channels-last and padded: (N, H + top + bottom, W + left + right, C)."""
    N, C, H, W = x.shape
    pt, pb, pl, pr = padding
    Hp, Wp = H + pt + pb, W + pl + pr
    out = torch.empty((N, Hp, Wp, C), dtype=dtype, device=x.device)
    P = N * Hp * Wp
    if P == 0 or C == 0:
        return out
    BLOCK_P, BLOCK_C = 64, min(64, triton.next_power_of_2(C))
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C))
    _sign_nhwc_kernel[grid](x, out, P, C, H, W, Hp * Wp, Wp, pt, pl, float(pad_value), *x.stride(),
                            BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return out


def conv2d(x, words, *, bias=None, scale=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
           groups=1, pad_value=0.0, binarize=True, a_route="fp8", b_route="unpacked", out=None, config=None):
    """Binary (A1W1) or binary-weight (W1A16) conv2d of ``x`` with a packed +-1 weight.

    Args:
        x: (N, C, H, W) float32, bfloat16 or float16, any strides (the pre-pass reads NCHW and
            channels_last natively; the "sign" route and W1A16 copy a non-channels_last x).
        words: int32 (O, kh, kw, ceil(Cg/32)) packed weight, Cg = C / groups (``bnnops.packing`` layout),
            last dimension contiguous.
        bias, scale: optional contiguous (O,) float tensors: y = scale * conv + bias, computed in fp32.
        stride, dilation: (sh, sw), (dh, dw). padding: (top, bottom, left, right).
        groups: divides C and O. pad_value: 0.0, 1.0 or -1.0, the value the input is padded with.
        binarize: True for A1W1 (sign of x, exact int32 accumulation), False for W1A16 (x as is).
        a_route: "fp8", "int8" or "sign"; b_route: "unpacked" or "bits" (module docstring). "fp8"
            runs "int8" when kh*kw*Cg > FP8_EXACT_K; a_route is ignored for W1A16 (x is read as is).
        out: optional output (N, O, OH, OW) of x's dtype to write into (any strides).
        config: optional (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) to launch untuned (sweeps).

    Returns:
        (N, O, OH, OW) in x's dtype, channels_last when x is (:func:`output_is_channels_last`).
        No input checks: ``bnnops.conv`` validates.
    """
    N, C, H, W = x.shape
    O, KH, KW, n_words = words.shape
    Cg, Og = C // groups, O // groups
    pt, pb, pl, pr = padding
    OH = output_size(H, KH, stride[0], pt, pb, dilation[0])
    OW = output_size(W, KW, stride[1], pl, pr, dilation[1])
    if out is None:
        fmt = torch.channels_last if output_is_channels_last(x) else torch.contiguous_format
        out = torch.empty((N, O, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out

    a_mode = A_ROUTES[a_route] if binarize else A_REAL
    if a_mode == A_FP8 and KH * KW * Cg > FP8_EXACT_K:
        a_mode = A_INT8
    if a_mode in (A_REAL, A_SIGN):
        # Channels along K must be contiguous for vector loads (an NCHW x makes every A load a gather).
        a = x.contiguous(memory_format=torch.channels_last)
        a_strides, a_size, a_pad, a_pad_value = a.stride(), (H, W), (pt, pl), pad_value
    else:
        # Padded by the pre-pass: the K loop then needs no bounds checks and no pad-value select
        # (a select would send the operand through registers and make the wgmma synchronous).
        a = _sign_nhwc(x, DOT_DTYPES[a_mode], padding, pad_value)  # (N, Hp, Wp, C)
        a_strides = (a.stride(0), a.stride(3), a.stride(1), a.stride(2))
        a_size, a_pad, a_pad_value = (a.shape[1], a.shape[2]), (0, 0), 0.0
    if b_route == "bits":
        w = words
    else:
        w = torch.empty((O, KH, KW, 32 * n_words), dtype=DOT_DTYPES[a_mode], device=x.device)
        unpack_signs(words, 32 * n_words, w.dtype, out=w)

    dummy = out  # never read when HAS_SCALE / HAS_BIAS is False
    args = (
        a, w, out, dummy if scale is None else scale, dummy if bias is None else bias,
        N * OH * OW, *a_size, OH, OW, Cg, Og, KH * KW, KW,
        *a_strides, w.stride(0), w.stride(1), w.stride(2), *out.stride(),
        stride[0], stride[1], *a_pad, dilation[0], dilation[1],
    )
    meta = dict(
        PAD_VALUE=int(a_pad_value), A_MODE=a_mode, B_BITS=b_route == "bits",
        PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32",
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
    )

    def grid(m):
        return (triton.cdiv(N * OH * OW, m["BLOCK_M"]) * triton.cdiv(Og, m["BLOCK_N"]), groups)

    if config is None and not _INTERPRET:
        if a_mode == A_REAL:
            config = W1A16_CONFIG
        elif N * OH * OW * O * Cg * KH * KW < SMALL_MACS:
            config = SMALL_CONFIG
    if config is None:
        _conv2d_kernel[grid](*args, **meta)
    else:
        # .fn is the jitted kernel under the autotuner: one given config, no tuning.
        m, n, k, warps, stages = config
        blocks = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)
        _conv2d_kernel.fn[grid(blocks)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)
    return out
