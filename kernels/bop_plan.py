"""Launch planning of the fused Bop step: which tensors share a launch, their tables, reuse between steps.

:class:`FusedBop` turns the lists that :func:`bnnops.kernels.bop.bop_step` takes into launches of
the kernel in ``bnnops.kernels.bop``. Planning (:class:`_Plan`):

- validates every tensor (devices, dtypes, shapes and layouts: ``bop_step``'s contract) and picks
  each one's addressing (``KernelVariant.FLAT`` and ``G_FLAT`` from shape, strides and 16-byte
  alignment): :func:`_plan_tensor`, whose result is the tensor's layout;
- groups the rows by :class:`~bnnops.kernels.bop.KernelVariant`, one
  :class:`~bnnops.kernels.bop.KernelLaunch` per variant (a model's binary weights step in one or two
  launches), and uploads their layout tables once.

A plan is reused while the call's tensors keep its layouts. Each call checks, in passes over the
lists that run in C (``map`` over tensor methods; no Python statement per tensor): the dtype, shape
and strides of every gradient, weight and state (a new gradient tensor each step is the normal
case; a weight or state can be changed in place by ``.data =``, ``resize_``, ``set_``), and every
address (and the devices of zero-size tensors, which all have address 0). Where only addresses
changed it uploads a new address table (kept in a small cache keyed by the addresses: the caching
allocator tends to hand the gradients of the next backward the same addresses again); a weight or
state at a new address is validated again, alone, and where its layout is unchanged only the
addresses are refreshed. Any other difference (a dtype, shape or strides, the number of tensors,
the hyperparameter rows, a layout that changed) plans anew, which validates every tensor and
raises ``bop_step``'s errors. Nothing here waits for the device.

Why: an optimizer steps the same tensors every step, and the host time per tensor is what bounds
the step of a small model (measurements: docs/design.md).

A gradient the kernel cannot read in place (kernel dims whose strides do not merge into one) is
copied contiguous each step. Flip counts go to two int64 buffers used in turn: each step's kernel
zeroes the slots of the buffer the next step counts into.

Not capturable in a CUDA graph: planning uploads its tables from host memory made for that step
(a replay would read freed pinned memory), and a replay would count into one of the two flip
buffers every time without zeroing it. :meth:`FusedBop.ready` raises a RuntimeError while the
current CUDA stream is capturing instead of recording such a step; ``Bop(capturable=True)``
steps on the PyTorch reference path, which a graph can hold.
"""

import functools
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from bnnops.kernels import cdiv
from bnnops.kernels.bop import TABLE_COLUMNS, KernelLaunch, KernelVariant
from bnnops.kernels.bop_configs import DEFAULT_CONFIG

__all__ = ["FusedBop"]

_TL_FLOAT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Per-tensor reads for the per-call checks, each mapped over a whole list at once.
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_STRIDE = torch.Tensor.stride
_ADDRESS = torch.Tensor.data_ptr
_DEVICE = operator.attrgetter("device")
_TENSOR = itertools.repeat(torch.Tensor)
# Address tables kept per plan (one per distinct set of addresses seen, oldest dropped first).
_ADDRESS_CACHE = 8


# Layout checks on shape and stride tuples: plain Python, no torch ops (they run on every plan).


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


class _Row(NamedTuple):
    """One row of a layout table, less its first program and slot (``TABLE_COLUMNS``)."""

    n_words: int
    C: int
    words_per_row: int
    R: int
    gs_o: int
    gs_r: int
    gs_c: int
    offset: int
    hyper: int


class _TensorLayout(NamedTuple):
    """What a plan holds of one tensor: its rows with their variants, and how its gradient is read.

    Two calls give equal layouts exactly when the same tables serve both (addresses aside).
    """

    rows: tuple[tuple[KernelVariant, _Row], ...]
    copy: bool  # the gradient is read from a contiguous copy (strides the kernel cannot merge)
    g_aligned: bool  # a row reads the gradient with 16-byte hints (G_FLAT): its address must stay aligned


