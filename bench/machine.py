"""The machine a run measures: its description (device, versions, threads, load, commit) and its ceilings.

On CUDA every kernel is reported as a fraction of what this GPU does in the same run (docs/design.md,
"Performance model"): memory bandwidth from a large device-to-device copy (bytes read + written),
bf16 throughput from a square ``torch.matmul`` and int8 throughput from ``torch._int_mm``. An H100
80GB HBM3 measured 3 TB/s, 680-716 TFLOP/s and 870-914 TOPS (runs T1422, T1429).

On the CPU the cases time bnnops' reference path, which computes every product in fp32
(``bnnops.ops.reference``): its compute bound is this CPU's fp32 matmul at the run's thread count,
the one ceiling measured there. A GPU's int8 or bf16 rate does not bound it, and a DRAM copy does
not bound the CPU shapes, whose inputs fit in cache, so memory-bound rows have no ceiling on CPU.
"""

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.registry import BOUNDS
from bench.timing import Spread, interleaved_rounds, plan_for

REPO = Path(__file__).resolve().parent.parent
"""The checkout this bench package lives in (its results/ and the git commit are read there)."""

# (copy elements of fp32, square matmul size): large enough to reach the ceiling on a GPU.
CUDA_SIZES = (2**28, 8192)
# The CPU's fp32 matmul: 1024^3 is 2.1 GFLOP, tens of ms at one thread, where MKL/oneDNN runs at speed.
CPU_MATMUL_N = 1024

# The ceiling a case's rate is compared with, by device: its bound on CUDA; on CPU the fp32 matmul
# for compute-bound cases (the reference path computes in fp32) and none for memory-bound ones.
CPU_CEILING = {"memory": None, "bf16": "fp32", "int8": "fp32"}
UNITS = {**BOUNDS, "fp32": "FLOP/s"}


def default_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu" (the reference path)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def ceiling_for(bound: str, device: str) -> str | None:
    """The name of the ceiling a ``bound``-bound case is compared with on ``device``; None: no ceiling."""
    return bound if device == "cuda" else CPU_CEILING[bound]


def measure_ceilings(device: str, quick: bool = False) -> dict[str, dict[str, Any]]:
    """{ceiling: {"what", "rate", "unit", "seconds", "rate_of", "median_s", "low_s", "high_s", "rounds"}}.

    CUDA: "memory", "bf16" and "int8"; CPU: "fp32" (see the module docstring). ``rate`` is in
    bytes/s for "memory" and operations/s (a multiply-add counts 2) otherwise, from ``seconds``:
    the median time of one call over the rounds of :func:`bench.timing.interleaved_rounds` on
    CUDA, the fastest round on CPU (``rate_of`` says which); ``median_s``, ``low_s`` and
    ``high_s`` are the median and its confidence interval. ``quick`` shortens the timing.
    """
    if device != "cuda":
        n = CPU_MATMUL_N
        a, b = torch.randn(n, n), torch.randn(n, n)
        threads = torch.get_num_threads()
        what = f"fp32 torch.matmul {n}^3, {threads} thread{'s' if threads > 1 else ''}"
        runs = {"fp32": (what, 2 * n**3, lambda: torch.matmul(a, b))}
    else:
        copy_numel, n = CUDA_SIZES
        src = torch.rand(copy_numel, device=device)
        dst = torch.empty_like(src)
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        # Random int8 in [-128, 127]: _int_mm accumulates in int32, which cannot overflow at this n.
        a8 = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8)
        # Column-major second operand: cuBLASLt's fast int8 path is the "TN" layout. A row-major b8
        # measured 130 TOPS on an H100 (run T1322, a slow fallback); TN 870-914 (runs T1422, T1429).
        b8 = torch.randint(-128, 128, (n, n), device=device, dtype=torch.int8).t()
        runs = {
            "memory": (f"copy of {src.nbytes / 2**20:.0f} MiB, read + write", 2 * src.nbytes, lambda: dst.copy_(src)),
            "bf16": (f"bf16 torch.matmul {n}^3", 2 * n**3, lambda: torch.matmul(a, b)),
            "int8": (f"int8 torch._int_mm {n}^3", 2 * n**3, lambda: torch._int_mm(a8, b8)),
        }
    ceilings = {}
    for name, (what, work, fn) in runs.items():
        rounds = interleaved_rounds({name: fn}, device, plan_for(device, quick)).rounds[name]
        spread = Spread.of(rounds)
        # A shared CPU's rounds run below its speed whenever other jobs use the cache and memory:
        # its fastest round is the nearest to what it can do. A GPU's median is steady.
        seconds = spread.median if device == "cuda" else min(rounds)
        ceilings[name] = {
            "what": what,
            "rate": work / seconds,
            "unit": UNITS[name],
            "seconds": seconds,
            "rate_of": "median" if device == "cuda" else "fastest round",
            "median_s": spread.median,
            "low_s": spread.low,
            "high_s": spread.high,
            "rounds": spread.rounds,
        }
    return ceilings


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args):
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict[str, Any]:
    """The run's metadata: device name, versions, torch threads, CPUs, load, commit (and whether the
    tree is dirty), where bnnops was imported from, date (UTC).

    ``cpu_threads`` is ``torch.get_num_threads()`` at the call: the caller sets it first.
    """
    import bnnops

    cuda = device == "cuda"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device,
        "mode": "cuda-kernels" if cuda else "cpu-reference",
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load_average(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "bnnops": _version("bnnops"),
        "bnnops_path": str(Path(bnnops.__file__).resolve().parent),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
