"""The Bop step as one fused Triton pass over many tensors (Helwegen et al. 2019, arXiv 1906.02107).

Per binary weight w in {-1, +1} with gradient g and gradient average m (``bnnops.optim.Bop``)::

    m <- m + gamma * (g - m)                                 (elements with finite g only)
    flip w where  w * m_hat > threshold  (strict),  m_hat = m
    second order (Bop2ndOrder): also v <- v + sigma * (g*g - v), m_hat = m / (sqrt(v) + 1e-10)

An element whose gradient is NaN or +-inf is left alone for the step: its m, v and sign keep their
values and it does not flip (so one bad gradient element corrupts nothing, not even its own state).

One pass reads g, m (and v) and the weight, writes m (and v) and the weight, and counts the flips
per tensor (exact int64, one atomic add per program into the tensor's slot). It also zeroes the
tensor's slot in the counters the next step will count into (two buffers alternate), so a step
needs no memset launch of its own. Each program owns BLOCK_WORDS whole 32-element words of one
tensor, so bits are written without atomics, and only the words (or dense elements) that flip are
stored.

Many tensors per launch: the launcher builds a small int64 table (column-major, ``_COLUMNS``) with
each tensor's state and weight addresses, geometry, first program and hyperparameter row; a
program finds its tensor by a binary search over the first-program column. The gradient addresses
and the fp32 hyperparameters (gamma, threshold, sigma) sit in two more small tensors, as they
change between steps. Tensors are grouped into launches by what must be compile-time constant
(gradient dtype, state dtype, weight kind, layout), so a whole model's binary weights step in one
or two launches.

Host cost. An optimizer keeps a :class:`FusedBop`: it validates the tensors and uploads the tables
once, then per step only compares a key of plain attribute reads (~1 us per tensor), re-uploads
the gradient addresses or hyperparameters when they changed (one pinned, asynchronous copy each)
and launches. Nothing waits for the device. ``Bop.step()`` then costs about 40 us plus 2.5 us
per tensor of host time on a 2-core CPU with the launch stubbed (it was 85 us plus 37 us per
tensor when the tables were rebuilt every step), plus one Triton launch per table.

Layouts. A packed weight is seen as (O, R, C) with R = prod(kernel dims): word [o, r, wc] bit j
is logical element [o, 32wc + j, r] (the weight layout of ``bnnops.packing``). m (and v) are kept
in that element order, (O, R, C) contiguous, so they stream like the words; g is read in place,
through the strides of ``g.movedim(1, -1)`` viewed as (O, R, C) (a contiguous conv gradient is
strided along C; a linear or channels-last gradient is laid out like m). A dense weight is one
flat row of whole words plus its ragged tail (numel % 32 elements) as a (1, 1, numel % 32)
tensor. Two constexpr flags pick the addressing, per launch:

- ``FLAT``: C is a multiple of 32, so element j of word q is 32q + j of m (and v, dense w), masks
  are per word, and the pointers (checked 16-byte aligned on the host) are hinted so these
  tensors move in 16-byte vector loads and stores. Otherwise the element index is computed from
  (row, C) and masked against C (ragged C).
- ``G_FLAT``: g is laid out like m (and aligned): the same offsets and hints. Otherwise g's
  offsets come from its (O, R, C) strides (scalar loads: a contiguous conv gradient).

Rounding, identical on the GPU and in the interpreter, and equal to the reference bit for bit:
every multiply and add rounds to fp32 on its own (kernels launch with ``enable_fp_fusion=False``,
so ``m + gamma * (g - m)`` is not contracted into an FMA, which rounds once); sqrt and division
are the IEEE round-to-nearest ``sqrt_rn`` / ``div_rn``; gamma, sigma and threshold are rounded to
fp32 (as torch does with a Python scalar and an fp32 tensor). bf16 state is computed in fp32 and
rounded to nearest-even on the bits (the interpreter's fp32->bf16 cast truncates); the flip test
uses the stored (rounded) value.

Cost (two numbers): per binary weight the pass must move 12.25 bytes with fp32 state (4 B of g
read, 4 B of m read and written, 1 bit of w read and at most 1 written), 8.25 bytes with bf16
state, 20.25 with the second moment; the arithmetic (~8 flops) is negligible, so the ceiling is
bandwidth: at 3.0 TB/s (an H100's device-to-device copy) 1e9 weights cannot step faster than 4.1
ms. Measured (H100, ``bench/results/``): 1.07e9 weights in 5.05 ms, 87% of the copy bandwidth;
smaller models were then bound by the host cost of the step, since cut (see Host cost).
"""