def _plan_tensor(i, g, w, m, v, hyper_row, device):
    """Validate tensor ``i`` (``bop_step``'s contract) and return its :class:`_TensorLayout`.

    The addressing depends on the current addresses (16-byte alignment): a moved tensor may get
    another layout.
    """
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
    if v is not None and v.dtype != m.dtype:
        raise ValueError("bop_step: m and v must have the same dtype")
    if hyper_row < 0:
        raise ValueError(f"bop_step: hyperparameter row {hyper_row} of tensor {i} must be >= 0")
    if g.numel() == 0:
        return _TensorLayout((), False, False)
    copy = False
    if is_words:
        O, C = (1, g.shape[0]) if g.dim() == 1 else g.shape[:2]
        expected = (cdiv(C, 32),) if g.dim() == 1 else (O, *g.shape[2:], cdiv(C, 32))
        if tuple(w.shape) != expected or not w.is_contiguous():
            raise ValueError(
                f"packed words {tuple(w.shape)} do not hold a weight of shape {tuple(g.shape)} "
                f"(expected contiguous words {expected})"
            )
        strides = _rows_view_strides(g)
        if strides is None:
            g = g.contiguous()
            copy = True
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
    rows = []
    g_aligned = False
    for offset, C, R, (gs_o, gs_r, gs_c), n_words in parts:
        if C == 0:
            continue
        addresses = [x.data_ptr() + offset * x.element_size() for x in (m, v, w) if x is not None]
        variant = KernelVariant(
            G_DTYPE=_TL_FLOAT[g.dtype],
            SIGNS_DTYPE=signs_dtype,
            WORDS=is_words,
            FLAT=C % 32 == 0 and all(a % 16 == 0 for a in addresses),
            G_FLAT=g_flat and (g.data_ptr() + offset * g.element_size()) % 16 == 0,
            STATE_BF16=m.dtype == torch.bfloat16,
            SECOND_ORDER=v is not None,
        )
        g_aligned |= variant.G_FLAT
        rows.append((variant, _Row(n_words, C, cdiv(C, 32), R, gs_o, gs_r, gs_c, offset, hyper_row)))
    return _TensorLayout(tuple(rows), copy, g_aligned)


