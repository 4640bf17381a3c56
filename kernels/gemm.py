"""Launchers of the binary GEMM kernels: packed +-1 weights times binary or real activations.

- :func:`w1a1`: ``y = sign(x) W^T``, exact in int32 (x float, binarized x < 0 -> -1 else +1, or
  packed sign words).
- :func:`w1a16`: ``y = x W^T`` for real x (fp32, bf16, fp16), fp32 accumulation.
- :func:`grad_input`: ``y = g W``, the input gradient of both, optionally times a packed
  straight-through pass mask (0 where its bit is 0) in the same kernel.

W (N, K) is given as ``words``: int32 (N, words_per_row), words_per_row = ceil(K/32), in the
``bnnops.packing`` format (bit j of word w is k = 32*w + j; bit 1 is -1). Each launcher applies
``y = acc * scale[n] + bias[n]`` (per output channel, both optional) in fp32, then rounds to the
output dtype once.

Modules of this family: :mod:`~bnnops.kernels.gemm_tiles` (shared ``@triton.jit`` helpers and the
split-K epilogue kernel), :mod:`~bnnops.kernels.gemm_tensor_core` (the tensor-core kernel),
:mod:`~bnnops.kernels.gemv` (the CUDA-core W1A16 kernel for small batches),
:mod:`~bnnops.kernels.gemm_configs` (block configs and the rules that pick them). Tuning sweep:
``python -m bench.sweeps.gemm``. Performance model and measurements: ``docs/design.md``.
"""

import functools
import os
from typing import NamedTuple

import torch
import triton

from bnnops.kernels import cdiv, conv2d
from bnnops.kernels.gemm_configs import GEMV_M, SMALL_M, default_config, is_gemv, prepack_x, sign_config
from bnnops.kernels.gemm_tensor_core import gemm_kernel
from bnnops.kernels.gemm_tiles import TRITON_FLOAT_TYPES, X_PACKED, X_REAL, X_SIGN, split_k_epilogue_kernel
from bnnops.kernels.gemv import gemv_kernel
from bnnops.kernels.pack import pack_signs

__all__ = [
    "GEMV_M",
    "SMALL_M",
    "X_PACKED",
    "X_REAL",
    "X_SIGN",
    "grad_input",
    "w1a1",
    "w1a1_sign",
    "w1a16",
    "w1a16_sign",
]

# X_* by value: the launch plan cache keys on the int.
_X_MODES = {int(mode.value): mode for mode in (X_REAL, X_SIGN, X_PACKED)}

# Elements per program of the split-K epilogue kernel.
_SPLIT_K_EPILOGUE_BLOCK = 1024


# Whether the kernels run in Triton's interpreter (fixed when Triton is imported, before this module).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_UNUSED = {}


