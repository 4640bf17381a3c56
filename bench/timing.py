"""Timing callables side by side: interleaved rounds, a median per round, a median over rounds.

Ours and its baselines are timed together, interleaved, so a change of machine load or clock speed
during the run lands on all of them and cancels in their ratio. A round's value for a callable is
the median time of its calls in that round; a result is the median over rounds with a confidence
interval of at least 95% for it (:class:`Spread`). A speedup is taken per round (baseline round /
ours round) and reported the same way.

- CPU: in a round the callables take turns call by call (ours, baseline, baseline, ours, ...: the
  order flips every turn), each the same number of times, so the rounds of ours and of a baseline
  span the same moments. Each call is timed in thread CPU time at one torch thread, wall time with
  more (:func:`cpu_clock`). ``bench.runner`` runs one round of every case per pass, so a case's
  rounds spread over the whole run.
- CUDA: a round is one :func:`triton.testing.do_bench` (``return_mode="median"``) per callable
  (CUDA events, L2 flushed before every call), ours first in even rounds and last in odd ones.
  Memory-bound cases also rotate through several input sets (``bench.runner``), so the inputs of
  consecutive calls together exceed the 50 MB L2 of an H100 even without the flush.
"""

import itertools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Rotate a memory-bound case's inputs until their bytes reach twice an H100's 50 MB L2.
ROTATE_BYTES = 2 * 50 * 2**20
MAX_ROTATION = 64


@dataclass(frozen=True)
class Plan:
    """How long to time: ``rounds`` rounds of about ``round_s`` seconds per callable each, and on CPU
    at least ``min_calls`` calls of each callable per round (the median of one or two calls follows
    every outlier)."""

    rounds: int
    round_s: float
    min_calls: int = 1


# CPU: 11 rounds of 30 ms, at least 7 calls: the default run of every case takes about 25 s of CPU
# time at one thread (more wall time on a busy machine); a memory-bound call there varies by +-20%
# from call to call (the Bop step at 1M weights, a 2-core VM shared by other jobs), so a round
# needs several calls for its median to hold still.
# CUDA: 5 rounds of 20 ms of do_bench per callable: the 100 ms one do_bench call took.
PLANS = {
    ("cpu", False): Plan(rounds=11, round_s=0.03, min_calls=7),
    ("cpu", True): Plan(rounds=5, round_s=0.01, min_calls=3),
    ("cuda", False): Plan(rounds=5, round_s=0.02),
    ("cuda", True): Plan(rounds=3, round_s=0.01),
}
MAX_CALLS_PER_ROUND = 1000


def plan_for(device: str, quick: bool) -> Plan:
    """The timing plan of ``device`` ("cuda" or "cpu"), shorter with ``quick``."""
    return PLANS["cuda" if device == "cuda" else "cpu", quick]


@dataclass(frozen=True)
class Spread:
    """A median over rounds and a confidence interval of it: ``low <= median <= high``.

    The interval is distribution-free: the k-th fastest and k-th slowest round, k as large as
    keeps the chance that the median of the rounds' distribution lies outside below 5%
    (``confidence`` >= 0.95; binomial with p = 1/2). For 6 to 8 rounds that is the fastest and
    slowest round, for 11 the 2nd of each end, for 20 the 6th. With 5 or fewer rounds no interval
    reaches 95%: the fastest and slowest round then, at its lower confidence (94% for 5).
    """

    median: float
    low: float
    high: float
    rounds: int
    confidence: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        """The median of ``values`` (one value per round) and its confidence interval.

        Raises:
            ValueError: ``values`` is empty.
        """
        if not values:
            raise ValueError("Spread.of needs at least one round")
        ordered, n = sorted(values), len(values)
        k, outside = 1, 2 * 0.5**n  # P(median outside [x(1), x(n)])
        while k < (n + 1) // 2 and outside + 2 * math.comb(n, k) * 0.5**n <= 0.05:
            outside += 2 * math.comb(n, k) * 0.5**n
            k += 1
        return cls(statistics.median(values), ordered[k - 1], ordered[n - k], n, 1.0 - outside)

    def relative(self) -> tuple[float, float]:
        """(low / median - 1, high / median - 1): e.g. (-0.04, 0.07) for a range of -4% to +7%."""
        return self.low / self.median - 1.0, self.high / self.median - 1.0

    def wider_than(self, tolerance: float) -> bool:
        """Whether the interval reaches further than ``tolerance`` (0.1: 10%) from the median, either side.

        Measured on a log scale, so 1/1.1 and 1.1 times the median are both 10% away: a speedup
        interval and its inverse (a slowdown's) get the same verdict.
        """
        return self.high > self.median * (1 + tolerance) or self.low < self.median / (1 + tolerance)


