"""Running cases: build their inputs, time ours and the baselines in interleaved rounds, compute rates.

A result row (one case at one shape, a dict that goes into the JSON as is)::

    case, shape, params, bound, bytes, ops,
    ours_s                  median over rounds of ours' seconds per call
    ours_range_s            [low, high]: the confidence interval of that median (bench.timing.Spread)
    baselines_s             {baseline: median seconds}; baselines_range_s: {baseline: [low, high]}
    speedup                 {baseline: median over rounds of baseline round / ours round}  (> 1: ours is faster)
    speedup_range           {baseline: [low, high]}, the same interval for the speedup
    rounds                  how many rounds every callable was timed in (the count behind each median)
    range_confidence        the intervals' confidence (>= 0.95 from 6 rounds on)
    calls_per_round         {"ours" or baseline: calls timed per round} (0 on CUDA: do_bench chooses)
    rounds_s                {"ours" or baseline: [seconds per call in each round, in round order]}
    noisy                   True when a speedup's interval (without baselines: ours') reaches
                            further than NOISY_BEYOND from its median, or with fewer than
                            MIN_ROUNDS rounds: that row's numbers are not reproducible on this
                            machine at this load
    bandwidth               bytes / ours_s (bytes/s); op_rate: ops / ours_s (ops/s) when ops given
    rate, rate_unit         the rate compared with the ceiling: bandwidth for "memory", op_rate else
    ceiling, ceiling_fraction   which measured ceiling (``bench.machine.ceiling_for``) and rate / its
                            rate; absent where the device has no meaningful ceiling for the bound
    error                   only when the case failed (traceback text); no numbers then
    skipped                 only when the time budget was spent before the case started
"""

import gc
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.machine import ceiling_for
from bench.registry import BOUNDS, Case, Item, Params
from bench.report import format_seconds, format_spread, slug
from bench.timing import (
    MAX_ROTATION,
    ROTATE_BYTES,
    InterleavedTimer,
    Timings,
    interleaved_rounds,
    plan_for,
    rotating,
    synchronize,
)

Row = dict[str, Any]
"""One result row (see the module docstring)."""

MIN_ROUNDS = 3
"""A row with fewer rounds (a run cut short by its budget) is noisy: too few to show a spread."""

NOISY_BEYOND = 0.10
"""A row is noisy when its speedup's confidence interval reaches more than 10% from the median.

Ours and each baseline take turns call by call, so a steady machine gives per-round speedups
within a few percent; beyond 10% two runs of the same code disagree on whether a change helped.
"""


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
    """Time ``prepared`` (ours and each baseline, all rounds of the plan now) and return its result row.

    ``ceilings`` are :func:`bench.machine.measure_ceilings`'s; see :func:`measured_row`.
    """
    timings = interleaved_rounds(prepared.fns, prepared.device, plan_for(prepared.device, quick))
    return measured_row(prepared, timings, ceilings)


def measured_row(prepared: Prepared, timings: Timings, ceilings: dict[str, dict[str, Any]]) -> Row:
    """The result row of ``prepared`` from its ``timings`` (see the module docstring).

    Without the ceiling that :func:`bench.machine.ceiling_for` names for the case's bound among
    ``ceilings``, the row has no "ceiling" and "ceiling_fraction".
    """
    work = prepared.work
    spreads = {name: timings.spread(name) for name in prepared.fns}
    speedups = {name: timings.ratio(name, "ours") for name in prepared.fns if name != "ours"}
    ours = spreads.pop("ours")
    row = _row_head(prepared.case, prepared.label, prepared.params)
    row.update(
        bound=work.bound,
        bytes=work.bytes,
        ops=work.ops,
        ours_s=ours.median,
        ours_range_s=[ours.low, ours.high],
        baselines_s={name: s.median for name, s in spreads.items()},
        baselines_range_s={name: [s.low, s.high] for name, s in spreads.items()},
        speedup={name: s.median for name, s in speedups.items()},
        speedup_range={name: [s.low, s.high] for name, s in speedups.items()},
        rounds=ours.rounds,
        range_confidence=ours.confidence,
        calls_per_round=timings.calls_per_round,
        rounds_s=timings.rounds,
        noisy=ours.rounds < MIN_ROUNDS or any(s.wider_than(NOISY_BEYOND) for s in list(speedups.values()) or [ours]),
        bandwidth=work.bytes / ours.median,
    )
    if work.ops:
        row["op_rate"] = work.ops / ours.median
    row["rate"] = row["bandwidth"] if work.bound == "memory" else row["op_rate"]
    row["rate_unit"] = BOUNDS[work.bound]
    ceiling = ceiling_for(work.bound, prepared.device)
    if ceiling in ceilings:
        row["ceiling"] = ceiling
        row["ceiling_fraction"] = row["rate"] / ceilings[ceiling]["rate"]
    return row


