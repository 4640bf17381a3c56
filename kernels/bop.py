"""The Bop step as one fused Triton pass over many tensors (Helwegen et al. 2019, arXiv 1906.02107).

Rule, per binary weight w in {-1, +1} with gradient g and gradient average m (``bnnops.optim.Bop``)::

    m <- m + gamma * (g - m)
    flip w where  w * m_hat > threshold  (strict: equality does not flip),  m_hat = m
    second order (Bop2ndOrder): also v <- v + sigma * (g*g - v),  m_hat = m / (sqrt(v) + 1e-10)

An element whose gradient is NaN or +-inf keeps its m, v and sign for the step and does not flip,
so one bad gradient element corrupts nothing, not even its own state.

State: m and v are float32 or bfloat16 (one dtype for both), computed in fp32 and stored in their
dtype; flip counts are int64. Gradients are float32, bfloat16 or float16.

Layouts the kernel reads. A binary weight's signs are int32 words (the weight layout of
``bnnops.packing``, bit 1 means -1) seen as (O, R, C), R = prod(kernel dims): word [o, r, wc] bit
j is logical element [o, 32 wc + j, r]. m and v are kept in that element order, (O, R, C)
contiguous, so they stream like the words; g is read in place through the strides of
``g.movedim(1, -1)`` viewed as (O, R, C) (a contiguous conv gradient is strided along C). A dense
weight (contiguous float +-1) is one flat row of whole 32-element words plus its ragged tail
(numel % 32 elements) as a (1, 1, numel % 32) tensor, each a row of the table below.

One pass reads g, m (and v) and the signs, writes m (and v) and the signs that flip, and counts
the flips per tensor: one relaxed int64 atomic add per program into the tensor's slot of
``flips``. It also zeroes that slot in ``flips_next``, the buffer the next step counts into (the
planner alternates two), so a step needs no memset launch. Each program owns BLOCK_WORDS whole
words of one tensor: bits are written without atomics, and only words (dense elements) that flip
are stored.

Launch tables (built by ``bnnops.kernels.bop_plan``). The layout table: int64, column-major over
``TABLE_COLUMNS`` (column c of row t at ``c * n_rows + t``), one row per tensor (two for a dense
tensor with a ragged tail), each row's geometry, first program, hyperparameter row and slot. A
program finds its row by a binary search over the sorted ``first_block`` column, so one launch
steps a whole model. The address table: int64 (slots, 4), per tensor (slot) the addresses of its
g, m, v and signs (``ADDRESS_COLUMNS``; v is 0 without a second moment), a row's elements starting
``offset`` elements in. The hyperparameters: fp32 (gamma, threshold, sigma) per hyperparameter
row. Layout and addresses are apart because they change at different rates: a new gradient each
step moves only addresses. Grid: (sum over rows of cdiv(n_words, BLOCK_WORDS),).

Constexprs: the fields of :class:`KernelVariant`; ``SEARCH_STEPS`` = ceil(log2(n_rows)) steps of
the binary search; ``BLOCK_WORDS`` from the block config (``bnnops.kernels.bop_configs``).

Rounding, identical on the GPU and in the interpreter, and equal to ``bnnops.optim.bop_reference_``
bit for bit: every multiply and add rounds to fp32 on its own (launched with
``enable_fp_fusion=False``: ``m + gamma * (g - m)`` must not become an FMA, which rounds once);
sqrt and division are IEEE round-to-nearest (``sqrt_rn``, ``div_rn``); gamma, sigma and threshold
are fp32 (as torch rounds a Python scalar against an fp32 tensor). bf16 state is rounded to
nearest-even on the bits (the interpreter's fp32->bf16 cast truncates); the flip test reads the
stored, rounded value.

Cost: bandwidth. Per binary weight the pass moves 12.25 bytes with fp32 state (g 4, m read and
written 8, one bit of words read and at most one written), 8.25 with bf16 state, 20.25 with v;
~8 flops. Measurements: docs/design.md.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["ADDRESS_COLUMNS", "TABLE_COLUMNS", "KernelLaunch", "KernelVariant", "bop_step"]

# Columns of the layout table, in order.
TABLE_COLUMNS = (
    "first_block",  # the row's first program
    "n_words",  # its number of (virtual) 32-element words
    "C",  # geometry of the (O, R, C) view: C, the length of the packed dimension;
    "words_per_row",  # ceil(C / 32);
    "R",  # prod(kernel dims)
    "gs_o",  # strides of g in that view, in elements
    "gs_r",
    "gs_c",
    "offset",  # the row's first element within its tensor (g, m, v and dense signs alike)
    "hyper",  # the row of the hyperparameter table (gamma, threshold, sigma)
    "slot",  # the tensor: its row of the address table, where its flips are counted
)
# Columns of the address table (one row per slot), in order.
ADDRESS_COLUMNS = ("g", "m", "v", "signs")
_COL = {name: tl.constexpr(i) for i, name in enumerate(TABLE_COLUMNS)}
_FIRST_BLOCK, _N_WORDS = _COL["first_block"], _COL["n_words"]
_C, _WORDS_PER_ROW, _R = _COL["C"], _COL["words_per_row"], _COL["R"]
_GS_O, _GS_R, _GS_C = _COL["gs_o"], _COL["gs_r"], _COL["gs_c"]
_OFFSET, _HYPER, _SLOT = _COL["offset"], _COL["hyper"], _COL["slot"]
_ADDR = {name: tl.constexpr(i) for i, name in enumerate(ADDRESS_COLUMNS)}
_G, _M, _V, _SIGNS = _ADDR["g"], _ADDR["m"], _ADDR["v"], _ADDR["signs"]
_N_ADDR = tl.constexpr(len(ADDRESS_COLUMNS))


class KernelVariant(NamedTuple):
    """The compile-time flags of one launch: every row of a table shares them."""

    G_DTYPE: tl.dtype  # the gradients': tl.float32, tl.bfloat16 or tl.float16
    SIGNS_DTYPE: tl.dtype  # tl.int32 for words, else the dense weights' tl float dtype
    WORDS: bool  # the signs are int32 words (bit 1 = -1); else dense +-1 floats
    # C % 32 == 0 and m, v, signs 16-byte aligned: element j of word q is 32 q + j, masks are per
    # word and those pointers are hinted for 16-byte vector loads and stores. Else the element
    # index comes from (row, C), masked against C.
    FLAT: bool
    # g laid out like m and 16-byte aligned: the same offsets and hints. Else g's offsets come
    # from its (O, R, C) strides (scalar loads: a contiguous conv gradient).
    G_FLAT: bool
    STATE_BF16: bool  # m and v are bfloat16 (addressed as their uint16 bits), else float32
    SECOND_ORDER: bool  # v and sigma step too (Bop2ndOrder)


@triton.jit
def _column(table, col, t, n):
    return tl.load(table + col * n + t)


@triton.jit
def _load_state(ptr, mask, STATE_BF16: tl.constexpr):
    if STATE_BF16:
        # bf16 bits (addressed as uint16) to fp32: exact, and no bf16 arithmetic for the interpreter.
        bits = tl.load(ptr, mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _store_state(ptr, x, mask, STATE_BF16: tl.constexpr):
    """Store fp32 ``x`` in the state's dtype; return the stored value as fp32."""
    if STATE_BF16:
        # Round to nearest, ties to even, on the bits: what torch's .to(bfloat16) does; the
        # interpreter's fp32->bf16 cast truncates instead. (m stays finite: non-finite g is skipped.)
        u = x.to(tl.uint32, bitcast=True)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        tl.store(ptr, bits, mask=mask)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        tl.store(ptr, x, mask=mask)
        return x