import contextlib

import torch
import triton
import triton.language as tl

# 32 words = 1024 elements per program, 8 per thread with 4 warps: many small programs per SM keep
# the stream going. Measured on an H100 (bench/results/, `python -m bench.cases.bop --quick`,
# fused step GPU time): 105M weights 421 us (3.05 TB/s) vs 488 us with 64 words; 10.5M 49 vs 56 us;
# 128 words x 4 warps and 64 x 8 were within 1% of 32 x 4, 128 x 8 the slowest (541 us).
BLOCK_WORDS = 32
NUM_WARPS = 4

# Columns of the static launch table: int64, column-major (column c of row t at c * n_rows + t), so
# the first-program column is one sorted array for the binary search. The gradient addresses and
# the hyperparameters change between steps and live in two small tensors of their own.
_COLUMNS = (
    "m",
    "v",
    "w",  # addresses (v is 0 without a second moment)
    "first_block",
    "n_words",  # the row's first program, its number of (virtual) words
    "C",
    "words_per_row",
    "R",  # geometry of the (O, R, C) view: packed length, ceil(C/32), prod(kernel)
    "gs_o",
    "gs_r",
    "gs_c",  # strides of g in that view, in elements
    "hyper",  # the row of the hyperparameter table (gamma, threshold, sigma)
    "slot",  # where the tensor's flips are counted
)
_COL = {name: tl.constexpr(i) for i, name in enumerate(_COLUMNS)}
_M, _V, _W = _COL["m"], _COL["v"], _COL["w"]
_FIRST_BLOCK, _N_WORDS = _COL["first_block"], _COL["n_words"]
_C, _WORDS_PER_ROW, _R = _COL["C"], _COL["words_per_row"], _COL["R"]
_GS_O, _GS_R, _GS_C = _COL["gs_o"], _COL["gs_r"], _COL["gs_c"]
_HYPER, _SLOT = _COL["hyper"], _COL["slot"]


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
        # interpreter's fp32->bf16 cast truncates instead. (m stays finite, see the module doc.)
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
    g_addresses,
    hyper,
    n_rows,
    flips,
    flips_next,
    G_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    PACKED: tl.constexpr,
    FLAT: tl.constexpr,
    G_FLAT: tl.constexpr,
    STATE_BF16: tl.constexpr,
    SECOND_ORDER: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    pid = tl.program_id(0)
    # This program's tensor: the last t with first_block[t] <= pid.
    lo = pid * 0
    hi = n_rows - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        up = _column(table, _FIRST_BLOCK, mid, n_rows) <= pid
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid - 1)
    t = lo

    g_ptr = tl.load(g_addresses + t).to(tl.pointer_type(G_DTYPE))
    h = _column(table, _HYPER, t, n_rows) * 3  # (gamma, threshold, sigma) in fp32
    if STATE_BF16:  # addressed as its uint16 bits
        m_ptr = _column(table, _M, t, n_rows).to(tl.pointer_type(tl.uint16))
        v_ptr = _column(table, _V, t, n_rows).to(tl.pointer_type(tl.uint16))
    else:
        m_ptr = _column(table, _M, t, n_rows).to(tl.pointer_type(tl.float32))
        v_ptr = _column(table, _V, t, n_rows).to(tl.pointer_type(tl.float32))
    w_ptr = _column(table, _W, t, n_rows).to(tl.pointer_type(W_DTYPE))
    n_words = _column(table, _N_WORDS, t, n_rows)
    first_block = _column(table, _FIRST_BLOCK, t, n_rows)

    word = (pid - first_block).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    bit = tl.arange(0, 32)
    word_mask = word < n_words
    if FLAT:
        # Every word is full and m (v, dense w) sit in word order: element e = 32 * word + bit.
        # The host checked 16-byte alignment of every pointer hinted here.
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
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
        g_off = (o * _column(table, _GS_O, t, n_rows) + r * _column(table, _GS_R, t, n_rows))[:, None] + c * _column(
            table, _GS_C, t, n_rows
        )

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
    if PACKED:
        words = tl.load(w_ptr + word, mask=word_mask, other=0)
        negative = ((words[:, None] >> bit[None, :]) & 1) != 0  # bit 1 means -1
    else:
        w = tl.load(w_ptr + e, mask=mask, other=0.0).to(tl.float32)
        negative = w < 0
    flip = mask & finite & tl.where(negative, -m > threshold, m > threshold)

    if PACKED:
        # Distinct powers of two: the sum is their OR (bit 31 wraps to the sign bit, as intended).
        flip_bits = tl.sum(flip.to(tl.int32) << bit[None, :], axis=1)
        tl.store(w_ptr + word, words ^ flip_bits, mask=word_mask & (flip_bits != 0))
    else:
        # -w is exact in fp32 and converts back exactly (dense weights hold +-1).
        tl.store(w_ptr + e, (-w).to(W_DTYPE), mask=flip)
    n_flips = tl.sum(flip.to(tl.int32)).to(tl.int64)
    slot = _column(table, _SLOT, t, n_rows)
    # A counter, not an ordering point: relaxed is enough.
    tl.atomic_add(flips + slot, n_flips, mask=n_flips > 0, sem="relaxed")
    tl.store(flips_next + slot, 0, mask=pid == first_block)