@dataclass(frozen=True)
class Timings:
    """What :func:`interleaved_rounds` measured: per callable its round values and calls per round."""

    rounds: dict[str, list[float]]
    calls_per_round: dict[str, int]

    def spread(self, name: str) -> Spread:
        """Seconds per call of callable ``name``: median over rounds and its interval."""
        return Spread.of(self.rounds[name])

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """``numerator``'s round time over ``denominator``'s, per round: median over rounds and its interval."""
        pairs = zip(self.rounds[numerator], self.rounds[denominator])
        return Spread.of([n / d for n, d in pairs])


def rotating(fns: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that calls ``fns`` in turn (``fns[0]`` itself when there is one)."""
    if len(fns) == 1:
        return fns[0]
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def cpu_clock() -> str:
    """The CPU timer for the current torch thread count: "thread CPU time" at one thread, else "wall time".

    At one torch thread every op runs on the calling thread, so that thread's CPU time
    (``time.thread_time``) is the call's time without the slices the OS gave other processes: a
    shared machine then measures what an idle one would (cache and memory bandwidth still shared).
    With more threads the work runs elsewhere too, and only wall time (``time.perf_counter``) sees it.
    """
    return "thread CPU time" if torch.get_num_threads() == 1 else "wall time"


def _cuda_round_seconds(fn: Callable[[], Any], round_s: float) -> float:
    from triton.testing import do_bench

    rep_ms = round_s * 1e3
    return do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="median") / 1e3


class InterleavedTimer:
    """Times one case's callables round by round (see the module docstring); rounds accumulate.

    Constructing it calls each callable once untimed (first-call allocations, compilation,
    autotuning). On CPU a second call of each sets how many calls per callable fill about
    ``plan.round_s`` each (``plan.min_calls`` to ``MAX_CALLS_PER_ROUND``, the same for all); on CUDA
    ``do_bench`` chooses (``calls_per_round`` is 0 there). :meth:`run` adds rounds, so a caller may
    spread a case's rounds over a run, between other cases' rounds.

    Raises:
        ValueError: ``fns`` is empty.
    """

    def __init__(self, fns: Mapping[str, Callable[[], Any]], device: str, plan: Plan) -> None:
        if not fns:
            raise ValueError("InterleavedTimer needs at least one callable")
        self.fns, self.device, self.plan, self.names = dict(fns), device, plan, list(fns)
        self.rounds: dict[str, list[float]] = {name: [] for name in self.names}
        for fn in self.fns.values():
            fn()
        synchronize(device)
        self.calls = 0
        if device != "cuda":
            self.read = time.thread_time if cpu_clock() == "thread CPU time" else time.perf_counter
            once = []
            for name in self.names:
                before = self.read()
                self.fns[name]()
                once.append(self.read() - before)
            # Every callable gets the same calls per round: together about round_s per callable.
            calls = round(plan.round_s * len(self.names) / max(sum(once), 1e-9))
            self.calls = max(plan.min_calls, min(MAX_CALLS_PER_ROUND, calls))

    def run(self, rounds: int) -> None:
        """Time ``rounds`` more rounds."""
        for _ in range(rounds):
            r = len(self.rounds[self.names[0]])
            if self.device == "cuda":
                for name in self.names if r % 2 == 0 else self.names[::-1]:
                    self.rounds[name].append(_cuda_round_seconds(self.fns[name], self.plan.round_s))
                continue
            times: dict[str, list[float]] = {name: [] for name in self.names}
            for turn in range(self.calls):
                before = self.read()
                for name in self.names if (r + turn) % 2 == 0 else self.names[::-1]:
                    self.fns[name]()
                    after = self.read()
                    times[name].append(after - before)  # one clock read included: ~1 us (thread CPU), 0.1 us (wall)
                    before = after
            for name in self.names:
                self.rounds[name].append(statistics.median(times[name]))

    def timings(self) -> Timings:
        """The rounds so far (copies)."""
        return Timings({name: list(v) for name, v in self.rounds.items()}, dict.fromkeys(self.names, self.calls))


def interleaved_rounds(fns: Mapping[str, Callable[[], Any]], device: str, plan: Plan) -> Timings:
    """Time every callable of ``fns`` in ``plan.rounds`` interleaved rounds, one after the other.

    Raises:
        ValueError: ``fns`` is empty or ``plan.rounds`` < 1.
    """
    if plan.rounds < 1:
        raise ValueError(f"interleaved_rounds needs rounds >= 1, got {plan}")
    timer = InterleavedTimer(fns, device, plan)
    timer.run(plan.rounds)
    return timer.timings()


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work when ``device`` is "cuda"; nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
