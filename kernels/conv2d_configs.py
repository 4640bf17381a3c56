"""Block configs of the conv2d kernel (``bnnops.kernels.conv2d``) and the rule that picks one.

A config is a ``triton.Config`` whose kwargs are the kernel's tile: ``BLOCK_M`` output pixels,
``BLOCK_N`` output channels of one group, ``BLOCK_K`` input channels of one tap per K step; plus
``num_warps`` and ``num_stages``. :func:`pick_config` chooses one per problem without autotuning
(an autotuner costs host time on every new shape and a compile per candidate).

Why large tiles: the W1A1 K loop is bound by what L2 delivers to the SMs, BLOCK_M*BLOCK_K +
BLOCK_K*BLOCK_N bytes of 1-byte operands per 2*BLOCK_M*BLOCK_N*BLOCK_K operations, so the tile is
as large as the registers allow, and shrinks only when there would be too few tiles to fill the GPU
(docs/design.md, "Performance model").

Tables per GPU architecture (compute capability, e.g. 90 for sm_90): SM90, measured on an H100, is
the one table. Any other GPU gets it (:data:`FALLBACK_ARCH`), untuned: its 256x128x128 tile at 3
stages needs 147 KB of shared memory per block, more than sm_86 / sm_89 give (99 KB).
"""

import functools
import os
from dataclasses import dataclass

import triton

from bnnops.kernels import cdiv

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps, num_stages=num_stages
    )


# The interpreter runs one program at a time in numpy: one small config for every CPU test.
INTERPRETER_CONFIG = _config(32, 32, 32, 4, 1)
# W1A16 (the few-channel first layer, not the hot path): fp32 operand tiles take 4 bytes an
# element, and a small BLOCK_K keeps three stages in shared memory.
W1A16_CONFIG = _config(64, 64, 32, 4, 3)


@dataclass(frozen=True)
class W1A1Table:
    """How :func:`pick_config` sizes a W1A1 tile on one GPU architecture.

    Attributes:
        ladders: for each widest BLOCK_N (the largest key not above the group's output channels,
            else the smallest key), the (BLOCK_M, BLOCK_N) tiles to try, largest first; the last
            is taken when none fits.
        max_area: the largest BLOCK_M*BLOCK_N for 2-byte outputs.
        max_area_fp32_out: the same for 4-byte outputs (the fp32 epilogue takes more registers).
        min_waves: output tiles per SM below which a tile is too large for the problem.
        block_ks: BLOCK_K candidates, largest first: the largest not above the group's input
            channels, else the last (a BLOCK_K above them masks part of every K step).
        stages: num_stages per BLOCK_K (what shared memory holds).
        eight_warps_from: BLOCK_M*BLOCK_N from which a tile runs 8 warps instead of 4.
    """

    ladders: dict[int, tuple[tuple[int, int], ...]]
    max_area: int
    max_area_fp32_out: int
    min_waves: int
    block_ks: tuple[int, ...]
    stages: dict[int, int]
    eight_warps_from: int


SM90 = 90
W1A1_TABLES: dict[int, W1A1Table] = {
    SM90: W1A1Table(
        # Columns stop at 128: 256-wide column tiles lost to 128-wide ones on every ResNet-18
        # layer (H100 run T1422: conv5_x 88.8 us at 128x256, 60.1 us at 128x128).
        ladders={
            128: ((256, 128), (128, 128), (64, 128), (64, 64)),
            64: ((256, 64), (128, 64), (64, 64)),
        },
        # The largest tiles the registers hold: 256x128 compiles to 255 registers a thread at 8
        # warps without spills (sm_90); with fp32 outputs the epilogue spills at 256x128.
        max_area=256 * 128,
        max_area_fp32_out=128 * 128,
        # Fuller waves won over larger tiles (H100 run T1422, batch 256): conv5_x (7x7x512) ran
        # 71.7 us in 196 tiles of 256x128 and 60.1 us in 392 of 128x128; conv4_x 74.1 / 72.9 us.
        min_waves=2,
        block_ks=(128, 64, 32),
        # 3 stages at BLOCK_K = 128 (147 KB of shared memory at 256x128, of sm_90's 227 KB), 4 below.
        stages={128: 3, 64: 4, 32: 4},
        # Two warpgroups from 128x128 up: the fp32 accumulator takes 64-128 registers a thread.
        eight_warps_from=128 * 128,
    ),
}
# The table a GPU without its own gets.
FALLBACK_ARCH = SM90


def pick_config(
    M: int,
    Og: int,
    Cg: int,
    binarize: bool = True,
    n_sms: int = 132,
    out_bytes: int = 2,
    arch: int = SM90,
) -> triton.Config:
    """The block config for a conv2d problem, without tuning.

    Args:
        M: output pixels, N*OH*OW (the GEMM's rows).
        Og, Cg: output and input channels per group.
        binarize: W1A1 (True) or W1A16 (False: always :data:`W1A16_CONFIG`).
        n_sms: the GPU's streaming multiprocessors (H100 SXM: 132).
        out_bytes: the output's element size: 4 (fp32) caps the tile at ``max_area_fp32_out``.
        arch: compute capability as major*10 + minor; without a table, :data:`FALLBACK_ARCH`'s.

    Returns:
        A ``triton.Config``; :data:`INTERPRETER_CONFIG` under ``TRITON_INTERPRET=1``. The configs
        picked for ResNet-18's layers compile for sm_90 without spills (tests/test_conv2d.py).
    """
    if _INTERPRET:
        return INTERPRETER_CONFIG
    if not binarize:
        return W1A16_CONFIG
    return _table_config(M, Og, Cg, n_sms, out_bytes, arch)


@functools.lru_cache(maxsize=1024)
def _table_config(M: int, Og: int, Cg: int, n_sms: int, out_bytes: int, arch: int) -> triton.Config:
    """:func:`pick_config`'s W1A1 rule, made once per problem (a call then costs a lookup)."""
    table = W1A1_TABLES.get(arch, W1A1_TABLES[FALLBACK_ARCH])
    block_k = next((k for k in table.block_ks if k <= Cg), table.block_ks[-1])
    widest = max((n for n in table.ladders if n <= Og), default=min(table.ladders))
    largest = table.max_area_fp32_out if out_bytes > 2 else table.max_area
    for block_m, block_n in table.ladders[widest]:
        tiles = cdiv(M, block_m) * cdiv(Og, block_n)
        if block_m * block_n <= largest and tiles >= table.min_waves * n_sms:
            break
    warps = 8 if block_m * block_n >= table.eight_warps_from else 4
    return _config(block_m, block_n, block_k, warps, table.stages[block_k])


# Tiles near pick_config's for ResNet-18's 3x3 layers at batch 256, per channel count (Og = Cg):
# what ``python -m bench.sweeps.conv`` times beside the picked config (skipping any equal to it).
SWEEP_CONFIGS: dict[int, tuple[triton.Config, ...]] = {
    64: (_config(128, 64, 64, 4, 4), _config(256, 64, 32, 8, 4)),
    128: (_config(128, 128, 128, 8, 3), _config(256, 128, 64, 8, 4)),
    256: (_config(256, 128, 128, 8, 3), _config(128, 128, 128, 8, 3)),
    512: (_config(128, 128, 128, 8, 3), _config(256, 128, 128, 8, 3), _config(128, 256, 64, 8, 4)),
}