_TL_FLOAT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _cdiv(a, b):
    return -(-a // b)


# Layout checks on shape and stride tuples: plain Python (they run when the tables are built).


def _packed_order(x):
    """x laid out in the packed layout's element order: (O, *kernel, C) contiguous."""
    if x.dim() == 1:
        return x.is_contiguous()
    shape, stride = x.shape, x.stride()
    expected = 1
    for n, st in reversed(list(zip((shape[0], *shape[2:], shape[1]), (stride[0], *stride[2:], stride[1])))):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _rows_view_strides(g):
    """Strides (o, r, c) of ``g.movedim(1, -1)`` seen as (O, R, C), or None if not viewable."""
    stride = g.stride()
    if g.dim() == 1:
        return (0, 0, stride[0])
    kernel = [(n, st) for n, st in zip(g.shape[2:], stride[2:]) if n != 1]
    # The kernel dims merge into one when each steps over the whole of the next.
    if any(st != st_next * n_next for (_, st), (n_next, st_next) in zip(kernel, kernel[1:])):
        return None
    return (stride[0], kernel[-1][1] if kernel else 0, stride[1])


def _check_state(name, s, g, packed):
    if s.shape != g.shape or s.device != g.device or s.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Bop state {name} must be float32 or bfloat16 of shape {tuple(g.shape)} on {g.device}")
    if not (_packed_order(s) if packed else s.is_contiguous()):
        want = "in the packed layout's element order (s.movedim(1, -1) contiguous)" if packed else "contiguous"
        raise ValueError(f"Bop state {name} must be {want}")


def _address(x, offset):
    return 0 if x is None else x.data_ptr() + offset * x.element_size()


def _upload(values, dtype, device):
    """A host list as a tensor on ``device``: through pinned memory, so the copy does not sync."""
    cuda = device.type == "cuda"
    host = torch.tensor(values, dtype=dtype, pin_memory=cuda)
    return host.to(device, non_blocking=True) if cuda else host


def _layout_key(grads, weights, ms, vs, hyper_rows):
    """Everything the launch tables depend on, as a flat list compared between steps.

    Per tensor: the gradient's dtype, shape, strides and 16-byte alignment (they pick the
    addressing), the weight's and states' dtypes and addresses (the tables hold them), and the
    tensor's hyperparameter row. Not the gradient's address (zero_grad(set_to_none=True) gives a
    new gradient each step; it is uploaded when it changes) nor the hyperparameter values.
    Plain attribute reads, about a microsecond per tensor.
    """
    key = []
    for g, w, m, v, h in zip(grads, weights, ms, vs if vs is not None else [None] * len(grads), hyper_rows):
        key += (
            g.dtype,
            g.shape,
            g.stride(),
            g.data_ptr() & 15,
            w.dtype,
            w.data_ptr(),
            m.dtype,
            m.data_ptr(),
            0 if v is None else v.data_ptr(),
            h,
        )
    return key


class _Launch:
    """One kernel launch: its static table on the device and the constants it compiles with."""

    def __init__(self, rows, g_rows, constexprs, device, config):
        block_words, num_warps = config
        first = 0
        for row in rows:
            row["first_block"] = first
            first += _cdiv(row["n_words"], block_words)
        self.grid = (first,)
        self.n_rows = len(rows)
        self.table = _upload([row[c] for c in _COLUMNS for row in rows], torch.int64, device)
        self.g_rows = g_rows  # per row: (tensor index, byte offset of the row's first element in g)
        self.constexprs = dict(
            constexprs,
            SEARCH_STEPS=(len(rows) - 1).bit_length(),
            BLOCK_WORDS=block_words,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
        self.device = device
        self.g_values = self.g_addresses = None

    def __call__(self, g_pointers, hyper, flips, flips_next):
        g_values = [g_pointers[i] + offset for i, offset in self.g_rows]
        if g_values != self.g_values:
            self.g_values, self.g_addresses = g_values, _upload(g_values, torch.int64, self.device)
        _bop_kernel[self.grid](self.table, self.g_addresses, hyper, self.n_rows, flips, flips_next, **self.constexprs)


class _Plan:
    """The launches for one layout key: the tensors validated once, the static tables uploaded once."""

    def __init__(self, grads, weights, ms, vs, hyper_rows, key, config):
        n = len(grads)
        second = vs is not None
        self.key = key
        self.device = device = grads[0].device if n else torch.device("cpu")
        self.n_hyper = max(hyper_rows, default=-1) + 1  # the hyperparameter lists need at least this many rows
        # Gradients that the kernel cannot read in place: copied to a contiguous tensor each step.
        self.copies = []
        launches = {}  # constexpr key -> (table rows as dicts of column values, g_rows)
        for i in range(n):
            g, w, m, v = grads[i], weights[i], ms[i], vs[i] if second else None
            packed = w.dtype == torch.int32
            if g.device != device or w.device != device:
                raise ValueError(f"bop_step tensors must all be on {device}, got {g.device} and {w.device}")
            if g.dtype not in _TL_FLOAT or g.dim() == 0:
                raise ValueError(
                    f"bop_step gradient {i} must be float32/bfloat16/float16 of rank >= 1, got {g.dtype}, rank {g.dim()}"
                )
            for name, s in (("m", m), ("v", v)):
                if s is not None:
                    _check_state(name, s, g, packed)
            if second and v.dtype != m.dtype:
                raise ValueError("bop_step: m and v must have the same dtype")
            if hyper_rows[i] < 0:
                raise ValueError(f"bop_step: hyperparameter row {hyper_rows[i]} of tensor {i} must be >= 0")
            if g.numel() == 0:
                continue
            if packed:
                O, C = (1, g.shape[0]) if g.dim() == 1 else g.shape[:2]
                expected = (_cdiv(C, 32),) if g.dim() == 1 else (O, *g.shape[2:], _cdiv(C, 32))
                if tuple(w.shape) != expected or not w.is_contiguous():
                    raise ValueError(
                        f"packed words {tuple(w.shape)} do not hold a weight of shape {tuple(g.shape)} "
                        f"(expected contiguous words {expected})"
                    )
                strides = _rows_view_strides(g)
                if strides is None:
                    g = g.contiguous()
                    self.copies.append(i)
                    strides = _rows_view_strides(g)
                parts = [(0, C, g.numel() // (O * C), strides, w.numel())]
                w_dtype = tl.int32
                g_flat = _packed_order(g)
            else:
                if w.shape != g.shape or w.dtype not in _TL_FLOAT or not (w.is_contiguous() and g.is_contiguous()):
                    raise ValueError(
                        f"dense weight {i} must be a contiguous float tensor of the gradient's shape "
                        f"{tuple(g.shape)}, with a contiguous gradient"
                    )
                # A flat body of whole 32-element words, and the ragged tail as a (1, 1, rest) tensor.
                body = g.numel() - g.numel() % 32
                parts = [(0, body, 1, (0, 0, 1), body // 32), (body, g.numel() - body, 1, (0, 0, 1), 1)]
                w_dtype = _TL_FLOAT[w.dtype]
                g_flat = True
            for offset, C, R, (gs_o, gs_r, gs_c), n_words in parts:
                if C == 0:
                    continue
                at = {name: _address(x, offset) for name, x in (("m", m), ("v", v), ("w", w))}
                flat = C % 32 == 0 and all(a % 16 == 0 for a in at.values())
                g_at = _address(g, offset)
                constexprs = dict(
                    G_DTYPE=_TL_FLOAT[g.dtype],
                    W_DTYPE=w_dtype,
                    PACKED=packed,
                    FLAT=flat,
                    G_FLAT=g_flat and g_at % 16 == 0,
                    STATE_BF16=m.dtype == torch.bfloat16,
                    SECOND_ORDER=second,
                )
                rows, g_rows = launches.setdefault(tuple(constexprs.items()), ([], []))
                rows.append(
                    dict(
                        **at,
                        n_words=n_words,
                        C=C,
                        words_per_row=_cdiv(C, 32),
                        R=R,
                        gs_o=gs_o,
                        gs_r=gs_r,
                        gs_c=gs_c,
                        hyper=hyper_rows[i],
                        slot=i,
                    )
                )
                g_rows.append((i, offset * g.element_size()))
        self.launches = [_Launch(rows, g_rows, dict(k), device, config) for k, (rows, g_rows) in launches.items()]
        # Flip counters: two buffers that steps use in turn; each step's kernel zeroes the other.
        self.buffers = torch.zeros(2, n, dtype=torch.int64, device=device).unbind()
        self.views = tuple(b.unbind() for b in self.buffers)  # per tensor, made once
        self.turn = 0
        self.counts = None
        self.hyper_values = self.hyper = None

    def run(self, grads, gammas, thresholds, sigmas, flips):
        if flips is None:
            flips, self.counts = self.buffers[self.turn], self.views[self.turn]
            self.turn ^= 1
        else:
            flips.zero_()
            self.counts = flips.unbind()
        flips_next = self.buffers[self.turn]  # zeroed by this step's kernels
        values = (list(gammas), list(thresholds), None if sigmas is None else list(sigmas))
        if values != self.hyper_values:
            n_rows = len(values[0])
            if n_rows < self.n_hyper or any(x is not None and len(x) != n_rows for x in values):
                raise ValueError(
                    f"bop_step needs gammas, thresholds (and sigmas) of one length, at least {self.n_hyper}: "
                    "a row for every hyper_rows entry"
                )
            self.hyper_values = values
            rows = zip(values[0], values[1], values[2] or [0.0] * n_rows)
            # torch.tensor rounds each double to the nearest fp32, as torch does with a Python scalar.
            self.hyper = _upload(list(rows), torch.float32, self.device)
        if self.copies:
            grads = list(grads)  # the copies stay allocated until their kernel is launched
            for i in self.copies:
                grads[i] = grads[i].contiguous()
        g_pointers = [g.data_ptr() for g in grads]
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for launch in self.launches:
                launch(g_pointers, self.hyper, flips, flips_next)
        return flips


class FusedBop:
    """The fused Bop step for a set of tensors that changes little between steps (an optimizer's).

    :meth:`step` takes the arguments of :func:`bop_step`. The first call, and every call whose
    tensors differ from the previous call's in what the launch tables hold (``_layout_key``: the
    weight and state addresses, the gradients' dtype, shape, strides and alignment, the
    hyperparameter rows), validates them and builds the tables (``rebuilt`` is then True); any
    other call compares that key, uploads the gradient addresses and hyperparameters that changed
    (through pinned memory, no host sync) and launches: a few microseconds per tensor.

    ``config``: (BLOCK_WORDS, num_warps) to launch with, for sweeps; default the module's.
    """

    def __init__(self, config=None):
        self._plan = None
        self.rebuilt = False
        self.config = config or (BLOCK_WORDS, NUM_WARPS)

    @property
    def counts(self):
        """The flip counts of the last step, one 0-d int64 tensor per tensor (views of its buffer)."""
        return self._plan.counts

    def step(self, grads, weights, ms, gammas, thresholds, *, vs=None, sigmas=None, hyper_rows=None, flips=None):
        """One fused step; see :func:`bop_step`. Without ``flips``, counts into one of two buffers of
        this object that the following steps overwrite (zero, then count again)."""
        n = len(grads)
        if not (len(weights) == len(ms) == n) or (vs is not None and len(vs) != n):
            raise ValueError("bop_step needs one weight and one state (m, and v when given) per gradient")
        if (vs is None) != (sigmas is None):
            raise ValueError("bop_step takes vs and sigmas together (second order) or neither")
        hyper_rows = range(n) if hyper_rows is None else hyper_rows
        if len(hyper_rows) != n:
            raise ValueError("bop_step needs one hyperparameter row per gradient")
        key = _layout_key(grads, weights, ms, vs, hyper_rows)
        self.rebuilt = self._plan is None or key != self._plan.key
        if self.rebuilt:
            self._plan = None  # free the old tables first
            self._plan = _Plan(grads, weights, ms, vs, hyper_rows, key, self.config)
        return self._plan.run(grads, gammas, thresholds, sigmas, flips)


def bop_step(grads, weights, ms, gammas, thresholds, *, vs=None, sigmas=None, hyper_rows=None, flips=None):
    """One fused Bop step, in place, over many tensors on one device.

    Args:
        grads: list of float32/bfloat16/float16 gradients, each of its weight's logical shape.
            A packed weight's gradient may have any strides: it is read through
            ``g.movedim(1, -1)`` viewed as (O, R, C) (copied first if not viewable so); a dense
            weight's gradient must be contiguous.
        weights: list, per gradient, either the int32 packed words of a binary weight (the
            layout of ``bnnops.packing``: (N, ceil(K/32)) for (N, K), (O, *kernel, ceil(C/32))
            for (O, C, *kernel), (ceil(K/32),) for (K,)), or a dense contiguous float tensor of
            +-1 of the gradient's shape.
        ms: gradient averages, float32 or bfloat16, of the logical shape: for packed weights in
            the packed layout's element order (``m.movedim(1, -1)`` contiguous), for dense
            weights contiguous.
        gammas, thresholds: floats (rounded to fp32), one per hyperparameter row.
        vs, sigmas: second moments (like ``ms``, same dtypes) and their rates (one per row) for
            Bop2ndOrder, or None for first-order Bop. One call is either first or second order.
        hyper_rows: per gradient, which row of gammas/thresholds/sigmas it uses (an optimizer
            passes its param-group index; rows no gradient uses are allowed); default: row i for
            gradient i.
        flips: optional int64 tensor (len(grads),) on the device to count into (zeroed first).

    Returns:
        int64 tensor (len(grads),): how many weights of each tensor flipped.

    This builds the launch tables for one call; an optimizer keeps a :class:`FusedBop`, which
    builds them once and reuses them while its tensors stay where they are.
    """
    return FusedBop().step(
        grads, weights, ms, gammas, thresholds, vs=vs, sigmas=sigmas, hyper_rows=hyper_rows, flips=flips
    )
