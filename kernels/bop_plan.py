"""Launch planning of the fused Bop step: which tensors share a launch, their tables, reuse between steps.

:class:`FusedBop` turns the lists that :func:`bnnops.kernels.bop.bop_step` takes into launches of
the kernel in ``bnnops.kernels.bop``:

- it validates every tensor (devices, dtypes, shapes and layouts: ``bop_step``'s contract) and picks
  each one's addressing (``KernelVariant.FLAT`` and ``G_FLAT`` from shape, strides and 16-byte
  alignment);
- it groups the tensors by :class:`~bnnops.kernels.bop.KernelVariant`, one launch per variant, so a
  model's binary weights step in one or two launches;
- it writes each launch's table and uploads it once;
- it keeps that plan while the layout key (:func:`_layout_key`) stays the same: a step then only
  compares the key, uploads the gradient addresses or hyperparameters that changed (one pinned,
  asynchronous copy each) and launches. Nothing waits for the device.

Why: an optimizer steps the same tensors every step, and host time per tensor is what bounds the
step of a small model; comparing plain attribute reads is much cheaper than validating tensors
and building tables (measurements: docs/design.md).

A gradient the kernel cannot read in place (kernel dims whose strides do not merge into one) is
copied contiguous each step. Flip counts go to two int64 buffers used in turn: each step's kernel
zeroes the slots of the buffer the next step counts into.
"""

import contextlib
import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from bnnops.kernels.bop import TABLE_COLUMNS, KernelVariant, kernel_constants, launch
from bnnops.kernels.bop_configs import DEFAULT_CONFIG

__all__ = ["FusedBop"]

