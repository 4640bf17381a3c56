"""The machine a run measures: its description (GPU, versions, commit) and its measured ceilings.

Every kernel is reported as a fraction of what this machine does in the same run (docs/design.md,
"Performance model"): memory bandwidth from a large device-to-device copy (bytes read + written),
bf16 throughput from a square ``torch.matmul`` and int8 throughput from ``torch._int_mm``. An H100
80GB HBM3 measured 3 TB/s, 680-716 TFLOP/s and 870-914 TOPS (runs T1422, T1429). On the CPU the
same three are measured at small sizes so the CPU table has the same columns; they describe this
CPU, not a GPU.
"""

import datetime
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.registry import BOUNDS
from bench.timing import median_seconds

REPO = Path(__file__).resolve().parent.parent

# (copy elements of fp32, square matmul size): large enough to reach the ceiling on each device.
SIZES = {"cuda": (2**28, 8192), "cpu": (2**23, 1024)}


def default_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu" (the reference path)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_ceilings(device: str, quick: bool = False) -> dict[str, dict[str, Any]]:
    """{bound: {"what", "rate", "unit", "seconds"}} for the bounds "memory", "bf16" and "int8".

    ``rate`` is in bytes/s for "memory" and operations/s (a multiply-add counts 2) otherwise;
    ``seconds`` is the median time of one call; ``quick`` shortens the timing (see
    :func:`bench.timing.median_seconds`).
    """
    copy_numel, n = SIZES[device]
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
    for bound, (what, work, fn) in runs.items():
        seconds = median_seconds(fn, device, quick)
        ceilings[bound] = {"what": what, "rate": work / seconds, "unit": BOUNDS[bound], "seconds": seconds}
    return ceilings


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
    """The run's metadata: device name, versions, commit (and whether the tree is dirty), date (UTC)."""
    cuda = device == "cuda"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device,
        "mode": "cuda-kernels" if cuda else "cpu-reference",
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "bnnops": _version("bnnops"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
