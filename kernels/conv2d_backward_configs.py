"""Block configs of the binary conv backward kernels (:mod:`bnnops.kernels.conv2d_backward`) and the
rules that pick one per problem, without autotuning.

A config is a ``triton.Config``; ``num_warps`` and ``num_stages`` are its launch options.

- grad_weight (an implicit GEMM per group and tap: [output channels] x [input channels], reduced
  over output pixels): ``BLOCK_O`` output channels of one group, ``BLOCK_C`` input channels (a
  multiple of 32: whole words), ``BLOCK_M`` output pixels per reduction step, ``SPLIT_K`` shares
  of the pixel reduction (> 1: fp32 partial sums added by a second kernel in a fixed order).
- grad_input (a transposed implicit GEMM per group and stride class: [input pixels] x [input
  channels], reduced over the taps that reach the class and the group's output channels):
  ``BLOCK_M`` input pixels, ``BLOCK_C`` input channels (a multiple of 32), ``BLOCK_O`` output
  channels per reduction step.

Why split the weight gradient: its output is small (O x Cg x kh x kw) and its reduction long (every
output pixel of the batch): ResNet-18's conv2_x at batch 256 has 9 output tiles of 64 x 64 and
802,816 pixels to reduce, so without a split 9 programs would run on 132 SMs.

The SM90 rules are sized by analogy with the forward kernels (the GEMM's 128-wide tiles, 3
stages, BLOCK_R 32 for fp32 operands); none has run on a GPU. Under Triton's interpreter one
fixed tile each (:data:`INTERPRETER_GRAD_WEIGHT`, :data:`INTERPRETER_GRAD_INPUT`).
"""

import functools
import os

import triton

from bnnops.kernels import cdiv

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# At most this many pixel shares: partial sums cost SPLIT_K * O * Cg * kh * kw * 8 bytes (written, read).
MAX_SPLIT_K = 64
# Programs wanted per SM for the weight gradient (a full first wave and a second to balance it).
PROGRAMS_PER_SM = 2

# Interpreter tiles: the interpreter's cost is per operation, not per element, so these are as
# large as the tests' small shapes allow while a 70-channel layer still makes two tiles.
INTERPRETER_GRAD_WEIGHT = triton.Config(dict(BLOCK_O=32, BLOCK_C=64, BLOCK_M=32, SPLIT_K=1), num_warps=4, num_stages=1)
INTERPRETER_GRAD_INPUT = triton.Config(dict(BLOCK_M=32, BLOCK_C=64, BLOCK_O=32), num_warps=4, num_stages=1)


def _width(channels: int, widest: int) -> int:
    """The tile width for ``channels``: the next power of two, at least 32, at most ``widest``."""
    return min(widest, max(32, 1 << max(channels - 1, 0).bit_length()))


def split_k(steps: int, tiles: int, n_sms: int) -> int:
    """Pixel shares for ``tiles`` output tiles and ``steps`` reduction steps: towards PROGRAMS_PER_SM
    programs per SM, at most MAX_SPLIT_K, none empty (every share gets cdiv(steps, split) steps)."""
    wanted = max(1, min(cdiv(PROGRAMS_PER_SM * n_sms, max(tiles, 1)), MAX_SPLIT_K, steps))
    return cdiv(steps, cdiv(steps, wanted)) if steps else 1


def pick_grad_weight_config(
    Og: int, Cg: int, M: int, n_taps: int, groups: int, fp32_grad: bool, n_sms: int = 132
) -> triton.Config:
    """The grad_weight config for Og output and Cg input channels per group, M = N*OH*OW output
    pixels, n_taps = kh*kw, fp32 (True) or 16-bit grad_out, on ``n_sms`` SMs.

    SM90 (untimed): BLOCK_O and BLOCK_C up to 128 by the channels, BLOCK_M 64 pixels a step (32 for
    fp32 grad_out, whose tiles take twice the bytes), 8 warps from 128 x 64 up, 3 stages; the
    interpreter: :data:`INTERPRETER_GRAD_WEIGHT`'s tile. Either way SPLIT_K from :func:`split_k`.
    """
    return _grad_weight_config(Og, Cg, M, n_taps, groups, fp32_grad, n_sms, _INTERPRET)


# Made once per problem (a layer's call then costs a lookup): the configs are pure in their arguments.
@functools.lru_cache(maxsize=1024)
def _grad_weight_config(Og, Cg, M, n_taps, groups, fp32_grad, n_sms, interpret):
    if interpret:
        base = INTERPRETER_GRAD_WEIGHT
        kwargs = dict(base.kwargs)
    else:
        block_o, block_c = _width(Og, 128), _width(Cg, 128)
        kwargs = dict(BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_M=32 if fp32_grad else 64)
        # 8 warps from 128 x 64 up: at 4 warps the NCHW 128 x 64 tile spills (each element of an
        # NCHW grad_out tile carries its own address; sm_90, Triton 3.9).
        base = triton.Config(kwargs, num_warps=8 if block_o * block_c >= 128 * 64 else 4, num_stages=3)
    tiles = cdiv(Og, kwargs["BLOCK_O"]) * cdiv(Cg, kwargs["BLOCK_C"]) * n_taps * groups
    kwargs["SPLIT_K"] = split_k(cdiv(M, kwargs["BLOCK_M"]), tiles, n_sms)
    return triton.Config(kwargs, num_warps=base.num_warps, num_stages=base.num_stages)


def pick_grad_input_config(Og: int, Cg: int, fp32_grad: bool, channels_last: bool = True) -> triton.Config:
    """The grad_input config for Og output and Cg input channels per group, fp32 (True) or 16-bit
    grad_out, and whether grad_out and grad_x are both channels-last (unit channel stride).

    SM90 (untimed): channels-last, 128 input pixels x BLOCK_C up to 128 by the channels, BLOCK_O
    64 output channels a step (32 for fp32 grad_out), 8 warps, 3 stages: no spills (sm_90 compile,
    Triton 3.9). NCHW tiles are 64 x 64 at 4 warps: their addresses run along pixels, which the
    compiler cannot prove consecutive, so every element carries its own address and larger tiles
    spill. The interpreter: :data:`INTERPRETER_GRAD_INPUT`.
    """
    if _INTERPRET:
        return INTERPRETER_GRAD_INPUT
    return _grad_input_config(Og, Cg, fp32_grad, channels_last)


@functools.lru_cache(maxsize=1024)
def _grad_input_config(Og, Cg, fp32_grad, channels_last):
    block_o = min(_width(Og, 64), 32 if fp32_grad else 64)
    if not channels_last:
        return triton.Config(dict(BLOCK_M=64, BLOCK_C=_width(Cg, 64), BLOCK_O=block_o), num_warps=4, num_stages=3)
    block_c = _width(Cg, 128)
    return triton.Config(dict(BLOCK_M=128, BLOCK_C=block_c, BLOCK_O=block_o), num_warps=8, num_stages=3)