@triton.jit
def _row_and_channel(word, bit, words_per_row):
    """Row (o * R + r) of each word and logical channel c = 32 * (word in row) + bit of each element."""
    row = word // words_per_row
    return row, (word - row * words_per_row)[:, None] * 32 + bit[None, :]


@triton.jit
def _moving_average(old, target, rate, finite):
    # old + rate * (target - old), three fp32 roundings (no FMA: enable_fp_fusion=False).
    return tl.where(finite, old + rate * (target - old), old)


# n_rows varies with the model: not specialized, so one compile serves every model size.
@triton.jit(do_not_specialize=["n_rows"])
def _bop_kernel(
    table,
    addresses,
    hyper,
    n_rows,
    flips,
    flips_next,
    G_DTYPE: tl.constexpr,
    SIGNS_DTYPE: tl.constexpr,
    WORDS: tl.constexpr,
    FLAT: tl.constexpr,
    G_FLAT: tl.constexpr,
    STATE_BF16: tl.constexpr,
    SECOND_ORDER: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    """One Bop step of BLOCK_WORDS words of one table row; see the module docstring."""
    pid = tl.program_id(0)
    # This program's row: the last t with first_block[t] <= pid.
    lo = pid * 0
    hi = n_rows - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        up = _column(table, _FIRST_BLOCK, mid, n_rows) <= pid
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    t = lo

    slot = _column(table, _SLOT, t, n_rows)
    offset = _column(table, _OFFSET, t, n_rows)  # elements, the same for g, m, v and dense signs
    at = addresses + slot * _N_ADDR
    g_ptr = tl.load(at + _G).to(tl.pointer_type(G_DTYPE)) + offset
    h = _column(table, _HYPER, t, n_rows) * 3  # (gamma, threshold, sigma) in fp32
    if STATE_BF16:  # addressed as its uint16 bits
        m_ptr = tl.load(at + _M).to(tl.pointer_type(tl.uint16)) + offset
        v_ptr = tl.load(at + _V).to(tl.pointer_type(tl.uint16)) + offset
    else:
        m_ptr = tl.load(at + _M).to(tl.pointer_type(tl.float32)) + offset
        v_ptr = tl.load(at + _V).to(tl.pointer_type(tl.float32)) + offset
    signs_ptr = tl.load(at + _SIGNS).to(tl.pointer_type(SIGNS_DTYPE)) + offset
    n_words = _column(table, _N_WORDS, t, n_rows)
    first_block = _column(table, _FIRST_BLOCK, t, n_rows)

    word = (pid - first_block).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    bit = tl.arange(0, 32)
    word_mask = word < n_words
    if FLAT:
        # Every word is full and m (v, dense signs) sit in word order: element e = 32 * word + bit.
        # The host checked 16-byte alignment of every pointer hinted here.
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        signs_ptr = tl.multiple_of(signs_ptr, 16)
        e = word[:, None] * 32 + bit[None, :]
        mask = tl.broadcast_to(word_mask[:, None], (BLOCK_WORDS, 32))
    else:
        C = _column(table, _C, t, n_rows)
        row, c = _row_and_channel(word, bit, _column(table, _WORDS_PER_ROW, t, n_rows))
        e = row[:, None] * C + c
        mask = word_mask[:, None] & (c < C)
    if G_FLAT:
        # g is laid out like m (a linear or channels-last gradient).
        g_ptr = tl.multiple_of(g_ptr, 16)
        g_off = e
    else:
        R = _column(table, _R, t, n_rows)
        row, c = _row_and_channel(word, bit, _column(table, _WORDS_PER_ROW, t, n_rows))
        o = row // R
        r = row - o * R
        g_row = o * _column(table, _GS_O, t, n_rows) + r * _column(table, _GS_R, t, n_rows)
        g_off = g_row[:, None] + c * _column(table, _GS_C, t, n_rows)

    g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(g) < float("inf")  # false for NaN and +-inf
    m = _moving_average(_load_state(m_ptr + e, mask, STATE_BF16), g, tl.load(hyper + h), finite)
    m = _store_state(m_ptr + e, m, mask, STATE_BF16)
    if SECOND_ORDER:
        v = _load_state(v_ptr + e, mask, STATE_BF16)
        v = _moving_average(v, g * g, tl.load(hyper + h + 2), finite)
        v = _store_state(v_ptr + e, v, mask, STATE_BF16)
        m = tl.div_rn(m, tl.sqrt_rn(v) + 1e-10)

    threshold = tl.load(hyper + h + 1)
    if WORDS:
        words = tl.load(signs_ptr + word, mask=word_mask, other=0)
        negative = ((words[:, None] >> bit[None, :]) & 1) != 0  # bit 1 means -1
    else:
        signs = tl.load(signs_ptr + e, mask=mask, other=0.0).to(tl.float32)
        negative = signs < 0
    flip = mask & finite & tl.where(negative, -m > threshold, m > threshold)

    if WORDS:
        # Distinct powers of two: the sum is their OR (bit 31 wraps to the sign bit, as intended).
        flip_bits = tl.sum(flip.to(tl.int32) << bit[None, :], axis=1)
        tl.store(signs_ptr + word, words ^ flip_bits, mask=word_mask & (flip_bits != 0))
    else:
        # -signs is exact in fp32 and converts back exactly (dense weights hold +-1).
        tl.store(signs_ptr + e, (-signs).to(SIGNS_DTYPE), mask=flip)
    n_flips = tl.sum(flip.to(tl.int32)).to(tl.int64)
    # A counter, not an ordering point: relaxed is enough.
    tl.atomic_add(flips + slot, n_flips, mask=n_flips > 0, sem="relaxed")
    tl.store(flips_next + slot, 0, mask=pid == first_block)


def _launch_hooks_set() -> bool:
    """Whether a Triton launch hook (a profiler) is registered: its hooks need the JIT's launch metadata."""
    runtime = triton.knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    # A HookChain (its ``calls`` list) in recent Triton, a callable or None in older ones.
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


def _launchable(kernel: Any) -> bool:
    """Whether a JIT launch returned a compiled kernel with its own launcher (the interpreter returns none)."""
    return all(hasattr(kernel, name) for name in ("run", "function", "packed_metadata"))


class KernelLaunch:
    """One launch of the kernel over one layout table, prepared once; each call launches it (asynchronous).

    Made once per table: the grid and the constants (the variant's flags, the binary search's depth,
    the block config, FMA contraction off: the rounding contract). The first call goes through
    Triton's JIT (argument binding, specialization, compile). When that returns a compiled kernel
    (on a GPU; the interpreter returns none) and every pointer argument was 16-byte aligned, later
    calls go straight to the compiled kernel's own launcher with the arguments in the kernel's
    order, which skips the JIT's per-call binding and cache lookup. A call takes the JIT path again
    while a Triton launch hook is registered (profilers read the JIT's launch metadata) or when a
    pointer is not 16-byte aligned (the compiled kernel may assume alignment). Every call launches
    on the current device and stream; the caller makes the tensors' device current.

    Args:
        table: the int64 layout table (``TABLE_COLUMNS``, column-major), on the launch's device.
        n_rows: its number of rows.
        grid: (number of programs,): the sum over rows of cdiv(n_words, BLOCK_WORDS).
        variant: the compile-time flags every row shares.
        config: the block config (``BLOCK_WORDS``, num_warps, num_stages).
    """

    def __init__(
        self, table: torch.Tensor, n_rows: int, grid: tuple[int], variant: KernelVariant, config: triton.Config
    ) -> None:
        self.table = table
        self.n_rows = n_rows
        self.grid = grid
        # The JIT's keyword arguments: the constexprs (in the kernel's order) and the options.
        self.constants = dict(variant._asdict(), SEARCH_STEPS=(n_rows - 1).bit_length(), **config.kwargs)
        self.options = dict(num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False)
        self._compiled = None  # the compiled kernel, once the JIT returned one
        self._current_stream = None  # Triton's "current stream of a device" function
        self._device = None  # the device index the kernel was loaded on

    @property
    def direct(self) -> bool:
        """Whether calls go straight to the compiled kernel's launcher (after a first JIT launch on a GPU)."""
        return self._compiled is not None

    def __call__(
        self, addresses: torch.Tensor, hyper: torch.Tensor, flips: torch.Tensor, flips_next: torch.Tensor
    ) -> None:
        """Launch over the table (layouts in the module docstring).

        Args:
            addresses: int64 (slots, 4): per slot the addresses of ``ADDRESS_COLUMNS``.
            hyper: fp32 (rows, 3): (gamma, threshold, sigma) per hyperparameter row.
            flips: int64, counted into at each row's slot.
            flips_next: int64 like ``flips``: each row's slot is zeroed.
        """
        compiled = self._compiled
        if compiled is not None and not _launch_hooks_set():
            a, h, f, n = addresses.data_ptr(), hyper.data_ptr(), flips.data_ptr(), flips_next.data_ptr()
            if not (a | h | f | n) & 15:
                # The launcher takes every kernel argument in order (it drops the constexprs) and
                # pointers as integers; no launch metadata, no hooks (checked above).
                compiled.run(
                    self.grid[0], 1, 1, self._current_stream(self._device), compiled.function,
                    compiled.packed_metadata, None, None, None,
                    self._table_address, a, h, self.n_rows, f, n, *self._constant_values,
                )  # fmt: skip
                return
        compiled = _bop_kernel[self.grid](
            self.table, addresses, hyper, self.n_rows, flips, flips_next, **self.constants, **self.options
        )
        pointers = (self.table, addresses, hyper, flips, flips_next)
        if self._compiled is None and _launchable(compiled) and not any(x.data_ptr() & 15 for x in pointers):
            driver = triton.runtime.driver.active
            self._device = driver.get_current_device()
            self._current_stream = driver.get_current_stream
            self._table_address = self.table.data_ptr()
            self._constant_values = tuple(self.constants[name] for name in _CONSTEXPRS)
            self._compiled = compiled


# The kernel's constexpr parameters, in its order (after the six runtime arguments).
_CONSTEXPRS = (*KernelVariant._fields, "SEARCH_STEPS", "BLOCK_WORDS")


def bop_step(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    gammas: Sequence[float | torch.Tensor],
    thresholds: Sequence[float | torch.Tensor],
    *,
    vs: Sequence[torch.Tensor] | None = None,
    sigmas: Sequence[float | torch.Tensor] | None = None,
    hyper_rows: Sequence[int] | None = None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused Bop step, in place, over many tensors on one device.

    Args:
        grads: float32/bfloat16/float16 gradients, each of its weight's logical shape (of rank
            >= 1 for a binary weight; any rank, 0 included, for a dense one; zero-size ones are
            left alone). A binary weight's gradient may have any strides: it is read through
            ``g.movedim(1, -1)`` viewed as (O, R, C) (copied first if not viewable so); a dense
            weight's gradient must be contiguous.
        weights: per gradient, either the int32 words of a binary weight (the layout of
            ``bnnops.packing``: (N, ceil(K/32)) for (N, K), (O, *kernel, ceil(C/32)) for
            (O, C, *kernel), (ceil(K/32),) for (K,)), or a dense contiguous float tensor of
            +-1 of the gradient's shape.
        ms: gradient averages, float32 or bfloat16, of the logical shape: for words in the
            packed layout's element order (``m.movedim(1, -1)`` contiguous), for dense weights
            contiguous.
        gammas, thresholds: Python numbers or 1-element floating-point tensors (rounded to
            fp32), one per hyperparameter row. A tensor is read on the device at each call (no
            host sync when it is on the device or the CPU).
        vs, sigmas: second moments (like ``ms``, the same dtype) and their rates (one per row)
            for Bop2ndOrder, or None for first-order Bop. One call is either first or second order.
        hyper_rows: per gradient, which row of gammas/thresholds/sigmas it uses (an optimizer
            passes its param-group index; rows no gradient uses are allowed); default: row i for
            gradient i.
        flips: optional int64 tensor (len(grads),) on the device to count into (zeroed first).

    Returns:
        int64 tensor (len(grads),): how many weights of each tensor flipped.

    Raises:
        ValueError: tensors on different devices, a dtype, shape or layout outside the above,
            mismatched list lengths, or fewer hyperparameter rows than ``hyper_rows`` names.

    This plans the launches for one call; an optimizer keeps a
    ``bnnops.kernels.bop_plan.FusedBop``, which plans once and reuses the plan while its tensors
    stay where they are.
    """
    from bnnops.kernels.bop_plan import FusedBop  # here: the planner imports this module

    return FusedBop().step(
        grads, weights, ms, gammas, thresholds, vs=vs, sigmas=sigmas, hyper_rows=hyper_rows, flips=flips
    )