class _Plan:
    """The launches for one set of tensor layouts: tensors validated, layout tables uploaded once.

    :meth:`ready` takes a call's tensors when they keep the plan's layouts (False when they do
    not: the caller then plans anew); :meth:`launch` launches what it readied.
    """

    def __init__(self, grads, weights, ms, vs, hyper_rows, config):
        n = len(grads)
        self.n = n
        self.second = vs is not None
        self.device = device = grads[0].device if n else torch.device("cpu")
        self.cuda_index = device.index if device.type == "cuda" else None  # made current for the launches
        self.hyper_rows = list(hyper_rows)
        self.n_hyper = max(self.hyper_rows, default=-1) + 1  # the hyperparameter lists need at least this many rows
        self.config = config
        vs = vs if self.second else [None] * n
        self.layouts = [_plan_tensor(i, *t, device) for i, t in enumerate(zip(grads, weights, ms, vs, self.hyper_rows))]
        # What each call compares: one list of every tensor's dtype, shape and strides, and one of
        # the addresses of the tensors other than the gradients (module docstring).
        tensors = _tensors(grads, weights, ms, vs if self.second else None)
        self.metadata = _metadata(tensors)
        self.g_devices = list(map(_DEVICE, grads))
        self.fixed = tensors[n:]  # weights, ms (vs)
        self.fixed_addresses = list(map(_ADDRESS, self.fixed))
        # Zero-size tensors all have address 0, whatever their device: their devices are compared.
        self.empty = [j for j, t in enumerate(tensors) if t.numel() == 0]
        self.empty_devices = [tensors[j].device for j in self.empty]
        self.copies = [i for i, layout in enumerate(self.layouts) if layout.copy]  # copied contiguous each call
        aligned = [i for i, layout in enumerate(self.layouts) if layout.g_aligned]  # their addresses stay aligned
        self.g_aligned = operator.itemgetter(*aligned) if aligned else None
        launches = {}  # KernelVariant -> table rows (each a _Row and its slot)
        for slot, layout in enumerate(self.layouts):
            for variant, row in layout.rows:
                launches.setdefault(variant, []).append((row, slot))
        self.launches = [self._launch(variant, rows) for variant, rows in launches.items()]
        # Flip counters: two buffers that steps use in turn; each step's kernel zeroes the other.
        # Each starts 16-byte aligned (the kernel launcher's fast path wants aligned pointers).
        self.buffers = torch.zeros(2, n + n % 2, dtype=torch.int64, device=device)[:, :n].unbind()
        self.views = tuple(b.unbind() for b in self.buffers)  # per tensor, made once
        self.turn = 0
        self.counts = None
        self.hyper_values = self.hyper = None
        self.addresses_used = None  # the addresses of the last call (:meth:`ready`)
        self.addresses = None  # the address table of the last call, on the device
        self.address_tables = {}  # tuple of the addresses -> address table
        self.copied = None  # the call's tensors with the gradients' contiguous copies, from ready() to launch()

    def _launch(self, variant, rows):
        block_words = self.config.kwargs["BLOCK_WORDS"]
        columns = {name: [] for name in TABLE_COLUMNS}
        first = 0
        for row, slot in rows:
            columns["first_block"].append(first)
            for name, value in row._asdict().items():
                columns[name].append(value)
            columns["slot"].append(slot)
            first += cdiv(row.n_words, block_words)
        table = _upload([x for name in TABLE_COLUMNS for x in columns[name]], torch.int64, self.device)
        return KernelLaunch(table, len(rows), (first,), variant, self.config)

    def _moved(self, grads, tensors, addresses):
        """Weights or states moved or were replaced: validate those again, and take their addresses
        when their layouts stay the plan's. Runs only when an address other than a gradient's changed.

        ``tensors`` and ``addresses``: as :meth:`ready` lists them (:func:`_tensors`); ``grads`` the
        call's gradients (not their contiguous copies: a layout is planned from the gradient itself).
        """
        n = self.n
        per_tensor = range(n, len(tensors), n)  # where tensor i's weight, m (and v) sit: n + i, 2n + i (3n + i)
        for i in range(n):
            at = [start + i for start in per_tensor]
            if all(tensors[j] is self.fixed[j - n] and addresses[j] == self.fixed_addresses[j - n] for j in at):
                continue
            w, m, *v = (tensors[j] for j in at)
            layout = _layout_or_none(i, grads[i], w, m, v[0] if v else None, self.hyper_rows[i], self.device)
            if layout != self.layouts[i]:
                return False
        self.fixed = tensors[n:]
        self.fixed_addresses = addresses[n:]
        return True

    def _address_table(self, tensors, addresses):
        """The address table for these addresses (:meth:`ready`), or None when a gradient the kernel
        reads with 16-byte hints lost its alignment or a gradient is on another device (then the
        plan does not hold)."""
        key = tuple(addresses)
        table = self.address_tables.get(key)
        if table is None:
            n = self.n
            g_addresses = addresses[:n]
            if (
                self.g_aligned is not None
                and functools.reduce(operator.or_, _as_tuple(self.g_aligned(g_addresses))) & 15
            ):
                return None
            # Devices, not device indices: a meta tensor's index is the CPU's (-1).
            if list(map(_DEVICE, tensors[:n])) != self.g_devices:
                return None
            if len(self.address_tables) >= _ADDRESS_CACHE:
                del self.address_tables[next(iter(self.address_tables))]
            w, m = addresses[n : 2 * n], addresses[2 * n : 3 * n]
            v = addresses[3 * n :] if self.second else itertools.repeat(0)
            values = list(itertools.chain.from_iterable(zip(g_addresses, m, v, w)))
            table = self.address_tables[key] = _upload(values, torch.int64, self.device).view(n, 4)
        return table

    def ready(self, grads, weights, ms, vs, hyper_rows, gammas, thresholds, sigmas):
        """Check a call's tensors against the plan and ready its launch: gradient copies, the
        address table, the hyperparameters. False when they do not keep this plan's layouts (then
        nothing is launched until the caller plans anew).

        The checks (module docstring): every tensor's dtype, shape and strides equal the plan's (one
        list compare); the addresses of the weights and states equal the plan's, or the tensors at
        new addresses keep their layouts (:meth:`_moved`); the gradients' addresses are served by
        an address table, whose making checks the gradients' devices and alignment. Which tensor
        object sits at an address is not compared: the kernel reads addresses, and a tensor with a
        planned tensor's address, dtype, shape and strides is laid out in memory exactly as the
        planned one (the address also tells the device: CUDA's unified virtual address space keeps
        every device's memory apart from every other's and from host memory; only zero-size
        tensors share an address, 0, so their devices are compared).
        """
        n = self.n
        if len(grads) != n or hyper_rows != self.hyper_rows:
            return False
        tensors = _tensors(grads, weights, ms, vs if self.second else None)
        try:  # None has no dtype (AttributeError); a sparse gradient, or a tensor without storage, raises
            if _metadata(tensors) != self.metadata:
                return False
            if self.copies:
                for i in self.copies:
                    tensors[i] = tensors[i].contiguous()
            addresses = list(map(_ADDRESS, tensors))
        except (AttributeError, RuntimeError):
            return False
        if self.empty and [tensors[j].device for j in self.empty] != self.empty_devices:
            return False
        if addresses != self.addresses_used:
            if addresses[n:] != self.fixed_addresses and not self._moved(grads, tensors, addresses):
                return False
            table = self._address_table(tensors, addresses)
            if table is None:
                return False
            self.addresses_used, self.addresses = addresses, table
        self._hyperparameters(gammas, thresholds, sigmas)
        self.copied = tensors if self.copies else None  # the copies stay allocated until their kernel is launched
        return True

    def launch(self, flips, launcher):
        """Launch the step readied last (asynchronous); return the tensor counted into."""
        if flips is None:
            flips, self.counts = self.buffers[self.turn], self.views[self.turn]
            self.turn ^= 1
        else:
            flips.zero_()
            self.counts = flips.unbind()
        flips_next = self.buffers[self.turn]  # zeroed by this step's kernels
        if self.cuda_index is not None and torch.cuda.current_device() != self.cuda_index:
            with torch.cuda.device(self.cuda_index):
                self._launch_all(launcher, flips, flips_next)
        else:
            self._launch_all(launcher, flips, flips_next)
        self.copied = None
        return flips

    def _launch_all(self, launcher, flips, flips_next):
        for launch in self.launches:
            launcher(launch, self.addresses, self.hyper, flips, flips_next)

    def _hyperparameters(self, gammas, thresholds, sigmas):
        values = (gammas, thresholds, sigmas)
        # The very numbers of the last upload (a number cannot change in place): nothing to do.
        if self.hyper_values is not None and all(map(_same_objects, values, self.hyper_values)):
            return
        # A tensor's value may change in place between steps: its table is rewritten every step.
        tensors = any(map(isinstance, itertools.chain(gammas, thresholds, sigmas or ()), _TENSOR))
        if not tensors and self.hyper_values is not None and _same_numbers(values, self.hyper_values):
            return
        n_rows = len(gammas)
        if n_rows < self.n_hyper or any(x is not None and len(x) != n_rows for x in values):
            raise ValueError(
                f"bop_step needs gammas, thresholds (and sigmas) of one length, at least {self.n_hyper}: "
                "a row for every hyper_rows entry"
            )
        self.hyper_values = None if tensors else tuple(None if x is None else list(x) for x in values)
        self.hyper = _hyper_table(values, self.device)


