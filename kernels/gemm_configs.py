"""Block configs of the binary GEMM kernels, as data, and the rules that pick one for a call.

A config is a ``triton.Config``. Its kwargs are the kernel's constexpr fields plus ``SPLIT_K``:

- tensor-core kernel (:mod:`bnnops.kernels.gemm_tensor_core`): BLOCK_M, BLOCK_N, BLOCK_R, GROUP_M,
  SWAP_AB, SPLIT_K;
- GEMV (:mod:`bnnops.kernels.gemv`): BLOCK_M, BLOCK_N, SPLIT_K, and no BLOCK_R (its K step is
  GEMV_LANES words): :func:`is_gemv` tells the two apart.

SPLIT_K is the grid's second axis: K is cut into SPLIT_K shares of whole K steps summed by separate
programs, then added up by a second kernel (SPLIT_K = 1: one program per output tile, no second
kernel). num_warps and num_stages are the launch options.

Which kernel and layout a call gets (:func:`pick_config`):

1. W1A16 with M <= GEMV_M: the GEMV.
2. M <= SMALL_M: the tensor-core kernel with SWAP_AB (the weight tile is wgmma's M operand, the
   batch its N operand), long K steps, several in flight, and K split until every SM has about
   two programs.
3. Larger M: 128-row tiles, GROUP_M = 8; K split when the output tiles fill at most half the SMs.

Tables are keyed by compute capability. ``SM90``: tuned on an H100 (runs T1322, T1422 in
``bench/results/``). A GPU without a table of its own gets ``SM90``, untuned there (blocks change
speed, not results; a GPU with less shared memory per SM than an H100 may not fit the largest).
CPU tensors (Triton's interpreter) get ``SM90`` with an H100's 132 SMs, so CPU tests check the
table's choices; ``INTERPRETER_CONFIGS`` are small configs that make several tiles of the tests'
small shapes.
"""

import functools

import torch
import triton
import triton.language as tl

from bnnops.kernels import cdiv, next_power_of_2
from bnnops.kernels.gemm_tiles import X_PACKED, X_REAL, X_SIGN
from bnnops.kernels.gemv import GEMV_LANES

# Batch sizes up to this use the small-batch layout (BLOCK_M = 16, SWAP_AB, weight streaming).
SMALL_M = 16
# W1A16 batch sizes up to this run the GEMV.
GEMV_M = 2
# At most this many K shares: the fp32 partial sums cost SPLIT_K * M * N * 8 bytes (written, read).
MAX_SPLIT_K = 8
# SM count assumed where there is no GPU to ask (an H100 SXM's).
INTERPRETER_SMS = 132

Table = dict[tuple[str, str], triton.Config]


def _large(block_n: int, block_r: int) -> triton.Config:
    return triton.Config(
        dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_R=block_r, GROUP_M=8, SWAP_AB=False), num_warps=8, num_stages=3
    )


def _small(block_n: int, block_r: int) -> triton.Config:
    return triton.Config(
        dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=block_r, GROUP_M=1, SWAP_AB=True), num_warps=4, num_stages=4
    )


# Keys: (layout, role); layout "large", "small" or "gemv" (the rules above), role from
# :func:`role`. SPLIT_K (and the GEMV's BLOCK_M) are added per call.
SM90: Table = {
    # H100 at 8192^3: 1339 us against 1450 with BLOCK_N = 128 (T1322).
    ("large", "w1a1-packed"): _large(256, 128),
    # 1966 us against 2100 with BLOCK_N = 128 (T1322); w1a1 packs such x first unless N <= 128.
    ("large", "w1a1"): _large(256, 64),
    ("large", "w1a16"): _large(128, 64),
    ("large", "w1a16-fp32"): _large(128, 32),
    ("large", "grad_input"): _large(128, 64),
    ("large", "grad_input-fp32"): _large(128, 32),
    ("small", "w1a1-packed"): _small(64, 512),
    ("small", "w1a1"): _small(64, 256),
    ("small", "w1a16"): _small(64, 256),
    ("small", "w1a16-fp32"): _small(64, 128),
    ("small", "grad_input"): _small(128, 64),
    ("small", "grad_input-fp32"): _small(128, 64),
    # 128 rows a program: 8 a thread at 4 warps; up to 128 registers keep four programs an SM.
    ("gemv", "w1a16"): triton.Config(dict(BLOCK_N=128), num_warps=4, num_stages=1),
    ("gemv", "w1a16-fp32"): triton.Config(dict(BLOCK_N=128), num_warps=4, num_stages=1),
}

TABLES: dict[tuple[int, int], Table] = {(9, 0): SM90}
# What a GPU whose compute capability has no table gets.
DEFAULT_TABLE = SM90

# Small blocks for the interpreter's tests: several tiles in M, N and K of small shapes, with the
# batch as the dot's M operand, and (SWAP_AB) as its N operand.
_TEST_SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=64, GROUP_M=2, SWAP_AB=False)
INTERPRETER_CONFIGS: dict[str, triton.Config] = {
    "small": triton.Config(dict(_TEST_SMALL, SPLIT_K=1), num_warps=4, num_stages=2),
    "swapped-split": triton.Config(dict(_TEST_SMALL, SWAP_AB=True, SPLIT_K=2), num_warps=4, num_stages=2),
    # The large-batch layout split over K (what the table picks when there are few output tiles).
    "split": triton.Config(dict(_TEST_SMALL, SPLIT_K=3), num_warps=4, num_stages=2),
}


