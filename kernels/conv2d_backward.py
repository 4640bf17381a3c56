"""Backward launchers of a binary conv2d that saved its input packed (sign and pass-mask words,
:mod:`bnnops.kernels.saved_activations`): implicit GEMMs that read both packed operands, no dense
x, no dense +-1 weight, no im2col.

With grad_out (N, O, OH, OW), groups g of Cg = C/groups input and Og = O/groups output channels,
stride (sh, sw), dilation (dh, dw), padding (top, bottom, left, right) and P the +-1 input padded
with ``pad_value``:

- :func:`grad_weight`: grad_W[o, c, r, s] = sum_{n,p,q} grad_out[n, o, p, q] *
  P[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw]. One GEMM per (group, tap): [Og] x [Cg] reduced over
  the N*OH*OW output pixels, the +-1 operand unpacked from the sign words of the pixels the tap
  reads (pad_value 0: padded pixels add nothing; +-1: they add +-grad_out). The reduction is split
  over pixels (``SPLIT_K``) into fp32 partial sums that a second kernel adds in a fixed order
  (deterministic). Programs of one share and neighbouring taps run side by side, so the grad_out
  rows they all read come from L2.
- :func:`grad_input`: grad_x[n, c, h, w] = mask[n, c, h, w] ? sum over the taps (r, s) and output
  pixels (p, q) with p*sh + r*dh = h + top, q*sw + s*dw = w + left, of grad_out[n, o, p, q] *
  W[o, c, r, s] : 0. Input pixels are split into the sh*sw stride classes (h mod sh, w mod sw);
  within a class the same taps reach every pixel, at a fixed output offset, so a program walks
  only those taps (a table per class, built on the host) and none of its K steps is wasted on
  strided-out taps. Padded positions get no gradient (only real pixels are rows).

Numerics: +-1 (and 0) operands are exact in every dot dtype; grad_out enters the dot in its own
dtype: 16-bit products exact in fp32, fp32 grad_out as two TF32 products (g = hi + lo, error
about 2^-20 |g| per product, as the GEMM's, docs/design.md 4.2); fp32 accumulation, one rounding
to the output dtype at the end (to nearest even on every backend). Integer-valued grad_out gives
exact sums (below 2^24) and the reference's bits. The mask is a select: 0 even where the sum is
inf or NaN. References: :mod:`bnnops.ops.backward_reference`. Configs:
:mod:`bnnops.kernels.conv2d_backward_configs`.
"""

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from bnnops.kernels import cdiv
from bnnops.kernels.conv2d import output_size
from bnnops.kernels.conv2d_backward_configs import pick_grad_input_config, pick_grad_weight_config
from bnnops.kernels.gemm_tiles import dot, tf32, to_output, unpack_tile
from bnnops.kernels.saved_activations import unpack_bits

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements per program of the kernel that adds the grad_weight shares.
_SUM_BLOCK = 1024


@triton.jit
def _wide(index, WIDE: tl.constexpr):
    """index as int64 with WIDE (a tensor whose elements lie 2**31 or more apart), else as is: int32
    offsets halve the registers of a tile's addresses (the NCHW tiles, whose addresses the compiler
    cannot vectorize, spill at 128 x 128 with int64 ones; sm_90, Triton 3.9)."""
    if WIDE:
        index = index.to(tl.int64)
    return index


@triton.jit
def _dot_grad(g, b, acc, EMULATE_TC: tl.constexpr):
    """acc + g @ b for b +-1 (or 0) in g's dtype: one tensor-core dot, two (TF32 hi and lo) for fp32 g."""
    if tl.float32 == g.dtype:
        g_hi = tf32(g)
        acc = dot(g_hi, b, acc, False, EMULATE_TC)
        acc = dot(g - g_hi, b, acc, False, EMULATE_TC)
    else:
        acc = dot(g, b, acc, False, EMULATE_TC)
    return acc