def _capturing(grads: Sequence[torch.Tensor]) -> bool:
    """Whether a step of CUDA ``grads`` would be recorded into a CUDA graph (the current stream is
    capturing). Entries may be None (checked later by planning): the first tensor decides."""
    g = grads[0] if grads else None
    if g is None:
        g = next((g for g in grads if g is not None), None)
    return g is not None and g.is_cuda and torch.cuda.is_current_stream_capturing()


def _layout_or_none(*args):
    """:func:`_plan_tensor`, or None for a tensor it refuses (planning anew then raises the error)."""
    try:
        return _plan_tensor(*args)
    except ValueError:
        return None


def _tensors(grads, weights, ms, vs):
    """One list of a call's tensors: gradients, weights, ms (and vs), n of each, in that order."""
    return [*grads, *weights, *ms, *vs] if vs is not None else [*grads, *weights, *ms]


def _metadata(tensors):
    """The dtypes, shapes and strides of ``tensors`` as one list (one C-level compare per call)."""
    return [*map(_DTYPE, tensors), *map(_SHAPE, tensors), *map(_STRIDE, tensors)]


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _same_objects(x, previous):
    """Whether the list ``x`` holds the objects of ``previous`` (both may be None)."""
    if x is None or previous is None:
        return x is previous
    return len(x) == len(previous) and all(map(operator.is_, x, previous))


def _same_numbers(values, previous):
    """Whether the hyperparameter lists equal the previous call's (numbers only: no tensor compares)."""
    return all(a == b if a is None or type(a) is list else list(a) == b for a, b in zip(values, previous))