_TL_FLOAT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _cdiv(a, b):
    return -(-a // b)


# Layout checks on shape and stride tuples: plain Python, no torch ops (they run on every rebuild).


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
    if any(st != st_next * n_next for (_, st), (n_next, st_next) in itertools.pairwise(kernel)):
        return None
    return (stride[0], kernel[-1][1] if kernel else 0, stride[1])


def _check_state(name, s, g, packed_order):
    if s.shape != g.shape or s.device != g.device or s.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Bop state {name} must be float32 or bfloat16 of shape {tuple(g.shape)} on {g.device}")
    if s.numel() and not (_packed_order(s) if packed_order else s.is_contiguous()):  # no elements: any layout
        want = "in the packed layout's element order (s.movedim(1, -1) contiguous)" if packed_order else "contiguous"
        raise ValueError(f"Bop state {name} must be {want}")


def _address(x, offset):
    return 0 if x is None else x.data_ptr() + offset * x.element_size()


def _upload(values, dtype, device):
    """A host list as a tensor on ``device``: through pinned memory, so the copy does not sync."""
    cuda = device.type == "cuda"
    host = torch.tensor(values, dtype=dtype, pin_memory=cuda)
    return host.to(device, non_blocking=True) if cuda else host


def _hyper_table(values, device):
    """(gamma, threshold, sigma) per hyperparameter row as an fp32 (rows, 3) tensor on ``device``.

    Python numbers go up through a pinned upload; a 1-element tensor is written into its cell on
    the device (``fill_``: no host sync for a tensor on the device or the CPU). Either rounds to
    nearest fp32, as torch rounds a Python scalar.
    """
    gammas, thresholds, sigmas = values
    rows = list(zip(gammas, thresholds, sigmas or [0.0] * len(gammas)))
    table = _upload([[0.0 if isinstance(x, torch.Tensor) else x for x in row] for row in rows], torch.float32, device)
    for r, row in enumerate(rows):
        for c, x in enumerate(row):
            if isinstance(x, torch.Tensor):
                table[r, c].fill_(x.reshape(()))
    return table


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
    """One kernel launch: its table on the device and the constants it compiles with."""

    def __init__(self, rows, g_rows, variant, device, config):
        block_words = config.kwargs["BLOCK_WORDS"]
        first = 0
        for row in rows:
            row["first_block"] = first
            first += _cdiv(row["n_words"], block_words)
        self.grid = (first,)
        self.n_rows = len(rows)
        self.table = _upload([row[c] for c in TABLE_COLUMNS for row in rows], torch.int64, device)
        self.g_rows = g_rows  # per row: (tensor index, byte offset of the row's first element in g)
        self.constants = kernel_constants(variant, self.n_rows, config)
        self.device = device
        self.g_values = self.g_addresses = None

    def __call__(self, g_pointers, hyper, flips, flips_next):
        g_values = [g_pointers[i] + offset for i, offset in self.g_rows]
        if g_values != self.g_values:
            self.g_values, self.g_addresses = g_values, _upload(g_values, torch.int64, self.device)
        launch(self.grid, self.table, self.n_rows, self.g_addresses, hyper, flips, flips_next, self.constants)


class _Plan:
    """The launches for one layout key: the tensors validated once, the tables uploaded once."""

    def __init__(self, grads, weights, ms, vs, hyper_rows, key, config):
        n = len(grads)
        second = vs is not None
        self.key = key
        self.device = device = grads[0].device if n else torch.device("cpu")
        self.n_hyper = max(hyper_rows, default=-1) + 1  # the hyperparameter lists need at least this many rows
        # Gradients that the kernel cannot read in place: copied to a contiguous tensor each step.
        self.copies = []
        launches = {}  # KernelVariant -> (table rows as dicts of column values, g_rows)
        for i in range(n):
            g, w, m, v = grads[i], weights[i], ms[i], vs[i] if second else None
            is_words = w.dtype == torch.int32
            if g.device != device or w.device != device:
                raise ValueError(f"bop_step tensors must all be on {device}, got {g.device} and {w.device}")
            if g.dtype not in _TL_FLOAT or (is_words and g.dim() == 0):
                raise ValueError(
                    f"bop_step gradient {i} must be float32/bfloat16/float16 (of rank >= 1 for packed words), "
                    f"got {g.dtype}, rank {g.dim()}"
                )
            for name, s in (("m", m), ("v", v)):
                if s is not None:
                    _check_state(name, s, g, is_words)
            if second and v.dtype != m.dtype:
                raise ValueError("bop_step: m and v must have the same dtype")
            if hyper_rows[i] < 0:
                raise ValueError(f"bop_step: hyperparameter row {hyper_rows[i]} of tensor {i} must be >= 0")
            if g.numel() == 0:
                continue
            if is_words:
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
                # (first element, C, R, g strides, n_words) per table row
                parts = [(0, C, g.numel() // (O * C), strides, w.numel())]
                signs_dtype = tl.int32
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
                signs_dtype = _TL_FLOAT[w.dtype]
                g_flat = True
            for offset, C, R, (gs_o, gs_r, gs_c), n_words in parts:
                if C == 0:
                    continue
                at = {name: _address(x, offset) for name, x in (("m", m), ("v", v), ("signs", w))}
                g_at = _address(g, offset)
                variant = KernelVariant(
                    G_DTYPE=_TL_FLOAT[g.dtype],
                    SIGNS_DTYPE=signs_dtype,
                    WORDS=is_words,
                    FLAT=C % 32 == 0 and all(a % 16 == 0 for a in at.values()),
                    G_FLAT=g_flat and g_at % 16 == 0,
                    STATE_BF16=m.dtype == torch.bfloat16,
                    SECOND_ORDER=second,
                )
                rows, g_rows = launches.setdefault(variant, ([], []))
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
        self.launches = [_Launch(rows, g_rows, v, device, config) for v, (rows, g_rows) in launches.items()]
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
        # A tensor's value may change in place between steps: its table is rewritten every step.
        tensors = any(isinstance(x, torch.Tensor) for xs in values if xs is not None for x in xs)
        if tensors or values != self.hyper_values:
            n_rows = len(values[0])
            if n_rows < self.n_hyper or any(x is not None and len(x) != n_rows for x in values):
                raise ValueError(
                    f"bop_step needs gammas, thresholds (and sigmas) of one length, at least {self.n_hyper}: "
                    "a row for every hyper_rows entry"
                )
            self.hyper_values = None if tensors else values
            self.hyper = _hyper_table(values, self.device)
        if self.copies:
            grads = list(grads)  # the copies stay allocated until their kernel is launched
            for i in self.copies:
                grads[i] = grads[i].contiguous()
        g_pointers = [g.data_ptr() for g in grads]
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for step in self.launches:
                step(g_pointers, self.hyper, flips, flips_next)
        return flips


class FusedBop:
    """The fused Bop step for a set of tensors that changes little between steps (an optimizer's).

    :meth:`step` takes the arguments of :func:`bnnops.kernels.bop.bop_step`. The first call, and
    every call whose tensors differ from the previous call's in what the tables hold (the weight
    and state addresses, the gradients' dtype, shape, strides and alignment, the hyperparameter
    rows), validates them and plans the launches (``rebuilt`` is then True); any other call
    compares that key, uploads the gradient addresses and hyperparameters that changed (through
    pinned memory, no host sync) and launches.

    Args:
        config: the block config to launch with (``BLOCK_WORDS``, num_warps), for sweeps;
            default ``bnnops.kernels.bop_configs.DEFAULT_CONFIG``.
    """

    def __init__(self, config: triton.Config | None = None) -> None:
        self._plan: _Plan | None = None
        self.rebuilt: bool = False  # whether the last step planned anew
        self.config = config if config is not None else DEFAULT_CONFIG

    @property
    def counts(self) -> tuple[torch.Tensor, ...]:
        """The flip counts of the last step, one 0-d int64 tensor per tensor (views of its buffer)."""
        return self._plan.counts

    def step(
        self,
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
        """One fused step; see :func:`bnnops.kernels.bop.bop_step`.

        Without ``flips``, counts into one of two buffers of this object that the following steps
        overwrite (zero, then count again); returns that buffer.
        """
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