def _unused_fp32(device):
    if device not in _UNUSED:
        _UNUSED[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _UNUSED[device]


class _LaunchPlan(NamedTuple):
    """What a launch needs beyond its tensors, from its config and its shape alone."""

    gemv: bool  # the GEMV kernel (else the tensor-core kernel)
    split: int  # K shares (SPLIT_K); > 1 adds the split-K epilogue launch
    grid: tuple[int, int]
    constants: dict  # the kernel's constexpr and launch keyword arguments
    pad: int  # int8 dots' padded positions past R (each added +1), removed by the split-K epilogue
    epilogue_grid: tuple[int]


def _plan(config, x_mode, trans_w, M, N, R, sign_round_dtype, has_mask):
    """The :class:`_LaunchPlan` of ``config`` for a call; ``sign_round_dtype`` None unless the call
    writes sign words (then the dtype v is rounded to before the compare).

    Raises:
        ValueError: a config the call cannot run (a GEMV config for anything but W1A16 with M <=
            BLOCK_M and no mask; a split-K, GEMV or BLOCK_N % 32 != 0 config for sign words).
    """
    blocks = dict(config.kwargs)
    split = blocks.pop("SPLIT_K", 1)
    gemv = is_gemv(config)
    signs = sign_round_dtype is not None
    if signs and (gemv or split != 1 or blocks["BLOCK_N"] % 32):
        raise ValueError(f"sign words need a tensor-core config without split-K and BLOCK_N % 32 == 0, got {config}")
    # enable_fp_fusion=False: y * scale + bias rounded twice, like torch (bit-exact W1A1).
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
    if gemv:
        if x_mode != X_REAL or trans_w or blocks["BLOCK_M"] < M or has_mask:
            raise ValueError(f"the GEMV kernel computes W1A16 for M <= BLOCK_M, got M={M} with {config}")
        grid = (cdiv(N, blocks["BLOCK_N"]), split)
        constants = dict(SPLIT=split > 1, **blocks, **options)
    else:
        grid = (cdiv(M, blocks["BLOCK_M"]) * cdiv(N, blocks["BLOCK_N"]), split)
        constants = dict(
            X_MODE=int(x_mode),
            TRANS_W=trans_w,
            SPLIT=split > 1,
            EMULATE_TC=_INTERPRET,
            SIGN_OUT=signs,
            ROUND_T=TRITON_FLOAT_TYPES[sign_round_dtype if signs else torch.float32],
            HAS_MASK=has_mask,
            **blocks,
            **options,
        )
    pad = cdiv(R, blocks["BLOCK_R"]) * blocks["BLOCK_R"] - R if split > 1 and x_mode != X_REAL else 0
    return _LaunchPlan(gemv, split, grid, constants, pad, (cdiv(M * N, _SPLIT_K_EPILOGUE_BLOCK),))


@functools.lru_cache(maxsize=1024)
def _default_plan(x_mode, trans_w, M, N, R, x_dtype, device, sign_round_dtype, has_mask):
    """:func:`_plan` of the table's config, made once per call signature (the rules pick the same
    config for the same arguments): a call then costs a lookup, not the rules and dict building."""
    mode = _X_MODES[x_mode]
    if sign_round_dtype is not None:
        config = sign_config(mode, M, N, R, x_dtype, device)
    else:
        config = default_config(mode, trans_w, M, N, R, x_dtype, device)
    return _plan(config, mode, trans_w, M, N, R, sign_round_dtype, has_mask)


def _launch(x, words, out, M, N, R, words_per_row, x_mode, trans_w, scale, bias, config, signs=None, mask_words=None):
    """y[M, N] = x[M, R] @ B into ``out`` (see :func:`~bnnops.kernels.gemm_tensor_core.gemm_kernel`
    for x_mode and trans_w); config None: the table's. ``signs`` (threshold, flip as int8, the
    dtype v is rounded to): write sign words into ``out`` instead (config: one without split-K).
    ``mask_words`` (int32 (M, ceil(N/32)), tensor-core configs only): y is 0 where its bit is 0."""
    if out.numel() == 0:
        return out
    if R == 0:
        # An empty reduction: the dot is 0, the epilogue still applies.
        y = torch.zeros(M, N, dtype=torch.float32, device=out.device)
        y = y * scale.float() if scale is not None else y
        y = y + bias.float() if bias is not None else y
        return out.copy_(y if signs is None else _signs_of(y, *signs))
    sign_round_dtype = signs[2] if signs is not None else None
    has_mask = mask_words is not None
    if config is None:
        plan = _default_plan(x_mode.value, trans_w, M, N, R, x.dtype, out.device, sign_round_dtype, has_mask)
    else:
        plan = _plan(config, x_mode, trans_w, M, N, R, sign_round_dtype, has_mask)
    split = plan.split
    # Absent scale / bias / workspace: any fp32 pointer, never read (one pointer type, so one
    # compiled variant).
    unused = _unused_fp32(out.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=out.device) if split > 1 else unused
    scale_ptr = scale if scale is not None else unused
    bias_ptr = bias if bias is not None else unused
    mask_args = (mask_words, *mask_words.stride()) if has_mask else (unused, 0, 0)
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
        words_per_row,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        int(scale is not None),
        int(bias is not None),
        split,
    )
    if plan.gemv:
        gemv_kernel[plan.grid](*args, **plan.constants)
    else:
        threshold, flip = (signs[0], signs[1]) if signs is not None else (unused, unused)
        gemm_kernel[plan.grid](*args, threshold, flip, *mask_args, **plan.constants)
    if split > 1:
        split_k_epilogue_kernel[plan.epilogue_grid](
            part,
            out,
            scale_ptr,
            bias_ptr,
            M,
            N,
            plan.pad,
            out.stride(0),
            out.stride(1),
            *args[-3:],
            *mask_args,
            HAS_MASK=has_mask,
            BLOCK=_SPLIT_K_EPILOGUE_BLOCK,
            enable_fp_fusion=False,
        )
    return out