class FusedBop:
    """The fused Bop step for a set of tensors that changes little between steps (an optimizer's).

    :meth:`step` takes the arguments of :func:`bnnops.kernels.bop.bop_step`; it is :meth:`ready`
    then :meth:`launch`, which an optimizer stepping several devices calls apart (every device
    ready before any launches). The first call, and every call whose tensors do not keep the plan's
    layouts (a tensor's dtype, shape or strides, the number of tensors, the hyperparameter rows,
    a moved weight or state whose addressing must change), validates them and plans the launches
    (``rebuilt`` is then True). Any other call checks those in C-level passes over the lists,
    uploads an address table when addresses changed (from a small cache when they were seen
    before) and the hyperparameters when they changed (through pinned memory, no host sync), and
    launches.

    Args:
        config: the block config to launch with (``BLOCK_WORDS``, num_warps), for sweeps;
            default ``bnnops.kernels.bop_configs.DEFAULT_CONFIG``.

    Attributes:
        launcher: called as ``launcher(launch, addresses, hyper, flips, flips_next)`` for each
            launch; default :meth:`KernelLaunch.__call__ <bnnops.kernels.bop.KernelLaunch>`. A
            benchmark without a GPU replaces it with a no-op to time the host work alone
            (``bench/cases/host_cost.py``).
        rebuilt: whether the last :meth:`ready` planned anew.
    """

    def __init__(self, config: triton.Config | None = None) -> None:
        self._plan: _Plan | None = None
        self.rebuilt: bool = False
        self.config = config if config is not None else DEFAULT_CONFIG
        self.launcher: Callable[..., None] = KernelLaunch.__call__
        self._ready = False

    @property
    def counts(self) -> tuple[torch.Tensor, ...]:
        """The flip counts of the last step, one 0-d int64 tensor per tensor (views of its buffer)."""
        return self._plan.counts

    @property
    def launches(self) -> tuple[KernelLaunch, ...]:
        """The launches of the current plan (empty before the first step)."""
        return tuple(self._plan.launches) if self._plan is not None else ()

    def ready(
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
        plan_anew: bool = True,
    ) -> bool:
        """Ready one step of these tensors (arguments of :func:`bnnops.kernels.bop.bop_step`) for :meth:`launch`.

        Returns True when ready. When the plan does not hold these tensors: with ``plan_anew``
        plans anew (validating every tensor; raises ``bop_step``'s errors) and returns True;
        without, returns False and the next launch waits for a call that is ready (an optimizer
        then checks its parameters again and calls with ``plan_anew``).

        Raises:
            RuntimeError: CUDA gradients while the current CUDA stream is capturing a graph (module
                docstring).
        """
        if _capturing(grads):
            raise RuntimeError(
                "the fused Bop step cannot be captured in a CUDA graph: its launch plan uploads tables from "
                "host memory made per step and its flip counters alternate between steps; Bop(..., "
                "capturable=True) steps on the PyTorch reference path, which a graph can hold"
            )
        n = len(grads)
        if not (len(weights) == len(ms) == n) or (vs is not None and len(vs) != n):
            raise ValueError("bop_step needs one weight and one state (m, and v when given) per gradient")
        if (vs is None) != (sigmas is None):
            raise ValueError("bop_step takes vs and sigmas together (second order) or neither")
        hyper_rows = list(range(n)) if hyper_rows is None else hyper_rows
        if not isinstance(hyper_rows, list):
            hyper_rows = list(hyper_rows)
        if len(hyper_rows) != n:
            raise ValueError("bop_step needs one hyperparameter row per gradient")
        args = (grads, weights, ms, vs, hyper_rows, gammas, thresholds, sigmas)
        plan = self._plan
        self._ready = plan is not None and plan.second == (vs is not None) and plan.ready(*args)
        self.rebuilt = not self._ready and plan_anew
        if self.rebuilt:
            self._plan = None  # free the old tables first
            self._plan = _Plan(grads, weights, ms, vs, hyper_rows, self.config)
            self._ready = self._plan.ready(*args)
        return self._ready

    def launch(self, flips: torch.Tensor | None = None) -> torch.Tensor:
        """Launch the step :meth:`ready` readied (asynchronous); return the flip counts.

        Without ``flips``, counts into one of two buffers of this object that the following steps
        overwrite (zero, then count again); returns that buffer.

        Raises:
            RuntimeError: no step is ready (the last :meth:`ready` returned False, or it launched).
        """
        if not self._ready:
            raise RuntimeError("FusedBop.launch: no step is ready (call ready() first, and launch each step once)")
        self._ready = False
        return self._plan.launch(flips, self.launcher)

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
        """One fused step (:meth:`ready`, planning anew where needed, then :meth:`launch`); see
        :func:`bnnops.kernels.bop.bop_step`."""
        self.ready(grads, weights, ms, gammas, thresholds, vs=vs, sigmas=sigmas, hyper_rows=hyper_rows)
        return self.launch(flips)