@triton.jit(do_not_specialize=["M", "steps_per_split"])
def _grad_weight_kernel(
    g_ptr,
    words_ptr,
    out_ptr,
    part_ptr,
    M,
    OH,
    OW,
    H,
    W,
    O,
    Og,
    Cg,
    words_per_group,
    words_per_pixel,
    n_taps,
    KW,
    sgn,
    sgo,
    sgh,
    sgw,  # strides of grad_out
    so_o,
    so_c,
    so_r,
    so_s,  # strides of out
    stride_h,
    stride_w,
    dil_h,
    dil_w,
    pad_top,
    pad_left,
    steps_per_split,
    PAD: tl.constexpr,
    SPLIT: tl.constexpr,
    WIDE: tl.constexpr,
    EMULATE_TC: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One [BLOCK_O, BLOCK_C] tile of grad_W[:, :, r, s] for one group, summed over one share of
    the M = N*OH*OW output pixels.

    g: grad_out (N, O, OH, OW) with strides sgn, sgo, sgh, sgw; words: sign words (N, H, W,
    words_per_pixel) contiguous, the group's words starting at group * words_per_group; out:
    (O, Cg, kh, kw) with strides so_*, written unless SPLIT; part: fp32 (split, O, Cg, kh, kw)
    contiguous, written with SPLIT. PAD (0, 1, -1): the padding's value. Grid: (n_taps *
    cdiv(Cg, BLOCK_C) * cdiv(Og, BLOCK_O), split, groups), the tap fastest.
    """
    pid = tl.program_id(0)
    tap = pid % n_taps
    tile = pid // n_taps
    n_tiles_c = tl.cdiv(Cg, BLOCK_C)
    pid_c = tile % n_tiles_c
    pid_o = tile // n_tiles_c
    share = tl.program_id(1)
    group = tl.program_id(2)
    r = tap // KW
    s = tap % KW
    BCW: tl.constexpr = BLOCK_C // 32
    DOT_T: tl.constexpr = g_ptr.dtype.element_ty
    # A padded pixel's word: all +1 (bit 0) or all -1 (bit 1); for PAD 0 its grad_out loads as 0.
    PAD_WORD: tl.constexpr = -1 if PAD == -1 else 0

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < Og
    o = group * Og + offs_o
    cw = pid_c * BCW + tl.arange(0, BCW)
    cw_ok = cw < words_per_group
    g_channels = g_ptr + _wide(o, WIDE)[:, None] * sgo
    group_words = words_ptr + group * words_per_group + cw[None, :]

    acc = tl.zeros((BLOCK_O, BLOCK_C), tl.float32)
    first = share * steps_per_split
    end = tl.minimum(first + steps_per_split, tl.cdiv(M, BLOCK_M))
    for step in range(first, end):
        m = step * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        n = m // (OH * OW)
        pix = m % (OH * OW)
        p = pix // OW
        q = pix % OW
        ih = p * stride_h + r * dil_h - pad_top
        iw = q * stride_w + s * dil_w - pad_left
        inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # Rows past M (and, for PAD 0, padded pixels) read grad_out 0: they add nothing.
        g_ok = inside if PAD == 0 else m_ok
        g = tl.load(
            g_channels + (_wide(n, WIDE) * sgn + p * sgh + q * sgw)[None, :],
            mask=o_ok[:, None] & g_ok[None, :],
            other=0.0,
        )
        x_pixel = (_wide(n * H + ih, WIDE) * W + iw) * words_per_pixel
        xw = tl.load(group_words + x_pixel[:, None], mask=inside[:, None] & cw_ok[None, :], other=PAD_WORD)
        acc = _dot_grad(g, unpack_tile(xw, BLOCK_M, BCW, DOT_T, False), acc, EMULATE_TC)

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = o_ok[:, None] & (offs_c < Cg)[None, :]
    if SPLIT:
        part = part_ptr + ((share * O + _wide(o, WIDE))[:, None] * Cg + offs_c[None, :]) * n_taps + tap
        tl.store(part, acc, mask=ok)
    else:
        ptrs = out_ptr + _wide(o, WIDE)[:, None] * so_o + offs_c[None, :] * so_c + (r * so_r + s * so_s)
        tl.store(ptrs, to_output(acc, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_shares_kernel(part_ptr, out_ptr, numel, Cg, n_taps, KW, so_o, so_c, so_r, so_s, split, BLOCK: tl.constexpr):
    """out[o, c, r, s] = sum over shares of part[share, o, c, r, s], added in share order; part fp32
    (split, O, Cg, kh, kw) contiguous (numel elements a share), out any strides. Grid
    (cdiv(numel, BLOCK),)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    y = tl.zeros((BLOCK,), tl.float32)
    for share in range(split):
        y += tl.load(part_ptr + share * numel + i, mask=ok, other=0.0)
    tap = i % n_taps
    oc = i // n_taps
    ptrs = out_ptr + (oc // Cg) * so_o + (oc % Cg) * so_c + (tap // KW) * so_r + (tap % KW) * so_s
    tl.store(ptrs, to_output(y, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_input_kernel(
    g_ptr,
    words_ptr,
    mask_ptr,
    out_ptr,
    taps_ptr,
    H,
    W,
    OH,
    OW,
    N,
    Og,
    Cg,
    words_per_group,
    words_per_pixel,
    n_taps,
    sgn,
    sgo,
    sgh,
    sgw,  # strides of grad_out
    son,
    soc,
    soh,
    sow,  # strides of out
    stride_h,
    stride_w,
    HAS_MASK: tl.constexpr,
    WIDE: tl.constexpr,
    EMULATE_TC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """One [BLOCK_M input pixels of one stride class, BLOCK_C input channels of one group] tile of
    grad_x.

    Class (ah, aw) = divmod(program_id(1), stride_w) holds the pixels (ah + i*sh, aw + j*sw); its
    row t of ``taps`` (int32 (sh*sw, 1 + 3*n_taps)) is the number of taps that reach it, then per
    such tap (tap index r*kw + s, dp, dq): that tap reads grad_out at (i + dp, j + dq). g: grad_out
    with strides sgn, sgo, sgh, sgw; words: the packed weight (O, kh, kw, words_per_group)
    contiguous; mask: mask words (N, H, W, words_per_pixel) contiguous, read with HAS_MASK; out:
    (N, C, H, W) with strides so*. Grid: (cdiv(N * cdiv(H, sh) * cdiv(W, sw), BLOCK_M) *
    cdiv(Cg, BLOCK_C), sh*sw, groups): class (0, 0) is the largest.
    """
    pid = tl.program_id(0)
    n_tiles_c = tl.cdiv(Cg, BLOCK_C)
    pid_c = pid % n_tiles_c
    pid_m = pid // n_tiles_c
    cls = tl.program_id(1)
    group = tl.program_id(2)
    ah = cls // stride_w
    aw = cls % stride_w
    # This class's rows and columns (0 when the image is narrower than the class offset).
    Hc = tl.cdiv(H - ah, stride_h)
    Wc = tl.cdiv(W - aw, stride_w)
    HWc = tl.maximum(Hc * Wc, 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * Hc * Wc
    n = offs_m // HWc
    i = (offs_m % HWc) // tl.maximum(Wc, 1)
    j = (offs_m % HWc) % tl.maximum(Wc, 1)
    BCW: tl.constexpr = BLOCK_C // 32
    DOT_T: tl.constexpr = g_ptr.dtype.element_ty
    cw = pid_c * BCW + tl.arange(0, BCW)
    cw_ok = cw < words_per_group
    g_rows = _wide(n, WIDE) * sgn

    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    n_o_blocks = tl.cdiv(Og, BLOCK_O)
    class_taps = taps_ptr + cls * (1 + 3 * n_taps)
    # One flat loop over (reaching tap, output-channel block), so the pipeliner sees one loop.
    for it in range(0, tl.load(class_taps) * n_o_blocks):
        entry = class_taps + 1 + 3 * (it // n_o_blocks)
        tap = tl.load(entry)
        p = i + tl.load(entry + 1)
        q = j + tl.load(entry + 2)
        row_ok = m_ok & (p >= 0) & (p < OH) & (q >= 0) & (q < OW)
        offs_o = (it % n_o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = offs_o < Og
        o = _wide(group * Og + offs_o, WIDE)
        g = tl.load(
            g_ptr + (g_rows + p * sgh + q * sgw)[:, None] + o[None, :] * sgo,
            mask=row_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            words_ptr + (o * n_taps + tap)[:, None] * words_per_group + cw[None, :],
            mask=o_ok[:, None] & cw_ok[None, :],
            other=0,
        )
        acc = _dot_grad(g, unpack_tile(w, BLOCK_O, BCW, DOT_T, False), acc, EMULATE_TC)

    ih = ah + i * stride_h
    iw = aw + j * stride_w
    if HAS_MASK:
        pixel = (_wide(n * H + ih, WIDE) * W + iw) * words_per_pixel
        mw = tl.load(
            mask_ptr + pixel[:, None] + group * words_per_group + cw[None, :],
            mask=m_ok[:, None] & cw_ok[None, :],
            other=0,
        )
        acc = tl.where(unpack_bits(mw, BLOCK_M, BCW) != 0, acc, 0.0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c = _wide(group * Cg + offs_c, WIDE)
    ptrs = out_ptr + (_wide(n, WIDE) * son + ih * soh + iw * sow)[:, None] + c[None, :] * soc
    tl.store(ptrs, to_output(acc, out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_c < Cg)[None, :])


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether some element of ``tensors`` lies 2**31 or more elements from its tensor's start
    (then the kernels compute offsets in int64: WIDE)."""
    for t in tensors:
        n = t.numel()
        # The farthest element, sum((size - 1) * stride), is below numel * max(stride): summed only
        # when that bound reaches 2**31 (two C calls a tensor otherwise).
        if (
            n
            and n * max(t.stride(), default=0) >= 2**31
            and sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= 2**31
        ):
            return True
    return False


@functools.lru_cache
def _device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter: 1), looked up once."""
    return 1 if _INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache
def _tap_table(
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    kernel: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """The grad_input kernel's ``taps``: int32 (sh*sw, 1 + 3*kh*kw), row ah*sw + aw the count of taps
    (r, s) with (ah + top - r*dh) % sh == 0 and (aw + left - s*dw) % sw == 0, then (r*kw + s,
    (ah + top - r*dh) // sh, (aw + left - s*dw) // sw) for each. One small upload per layer geometry."""
    (sh, sw), (dh, dw), (top, left), (kh, kw) = stride, dilation, pad, kernel
    rows = []
    for ah in range(sh):
        for aw in range(sw):
            row = []
            for r in range(kh):
                for s in range(kw):
                    dp, rest_h = divmod(ah + top - r * dh, sh)
                    dq, rest_w = divmod(aw + left - s * dw, sw)
                    if rest_h == 0 and rest_w == 0:
                        row += [r * kw + s, dp, dq]
            rows.append([len(row) // 3] + row + [0] * (3 * kh * kw - len(row)))
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _check_geometry(grad_out, words_shape, input_hw, kernel, stride, padding, dilation, groups, what):
    """Raise ValueError where grad_out, the saved words and the geometry disagree (a kernel reading
    past a tensor would not)."""
    N, O, OH, OW = grad_out.shape
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4 or min(*stride, *dilation) < 1:
        raise ValueError(
            f"{what}: stride and dilation must be pairs >= 1, padding (top, bottom, left, right), got "
            f"stride={tuple(stride)}, dilation={tuple(dilation)}, padding={tuple(padding)}"
        )
    if min(padding) < 0 or groups < 1 or O % groups:
        raise ValueError(f"{what}: padding must be >= 0 and groups ({groups}) must divide the {O} output channels")
    expected = tuple(
        output_size(size, k, st, before, after, d)
        for size, k, st, before, after, d in zip(input_hw, kernel, stride, padding[::2], padding[1::2], dilation)
    )
    if expected != (OH, OW):
        raise ValueError(f"{what}: grad_out is {OH}x{OW} per image but the geometry gives {expected[0]}x{expected[1]}")
    if tuple(words_shape) != (N, *input_hw, words_shape[-1]):
        raise ValueError(f"{what}: saved words {tuple(words_shape)} do not match a batch of {N} images of {input_hw}")


def grad_weight(
    grad_out: torch.Tensor,
    sign_words: torch.Tensor,
    weight_shape: Sequence[int],
    *,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    pad_value: float = 0.0,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """The weight gradient of a binary conv2d from its saved sign words (module docstring).

    Args:
        grad_out: (N, O, OH, OW) float32 / bfloat16 / float16, any strides (NCHW, channels_last).
            fp32 must be finite (TF32 split).
        sign_words: int32 (N, H, W, groups * ceil(Cg/32)) contiguous: bit 1 where x < 0, each
            group's channels starting a new word.
        weight_shape: (O, Cg, kh, kw), the weight's logical shape.
        stride, dilation: (sh, sw), (dh, dw). padding: (top, bottom, left, right).
        groups: divides O. pad_value: 0.0, 1.0 or -1.0, the value the forward padded with.
        out_dtype: dtype of a new gradient (None: grad_out's). channels_last: allocate it
            channels_last (as nn.Conv2d's weight gradient follows the input's format).
        out: an (O, Cg, kh, kw) float buffer to write instead (any strides).
        config: a ``conv2d_backward_configs`` grad_weight config (None: picked).

    Returns:
        (O, Cg, kh, kw) dense gradient: fp32 sums, one rounding to its dtype.

    Raises:
        ValueError: a pad_value other than 0, +-1, or shapes that disagree with the geometry.
    """
    O, Cg, KH, KW = weight_shape
    N, H, W, words_per_pixel = sign_words.shape
    words_per_group = cdiv(Cg, 32)
    if pad_value not in (0.0, 1.0, -1.0):
        raise ValueError(f"pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")
    if grad_out.shape[1] != O or words_per_pixel != groups * words_per_group or sign_words.dtype != torch.int32:
        raise ValueError(
            f"grad_weight: grad_out {tuple(grad_out.shape)} and sign words {sign_words.dtype} "
            f"{tuple(sign_words.shape)} do not fit a weight {tuple(weight_shape)} with groups={groups}"
        )
    _check_geometry(grad_out, sign_words.shape, (H, W), (KH, KW), stride, padding, dilation, groups, "grad_weight")
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(
            tuple(weight_shape), dtype=out_dtype or grad_out.dtype, device=grad_out.device, memory_format=fmt
        )
    M = N * grad_out.shape[2] * grad_out.shape[3]
    if out.numel() == 0:
        return out
    if M == 0:
        return out.zero_()
    Og = O // groups
    n_taps = KH * KW
    fp32_grad = grad_out.dtype == torch.float32
    if config is None:
        config = pick_grad_weight_config(Og, Cg, M, n_taps, groups, fp32_grad, _device_sms(grad_out.device))
    blocks = dict(config.kwargs)
    steps = cdiv(M, blocks["BLOCK_M"])
    steps_per_split = cdiv(steps, blocks.pop("SPLIT_K"))
    split = cdiv(steps, steps_per_split)
    part = torch.empty((split, *weight_shape), dtype=torch.float32, device=out.device) if split > 1 else out
    grid = (n_taps * cdiv(Cg, blocks["BLOCK_C"]) * cdiv(Og, blocks["BLOCK_O"]), split, groups)
    _grad_weight_kernel[grid](
        grad_out,
        sign_words,
        out,
        part,
        M,
        grad_out.shape[2],
        grad_out.shape[3],
        H,
        W,
        O,
        Og,
        Cg,
        words_per_group,
        words_per_pixel,
        n_taps,
        KW,
        *grad_out.stride(),
        *out.stride(),
        stride[0],
        stride[1],
        dilation[0],
        dilation[1],
        padding[0],
        padding[2],
        steps_per_split,
        PAD=int(pad_value),
        SPLIT=split > 1,
        WIDE=_needs_int64(grad_out, sign_words, out, part),
        EMULATE_TC=_INTERPRET,
        **blocks,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        numel = out.numel()
        _sum_shares_kernel[(cdiv(numel, _SUM_BLOCK),)](
            part, out, numel, Cg, n_taps, KW, *out.stride(), split, BLOCK=_SUM_BLOCK
        )
    return out


def grad_input(
    grad_out: torch.Tensor,
    words: torch.Tensor,
    mask_words: torch.Tensor | None,
    input_shape: Sequence[int],
    *,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0, 0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    out_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """The input gradient of a binary conv2d, the weight and the pass mask read packed (module docstring).

    Args:
        grad_out: (N, O, OH, OW) float32 / bfloat16 / float16, any strides. fp32 must be finite.
        words: int32 (O, kh, kw, ceil(Cg/32)) contiguous, the packed weight.
        mask_words: int32 (N, H, W, groups * ceil(Cg/32)) contiguous, bit 1 where |x| <= clip
            (the input quantizer's pass mask); None: no mask.
        input_shape: (N, C, H, W) of the layer's input.
        stride, dilation: (sh, sw), (dh, dw). padding: (top, bottom, left, right).
        groups: divides C and O.
        out_dtype: dtype of a new gradient (None: grad_out's). channels_last: allocate it
            channels_last (the input's format).
        out: an (N, C, H, W) float buffer to write instead (any strides).
        config: a ``conv2d_backward_configs`` grad_input config (None: picked).

    Returns:
        (N, C, H, W): fp32 sums, masked, one rounding to its dtype; every element written (pixels
        no output reads get 0).

    Raises:
        ValueError: shapes that disagree with each other or with the geometry.
    """
    N, C, H, W = input_shape
    O, KH, KW, words_per_group = words.shape
    Cg = C // groups if groups else 0
    if groups < 1 or C % groups or words_per_group != cdiv(Cg, 32) or words.dtype != torch.int32:
        raise ValueError(
            f"grad_input: words {words.dtype} {tuple(words.shape)} do not fit an input {tuple(input_shape)} "
            f"with groups={groups} (need int32 (O, kh, kw, ceil(C/groups/32)))"
        )
    words_per_pixel = groups * words_per_group
    mask_shape = (N, H, W, words_per_pixel)
    if mask_words is not None and (tuple(mask_words.shape) != mask_shape or mask_words.dtype != torch.int32):
        raise ValueError(
            f"grad_input: mask words must be int32 {mask_shape}, got {mask_words.dtype} {tuple(mask_words.shape)}"
        )
    if grad_out.shape[0] != N or grad_out.shape[1] != O:
        raise ValueError(
            f"grad_input: grad_out {tuple(grad_out.shape)} does not fit {N} images and {O} output channels"
        )
    _check_geometry(grad_out, mask_shape, (H, W), (KH, KW), stride, padding, dilation, groups, "grad_input")
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(
            tuple(input_shape), dtype=out_dtype or grad_out.dtype, device=grad_out.device, memory_format=fmt
        )
    if out.numel() == 0:
        return out
    if grad_out.numel() == 0:
        return out.zero_()
    if config is None:
        channels_last_tiles = grad_out.stride(1) == 1 and out.stride(1) == 1
        config = pick_grad_input_config(O // groups, Cg, grad_out.dtype == torch.float32, channels_last_tiles)
    blocks = config.kwargs
    sh, sw = stride
    taps = _tap_table(tuple(stride), tuple(dilation), (padding[0], padding[2]), (KH, KW), grad_out.device)
    rows = N * cdiv(H, sh) * cdiv(W, sw)
    grid = (cdiv(rows, blocks["BLOCK_M"]) * cdiv(Cg, blocks["BLOCK_C"]), sh * sw, groups)
    _grad_input_kernel[grid](
        grad_out,
        words,
        mask_words if mask_words is not None else words,
        out,
        taps,
        H,
        W,
        grad_out.shape[2],
        grad_out.shape[3],
        N,
        O // groups,
        Cg,
        words_per_group,
        words_per_pixel,
        KH * KW,
        *grad_out.stride(),
        *out.stride(),
        sh,
        sw,
        HAS_MASK=mask_words is not None,
        WIDE=_needs_int64(grad_out, words, out, *([mask_words] if mask_words is not None else [])),
        EMULATE_TC=_INTERPRET,
        **blocks,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