def _signs_of(v, threshold, flip, round_dtype):
    """Sign words (M, ceil(N/32)) of fp32 values v (M, N), as the kernels' sign epilogue computes them."""
    t = threshold.float() if threshold.dtype == torch.int32 else threshold.to(round_dtype)
    neg = (v.to(round_dtype) < t) ^ (flip != 0)
    M, N = v.shape
    bits = torch.nn.functional.pad(neg, (0, 32 * cdiv(N, 32) - N)).reshape(M, -1, 32).to(torch.int32)
    return (bits << torch.arange(32, dtype=torch.int32, device=v.device)).sum(-1, dtype=torch.int32)


def w1a1(
    x: torch.Tensor,
    words: torch.Tensor,
    K: int,
    *,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
    prepack: bool | None = None,
    route: str = "int8",
) -> torch.Tensor:
    """Binary GEMM: y = sign(x) @ W^T, exact in int32, then y * scale + bias.

    Args:
        x: (M, K) fp32/bf16/fp16 activations (binarized here: x < 0 -> -1, else +1) or int32
            sign words (M, ceil(K/32)) in the bnnops packing format. Any strides.
        words: int32 (N, ceil(K/32)) packed weight, contiguous.
        K: the reduction length.
        scale, bias: optional (N,) float tensors, contiguous.
        out_dtype: dtype of y (fp32, bf16 or fp16); ``out``: a contiguous (M, N) buffer to write.
        config: a block config (:mod:`~bnnops.kernels.gemm_configs`), for sweeps and tests;
            None: the table's.
        prepack: pack float x with ``pack_signs`` first (True) or binarize it in the kernel
            (False); None: pack first where :func:`~bnnops.kernels.gemm_configs.prepack_x` says
            (M > 16 and N > 128) unless ``config`` is given.
        route: "int8" (default): the kernels of this family. "fp8", for float x: the W1A1 GEMM as
            the 1x1 convolution it is, on ``bnnops.kernels.conv2d``: one launch writes sign(x) and
            the unpacked weight as fp8 e4m3 +-1 (transient copies of M*K and N*K bytes), then an
            implicit GEMM whose fp8 wgmma Triton pipelines (it waits for each int8 one); exact
            while K <= 2**14, int8 above.

    Returns:
        (M, N) tensor of ``out_dtype`` (``out`` when given).

    Raises:
        ValueError: an unknown ``route``, or packed x on the "fp8" route.
    """
    M, N = x.shape[0], words.shape[0]
    out = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=x.device)
    if route == "fp8":
        return _w1a1_as_conv(x, words, scale, bias, out)
    if route != "int8":
        raise ValueError(f"route must be 'int8' or 'fp8', got {route!r}")
    x_mode = X_PACKED if x.dtype == torch.int32 else X_SIGN
    if prepack is None:
        prepack = config is None and prepack_x(M, N)
    if x_mode == X_SIGN and prepack:
        x, x_mode = pack_signs(x), X_PACKED
    return _launch(x, words, out, M, N, K, words.shape[1], x_mode, False, scale, bias, config)


def _w1a1_as_conv(x, words, scale, bias, out):
    """y = sign(x) W^T as a 1x1 convolution of M one-pixel images of K channels (``w1a1``'s "fp8" route)."""
    if x.dtype == torch.int32:
        raise ValueError("w1a1's fp8 route takes float x; packed x runs route='int8'")
    M, K = x.shape
    N, words_per_row = words.shape
    # (M, K) with unit stride along K is a channels-last (M, K, 1, 1) batch, which the prepare pass reads as is.
    images = x.as_strided((M, K, 1, 1), (x.stride(0), x.stride(1), 1, 1))
    conv2d.conv2d(images, words.view(N, 1, 1, words_per_row), bias=bias, scale=scale, out=out.view(M, N, 1, 1))
    return out


