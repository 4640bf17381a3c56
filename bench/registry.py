"""The one registry of benchmark cases, shared by ``python -m bench`` and the pytest-benchmark suite.

A case is a name, its shapes (labelled parameter sets for the GPU, for the CPU reference path and
one tiny set for the smoke test), and a setup function. The setup builds fresh random inputs for a
device and a parameter set and returns a :class:`Workload`: our callable, the baseline callables a
user would otherwise run, and the work (operations and fewest bytes) from which rates and
fractions of the measured ceilings are computed in one place (``bench.runner``).

Cases live one module per kernel family under ``bench/cases/``; :func:`load_cases` imports every
module there, so adding a kernel's cases is adding one file (see ``bench/README.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# What a case's rate is compared with (the ceilings ``bench.machine`` measures), and the rate's unit.
BOUNDS = {"memory": "B/s", "bf16": "FLOP/s", "int8": "OP/s"}

Params = dict[str, Any]
"""One shape's parameters: the keyword arguments of a case's setup after ``device``."""
Setup = Callable[..., "Workload"]
"""A case's setup, called as ``setup(device, **params)``."""

_REGISTRY: dict[str, Case] = {}


@dataclass
class Workload:
    """What a case's setup returns for one device and parameter set.

    Attributes:
        ours: zero-argument callable running our op once on the inputs the setup built.
        baselines: name -> zero-argument callable running what a user would otherwise run on the
            same values (e.g. ``"bf16 matmul"``); may be empty.
        bound: which measured ceiling our rate is compared with: ``"memory"`` (bytes per second
            against a device-to-device copy), ``"bf16"`` (ops per second against a bf16 matmul)
            or ``"int8"`` (ops per second against ``torch._int_mm``).
        bytes: the fewest bytes the op must move: every input read once plus every output
            written once, at their stored sizes (a packed weight counts 4 bytes per 32 signs).
        ops: arithmetic operations, a multiply-add counting 2 (2*M*N*K for a GEMM); required
            unless ``bound == "memory"``.
    """

    ours: Callable[[], Any]
    baselines: dict[str, Callable[[], Any]]
    bound: str
    bytes: int
    ops: int | None = None

    def __post_init__(self):
        if not callable(self.ours):
            raise TypeError(f"Workload.ours must be callable, got {type(self.ours).__name__}")
        for name, fn in self.baselines.items():
            if name == "ours" or not callable(fn):
                raise ValueError(f"Workload.baselines[{name!r}] must be callable and not named 'ours'")
        if self.bound not in BOUNDS:
            raise ValueError(f"Workload.bound must be one of {list(BOUNDS)}, got {self.bound!r}")
        if not self.bytes > 0:
            raise ValueError(f"Workload.bytes must be > 0 (the fewest bytes moved), got {self.bytes}")
        if self.bound != "memory" and not (self.ops or 0) > 0:
            raise ValueError(f"Workload.ops must be > 0 for a {self.bound!r}-bound case, got {self.ops}")

    def callables(self) -> dict[str, Callable[[], Any]]:
        """name -> callable, ours first, then the baselines in their order."""
        return {"ours": self.ours, **self.baselines}


@dataclass
class Case:
    """A registered benchmark case; build one with the :func:`case` decorator."""

    name: str
    setup: Setup
    cuda: dict[str, Params]
    cpu: dict[str, Params]
    tiny: Params
    quick: tuple[str, ...] = ()

    def shapes(self, device: str, size: str) -> list[tuple[str, Params]]:
        """[(label, params)] to run on ``device`` ("cuda" or "cpu") at ``size``.

        ``size`` is "full" (every shape of the device's table), "quick" (the ``quick`` labels on
        CUDA, the first CPU shape on CPU) or "tiny" (the smoke-test parameters).
        """
        if size == "tiny":
            return [("tiny", self.tiny)]
        table = self.cuda if device == "cuda" else self.cpu
        if size == "full":
            return list(table.items())
        if size == "quick":
            labels = self.quick if device == "cuda" else list(table)[:1]
            return [(label, table[label]) for label in labels]
        raise ValueError(f"size must be 'full', 'quick' or 'tiny', got {size!r}")


Item = tuple[Case, str, Params]
"""One thing to run: (case, shape label, params)."""


def case(
    name: str,
    *,
    cuda: dict[str, Params],
    cpu: dict[str, Params],
    tiny: Params,
    quick: Iterable[str] | None = None,
) -> Callable[[Setup], Setup]:
    """Register the decorated setup function as the benchmark case ``name``.

    Args:
        name: the kernel column of the table, unique (e.g. "pack_signs", "gemm_w1a1").
        cuda: {shape label: params} timed on a GPU, headline shape first.
        cpu: {shape label: params} small enough for the CPU reference path (the whole CPU run of
            every case together must stay well under 2 minutes: aim for < 0.2 s per call).
        tiny: params for the smoke test (``tests/test_bench.py``): the smallest shape that still
            exercises the body (ragged sizes welcome); it runs on CPU under the test suite.
        quick: labels of ``cuda`` run by ``--quick`` and run first in a full run (default: the
            first label).

    The setup is called as ``setup(device, **params)`` and returns a :class:`Workload`; the
    decorator returns it unchanged.

    Raises:
        ValueError: ``name`` is taken or not letters, digits, '_', '.', '-'; ``cuda`` or ``cpu`` is
            empty; a ``quick`` label is not a ``cuda`` label.
    """
    if name in _REGISTRY:
        raise ValueError(f"benchmark case {name!r} is registered twice")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"benchmark case name {name!r} must be letters, digits, '_', '.' or '-'")
    if not cuda or not cpu:
        raise ValueError(f"benchmark case {name!r} needs at least one cuda and one cpu shape")
    quick = tuple(quick) if quick is not None else tuple(cuda)[:1]
    unknown = [label for label in quick if label not in cuda]
    if unknown:
        raise ValueError(f"benchmark case {name!r}: quick labels {unknown} are not cuda shapes {list(cuda)}")

    def register(setup: Setup) -> Setup:
        _REGISTRY[name] = Case(name, setup, dict(cuda), dict(cpu), dict(tiny), quick)
        return setup

    return register


def load_cases() -> tuple[list[Case], list[tuple[str, str]]]:
    """Import every module of ``bench/cases`` and return (cases, load_errors).

    ``cases`` are in module-name order, then definition order. A module that fails to import
    does not stop the others: it shows up in ``load_errors`` as (module name, traceback text).
    """
    import bench.cases as package

    errors: list[tuple[str, str]] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        try:
            importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception:
            errors.append((info.name, traceback.format_exc()))
    return list(_REGISTRY.values()), errors


def plan(cases: Iterable[Case], device: str, size: str, pattern: str | None = None) -> list[Item]:
    """The (case, label, params) of ``cases`` to run on ``device`` at ``size``, in run order.

    A full run puts every case's quick (headline) shapes first, so a run cut short by a time
    budget still has every kernel's headline number. ``pattern`` is a case-insensitive regular
    expression searched in "<case> <shape label>".
    """
    regex = re.compile(pattern, re.IGNORECASE) if pattern else None
    items = []
    for c in cases:
        headline = set(c.quick) if device == "cuda" else set(list(c.cpu)[:1])
        for label, params in c.shapes(device, size):
            if regex is None or regex.search(f"{c.name} {label}"):
                items.append((label not in headline, c, label, params))
    # sorted() is stable: within each half the registry order is kept.
    return [(c, label, params) for _, c, label, params in sorted(items, key=lambda item: item[0])]
