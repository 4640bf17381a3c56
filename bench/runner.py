"""Running cases: build their inputs, time ours and the baselines, compute rates in one place.

A result row (one case at one shape, a dict that goes into the JSON as is)::

    case, shape, params, bound, bytes, ops,
    ours_s                  median seconds of ours
    baselines_s             {baseline name: median seconds}
    speedup                 {baseline name: baseline seconds / ours seconds}  (> 1: ours is faster)
    bandwidth               bytes / ours_s (bytes/s); op_rate: ops / ours_s (ops/s) when ops given
    rate, rate_unit         the rate compared with the ceiling: bandwidth for "memory", op_rate else
    ceiling_fraction        rate / the measured ceiling of ``bound``
    error                   only when the case failed (traceback text); no numbers then
"""

import gc
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.registry import BOUNDS, Case, Item, Params
from bench.report import format_seconds, slug
from bench.timing import MAX_ROTATION, ROTATE_BYTES, median_seconds, rotating, synchronize

Row = dict[str, Any]
"""One result row (see the module docstring)."""


class Prepared:
    """A case's workload(s) at one shape on one device, ready to time.

    Attributes:
        work: the :class:`~bench.registry.Workload` of the first setup call (its bound, bytes, ops).
        fns: name -> zero-argument callable, "ours" first, then the baselines.

    On CUDA a memory-bound case's setup runs several times, each building fresh inputs, until
    their bytes reach ``ROTATE_BYTES`` (or ``MAX_ROTATION`` copies); each of ``fns`` then rotates
    through the copies so no call finds its inputs in L2.
    """

    def __init__(self, case: Case, label: str, params: Params, device: str) -> None:
        self.case, self.label, self.params, self.device = case, label, params, device
        self.work = case.setup(device, **params)
        copies = [self.work]
        if device == "cuda" and self.work.bound == "memory":
            while len(copies) * self.work.bytes < ROTATE_BYTES and len(copies) < MAX_ROTATION:
                copies.append(case.setup(device, **params))
        self.fns = {name: rotating([w.callables()[name] for w in copies]) for name in self.work.callables()}


def jsonable(params: Params) -> dict[str, Any]:
    """``params`` with every value that is not a JSON scalar (a torch dtype) as its ``str``."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in params.items()}


def measure(prepared: Prepared, quick: bool, ceilings: dict[str, dict[str, Any]]) -> Row:
    """Time ``prepared`` (ours, then each baseline) and return its result row.

    ``ceilings`` are :func:`bench.machine.measure_ceilings`'s; without the case's bound among them
    the row has no "ceiling_fraction".
    """
    work = prepared.work
    times = {name: median_seconds(fn, prepared.device, quick) for name, fn in prepared.fns.items()}
    ours = times.pop("ours")
    row = _row_head(prepared.case, prepared.label, prepared.params)
    row.update(
        bound=work.bound,
        bytes=work.bytes,
        ops=work.ops,
        ours_s=ours,
        baselines_s=times,
        speedup={name: t / ours for name, t in times.items()},
        bandwidth=work.bytes / ours,
    )
    if work.ops:
        row["op_rate"] = work.ops / ours
    row["rate"] = row["bandwidth"] if work.bound == "memory" else row["op_rate"]
    row["rate_unit"] = BOUNDS[work.bound]
    if work.bound in ceilings:
        row["ceiling_fraction"] = row["rate"] / ceilings[work.bound]["rate"]
    return row


def _row_head(case: Case, label: str, params: Params) -> Row:
    return {"case": case.name, "shape": label, "params": jsonable(params)}


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _progress(message):
    print(message, file=sys.stderr, flush=True)


def run(
    items: Sequence[Item],
    device: str,
    quick: bool,
    ceilings: dict[str, dict[str, Any]],
    on_row: Callable[[list[Row]], None] | None = None,
    budget_s: float | None = None,
) -> list[Row]:
    """Measure every (case, label, params) of ``items`` in order and return the rows.

    Progress goes to stderr. A failing case becomes a row with "error" and the run goes on.
    Once ``budget_s`` seconds have passed, the remaining items become rows with "skipped".
    ``on_row(rows)`` is called after each row (the caller rewrites its JSON, so a run that is
    killed keeps what it measured).
    """
    rows, start = [], time.perf_counter()
    for i, (case, label, params) in enumerate(items, 1):
        elapsed = time.perf_counter() - start
        head = f"[{i}/{len(items)}] {case.name} {label}"
        if budget_s is not None and elapsed > budget_s:
            row = dict(_row_head(case, label, params), skipped=f"time budget of {budget_s:.0f} s spent")
            _progress(f"{head}: skipped (time budget)")
        else:
            _progress(f"{head} ...")
            try:
                row = measure(Prepared(case, label, params, device), quick, ceilings)
                parts = [f"ours {format_seconds(row['ours_s'])}"] + [
                    f"{name} {format_seconds(t)} ({row['speedup'][name]:.2f}x)"
                    for name, t in row["baselines_s"].items()
                ]
                _progress(f"{head}: " + " | ".join(parts) + f"  [{time.perf_counter() - start:.0f} s]")
            except Exception:
                row = dict(_row_head(case, label, params), error=traceback.format_exc())
                _progress(f"{head}: FAILED\n{row['error']}")
            _free(device)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def profile(item: Item, device: str, out_dir: Path, iterations: int = 5) -> Path:
    """Write a torch.profiler Chrome trace of one (case, label, params): ours, then each baseline.

    Each callable runs twice untimed first (compilation, autotuning), then ``iterations`` times
    under the profiler inside a ``record_function`` range named "<case> <shape>: <callable>".
    Returns the trace path; prints the profiler's summary table to stdout.
    """
    case, label, params = item
    prepared = Prepared(case, label, params, device)
    for fn in prepared.fns.values():
        fn()
        fn()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for name, fn in prepared.fns.items():
            with torch.profiler.record_function(f"{case.name} {label}: {name}"):
                for _ in range(iterations):
                    fn()
                synchronize(device)
    path = out_dir / f"trace-{case.name}-{slug(label)}.json"
    prof.export_chrome_trace(str(path))
    sort_by = "device_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20))
    return path