def w1a16(
    x: torch.Tensor,
    words: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Binary-weight GEMM: y = x @ W^T (fp32 accumulation), then y * scale + bias, in x's dtype.

    Args:
        x: (M, K) fp32/bf16/fp16, any strides. fp32 x must be finite: it enters the tensor cores as
            two TF32 terms (error about 2^-20 |x|), and the split turns +-inf into NaN.
        words: int32 (N, ceil(K/32)), contiguous.
        scale, bias: optional (N,) float tensors. out: a contiguous (M, N) buffer of x's dtype or
            float32 (the epilogue rounds once, to out's dtype).
        config: a block config (:mod:`~bnnops.kernels.gemm_configs`; a GEMV config only for
            M <= its BLOCK_M); None: the table's.

    Returns:
        (M, N) tensor of x's dtype (``out`` when given).

    Raises:
        ValueError: a GEMV config with BLOCK_M < M.
    """
    M, K = x.shape
    N = words.shape[0]
    out = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    return _launch(x, words, out, M, N, K, words.shape[1], X_REAL, False, scale, bias, config)


def w1a1_sign(
    x: torch.Tensor,
    words: torch.Tensor,
    K: int,
    threshold: torch.Tensor,
    flip: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Sign words of a folded W1A1 layer: bit n of row m is ``(v[m, n] < threshold[n]) XOR flip[n]``,
    v = sign(x) W^T the exact integer sum (``bnnops::binary_linear_w1a1_sign``).

    Args:
        x, words, K: as :func:`w1a1` (float x is binarized in the kernel; int32 x is sign words).
        threshold: int32 (N,); flip: bool (N,); both contiguous.
        out: a contiguous int32 (M, ceil(N/32)) buffer to write. config: a tensor-core config
            without split-K, BLOCK_N a multiple of 32; None: :func:`~bnnops.kernels.gemm_configs.sign_config`.

    Returns:
        int32 (M, ceil(N/32)) words (``out`` when given); bits of channels >= N are 0.

    Raises:
        ValueError: a GEMV or split-K config, or BLOCK_N not a multiple of 32.
    """
    M, N = x.shape[0], words.shape[0]
    out = out if out is not None else torch.empty(M, cdiv(N, 32), dtype=torch.int32, device=x.device)
    x_mode = X_PACKED if x.dtype == torch.int32 else X_SIGN
    signs = (threshold, flip.view(torch.int8), torch.float32)
    return _launch(x, words, out, M, N, K, words.shape[1], x_mode, False, None, None, config, signs)


def w1a16_sign(
    x: torch.Tensor,
    words: torch.Tensor,
    threshold: torch.Tensor,
    flip: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Sign words of a folded W1A16 layer: v = x W^T * scale + bias (fp32, as :func:`w1a16`) rounded
    to x's dtype, bit n of row m ``(v[m, n] < threshold[n]) XOR flip[n]``, threshold of x's dtype
    (``bnnops::binary_linear_w1a16_sign``). Other arguments, result and errors as :func:`w1a1_sign`."""
    M, K = x.shape
    N = words.shape[0]
    out = out if out is not None else torch.empty(M, cdiv(N, 32), dtype=torch.int32, device=x.device)
    signs = (threshold, flip.view(torch.int8), x.dtype)
    return _launch(x, words, out, M, N, K, words.shape[1], X_REAL, False, scale, bias, config, signs)


def grad_input(
    g: torch.Tensor,
    words: torch.Tensor,
    K: int,
    *,
    mask_words: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """y = g @ W, the input gradient of both GEMMs, optionally times a packed pass mask.

    W is read packed, never built dense. ``mask_words`` is the straight-through estimator's pass
    mask of a layer that saved its input packed (:mod:`~bnnops.kernels.saved_activations`): y is 0
    wherever its bit is 0, applied where the kernel writes y (with split-K in the kernel that adds
    the shares), so the mask costs no pass over y. A select: a blocked position is 0 even where
    g @ W is inf or NaN, so y equals the unmasked y with its blocked positions zeroed, bit for bit.

    Args:
        g: (M, N) float32 / bfloat16 / float16, any strides. fp32 must be finite (TF32 split).
        words: int32 (N, ceil(K/32)) contiguous, W in the ``bnnops.packing`` format.
        K: the output length.
        mask_words: int32 (M, ceil(K/32)) on g's device, any strides, bit j of word w is column
            32*w + j, bit 1 = pass; bits past K are ignored. None: no mask.
        out: an (M, K) float buffer to write, any strides (its dtype the result's); None: a new one
            of g's dtype.
        config: a tensor-core config (:mod:`~bnnops.kernels.gemm_configs`); None: the table's.

    Returns:
        (M, K) tensor (``out`` when given).

    Raises:
        ValueError: mask_words not int32 (M, ceil(K/32)) on g's device, or a GEMV config.
    """
    M, N = g.shape
    if mask_words is not None and (
        mask_words.dtype != torch.int32 or tuple(mask_words.shape) != (M, cdiv(K, 32)) or mask_words.device != g.device
    ):
        raise ValueError(
            f"mask_words must be int32 of shape {(M, cdiv(K, 32))} (M, ceil(K/32)) on {g.device}, "
            f"got {mask_words.dtype} {tuple(mask_words.shape)} on {mask_words.device}"
        )
    out = out if out is not None else torch.empty(M, K, dtype=g.dtype, device=g.device)
    return _launch(g, words, out, M, K, N, words.shape[1], X_REAL, True, None, None, config, mask_words=mask_words)
