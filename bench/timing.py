"""Timing one callable: CUDA events on a GPU, ``time.perf_counter`` on the CPU; the median either way.

On CUDA, :func:`triton.testing.do_bench` warms up, flushes L2 before every timed call and times each
call with CUDA events; we take its median. Memory-bound cases are also given several input sets to
rotate through (``bench.runner``), so the inputs of consecutive calls together exceed the 50 MB L2
of an H100 even without the flush.
"""

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Rotate a memory-bound case's inputs until their bytes reach twice an H100's 50 MB L2.
ROTATE_BYTES = 2 * 50 * 2**20
MAX_ROTATION = 64


def rotating(fns: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that calls ``fns`` in turn (``fns[0]`` itself when there is one)."""
    if len(fns) == 1:
        return fns[0]
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def median_seconds(fn: Callable[[], Any], device: str, quick: bool = False) -> float:
    """Median seconds of one call of ``fn`` after warm-up.

    CUDA: ``do_bench(return_mode="median")`` over ~100 ms of calls (~30 ms with ``quick``).
    CPU: at least 5 timed calls (3 with ``quick``), more until ~0.5 s (~0.1 s) or 100 calls.
    """
    if device == "cuda":
        from triton.testing import do_bench

        warmup_ms, rep_ms = (10, 30) if quick else (25, 100)
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
    fn()  # warm-up: first-call allocations and dispatch caches
    budget, least = (0.1, 3) if quick else (0.5, 5)
    times, start = [], time.perf_counter()
    while len(times) < least or (time.perf_counter() - start < budget and len(times) < 100):
        before = time.perf_counter()
        fn()
        times.append(time.perf_counter() - before)
    return statistics.median(times)


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work when ``device`` is "cuda"; nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