def _row_head(case: Case, label: str, params: Params) -> Row:
    return {"case": case.name, "shape": label, "params": jsonable(params)}


def _free(device):
    # A case's GPU memory goes back before the next case builds its inputs. On CPU reference
    # counting frees the small CPU shapes; a full collection there costs ~0.4 s a case.
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _progress(message):
    print(message, file=sys.stderr, flush=True)


def _summary(row: Row) -> str:
    if "ours_s" not in row:
        return "FAILED" if "error" in row else "skipped"
    parts = [f"ours {format_seconds(row['ours_s'])}"] + [
        f"{name} {format_seconds(t)} ({format_spread(row['speedup'][name], row['speedup_range'][name])})"
        for name, t in row["baselines_s"].items()
    ]
    return " | ".join(parts) + ("  NOISY" if row["noisy"] else "")


def run(
    items: Sequence[Item],
    device: str,
    quick: bool,
    ceilings: dict[str, dict[str, Any]],
    on_row: Callable[[list[Row]], None] | None = None,
    budget_s: float | None = None,
) -> list[Row]:
    """Measure every (case, label, params) of ``items`` and return their rows, in ``items`` order.

    On CUDA one case after the other, each with all its rounds (and its GPU memory freed before
    the next). On CPU every case's inputs are built first, then each pass times one round of every
    case: a case's rounds spread over the whole run, so a change of the machine's load during the
    run shows in every row's range instead of moving a few rows' medians.

    Progress goes to stderr. A failing case becomes a row with "error" and the run goes on. Once
    ``budget_s`` seconds have passed, no new case starts (the remaining ones become rows with
    "skipped") and on CPU no new pass (the rows keep the rounds they have). ``on_row(rows)`` is
    called whenever rows change (the caller rewrites its JSON, so a killed run keeps what it
    measured).
    """
    start = time.perf_counter()

    def spent() -> bool:
        return budget_s is not None and time.perf_counter() - start > budget_s

    def skipped(case: Case, label: str, params: Params) -> Row:
        return dict(_row_head(case, label, params), skipped=f"time budget of {budget_s:.0f} s spent")

    def failed(case: Case, label: str, params: Params) -> Row:
        row = dict(_row_head(case, label, params), error=traceback.format_exc())
        _progress(f"{case.name} {label}: FAILED\n{row['error']}")
        return row

    rows: list[Row] = []
    if device == "cuda":
        for i, (case, label, params) in enumerate(items, 1):
            head = f"[{i}/{len(items)}] {case.name} {label}"
            if spent():
                rows.append(skipped(case, label, params))
                _progress(f"{head}: skipped (time budget)")
            else:
                _progress(f"{head} ...")
                try:
                    rows.append(measure(Prepared(case, label, params, device), quick, ceilings))
                    _progress(f"{head}: {_summary(rows[-1])}  [{time.perf_counter() - start:.0f} s]")
                except Exception:
                    rows.append(failed(case, label, params))
                _free(device)
            if on_row is not None:
                on_row(rows)
        return rows

    plan = plan_for(device, quick)
    timers: dict[int, tuple[Prepared, InterleavedTimer]] = {}
    for i, (case, label, params) in enumerate(items):
        head = f"[{i + 1}/{len(items)}] {case.name} {label}"
        if spent():
            rows.append(skipped(case, label, params))
            _progress(f"{head}: skipped (time budget)")
            continue
        rows.append(_row_head(case, label, params))  # replaced after the first pass
        try:
            prepared = Prepared(case, label, params, device)
            timers[i] = (prepared, InterleavedTimer(prepared.fns, device, plan))
            _progress(f"{head}: inputs built, {timers[i][1].calls} calls per callable per round")
        except Exception:
            rows[i] = failed(case, label, params)
    for done in range(plan.rounds):
        if done and spent():
            _progress(f"time budget spent: {done} of {plan.rounds} rounds")
            break
        for i, (prepared, timer) in list(timers.items()):
            try:
                timer.run(1)
                rows[i] = measured_row(prepared, timer.timings(), ceilings)
            except Exception:
                rows[i] = failed(prepared.case, prepared.label, prepared.params)
                del timers[i]
        _progress(f"round {done + 1}/{plan.rounds} of {len(timers)} cases  [{time.perf_counter() - start:.0f} s]")
        if on_row is not None:
            on_row(rows)
    for i, (prepared, _) in timers.items():
        _progress(f"{prepared.case.name} {prepared.label}: {_summary(rows[i])}")
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