def role(x_mode: tl.constexpr, trans_w: bool, x_dtype: torch.dtype) -> str:
    """The table's name for what a call computes: "w1a1-packed" (X_PACKED), "w1a1" (X_SIGN),
    "w1a16" or "grad_input" (X_REAL, TRANS_W 0 or 1), the last two with "-fp32" for fp32 x."""
    if x_mode == X_PACKED:
        return "w1a1-packed"
    if x_mode == X_SIGN:
        return "w1a1"
    if x_mode != X_REAL:
        raise ValueError(f"unknown x mode {x_mode}")
    return ("grad_input" if trans_w else "w1a16") + ("-fp32" if x_dtype == torch.float32 else "")


def is_gemv(config: triton.Config) -> bool:
    """True for a config of the GEMV kernel (it has no BLOCK_R)."""
    return "BLOCK_R" not in config.kwargs


def with_kwargs(config: triton.Config, **kwargs: int | bool) -> triton.Config:
    """A copy of ``config`` with ``kwargs`` set (the launch options unchanged)."""
    return triton.Config(
        {**config.kwargs, **kwargs},
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        num_ctas=config.num_ctas,
        maxnreg=config.maxnreg,
    )


def split_k(steps: int, wanted: int) -> int:
    """SPLIT_K for ``steps`` K steps: at most ``wanted`` shares of ``cdiv(steps, split)`` steps each,
    none empty (32 steps in 9 shares of 4 leave the ninth empty: 8 shares do the same work)."""
    share = cdiv(steps, max(min(wanted, steps), 1))
    return cdiv(steps, share)


def prepack_x(M: int, N: int) -> bool:
    """Whether W1A1 with float x packs x first (``pack_signs``, one pass over x) and runs the
    packed kernel: binarizing in the kernel costs about 2.5 instructions per value and every
    column of output tiles redoes it, so it pays once there are several (M > SMALL_M, N > 128)."""
    return M > SMALL_M and N > 128


def gemv_config(M: int, N: int, K: int, sms: int, block_n: int | None = None, table: Table = SM90) -> triton.Config:
    """The GEMV config for an (M, K) x (N, K)^T product on ``sms`` SMs: BLOCK_M = M rounded up to a
    power of two, BLOCK_N rows a program (the table's unless given), K split until every SM has
    about four programs."""
    base = table[("gemv", "w1a16")]
    block_n = block_n or base.kwargs["BLOCK_N"]
    steps = cdiv(cdiv(K, 32), GEMV_LANES.value)
    split = split_k(steps, cdiv(4 * sms, cdiv(N, block_n)))
    kwargs = dict(BLOCK_M=next_power_of_2(M), BLOCK_N=block_n, SPLIT_K=split)
    return triton.Config(kwargs, num_warps=base.num_warps, num_stages=base.num_stages)


def pick_config(
    x_mode: tl.constexpr,
    trans_w: bool,
    M: int,
    N: int,
    R: int,
    x_dtype: torch.dtype,
    sms: int,
    table: Table = SM90,
) -> triton.Config:
    """The config for one call (rules in the module docstring): y (M, N), reduction length R, x of
    ``x_dtype`` in ``x_mode`` (X_REAL, X_SIGN, X_PACKED), trans_w for grad_input, on ``sms`` SMs."""
    name = role(x_mode, trans_w, x_dtype)
    if x_mode == X_REAL and not trans_w and M <= GEMV_M:
        return gemv_config(M, N, R, sms, table=table)
    if M > SMALL_M:
        base = table[("large", name)]
        tiles = cdiv(M, base.kwargs["BLOCK_M"]) * cdiv(N, base.kwargs["BLOCK_N"])
        # Few output tiles (a moderate batch or a narrow layer): K split too, into at most one
        # program per SM, so never a second wave.
        wanted = min(sms // tiles, MAX_SPLIT_K) if 2 * tiles <= sms else 1
    else:
        base = table[("small", name)]
        # At least two programs an SM (N = 8192 alone gives 128 tiles of 64 rows).
        wanted = min(cdiv(2 * sms, cdiv(N, base.kwargs["BLOCK_N"])), MAX_SPLIT_K)
    return with_kwargs(base, SPLIT_K=split_k(cdiv(R, base.kwargs["BLOCK_R"]), wanted))


@functools.cache
def _device_table(device: torch.device) -> tuple[Table, int]:
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return TABLES.get((props.major, props.minor), DEFAULT_TABLE), props.multi_processor_count
    return SM90, INTERPRETER_SMS


def default_config(
    x_mode: tl.constexpr, trans_w: bool, M: int, N: int, R: int, x_dtype: torch.dtype, device: torch.device
) -> triton.Config:
    """:func:`pick_config` with the table and SM count of ``device`` (CPU: SM90 and 132 SMs)."""
    table, sms = _device_table(device)
    return pick_config(x_mode, trans_w, M, N, R, x_dtype, sms, table)


def sign_config(
    x_mode: tl.constexpr, M: int, N: int, R: int, x_dtype: torch.dtype, device: torch.device
) -> triton.Config:
    """The config of a call that writes sign words (``gemm.w1a1_sign``, ``gemm.w1a16_sign``): the
    tensor-core kernel at every M (the GEMV has no sign epilogue) with the table's blocks for M,
    and no split-K: a program packs the bits of whole sums. Every table's BLOCK_N is a multiple of
    32, so a tile writes whole words."""
    table, _ = _device_table(device)
    base = table[("large" if M > SMALL_M else "small", role(x_mode, False, x_dtype))]
    return with_kwargs(base, SPLIT_K=1)
