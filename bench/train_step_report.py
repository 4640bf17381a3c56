"""The BinaryNet training step on a GPU: images per second, peak memory, and where a step's time goes.

``python -m bench.train_evidence --gpu-step [--profile] [--channels-last] [--compile]`` calls
:func:`gpu_step_report`; ``bench/gpu_check.sh`` runs it. Both steps (ours and the plain-PyTorch
baseline) come from :func:`bench.cases.train_step.training_step` and run in one process, one after
the other, timed with CUDA events. The table of ``python -m bench`` has no column for images per
second or peak memory, hence this report.
"""

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from bench import machine
from bench.cases.train_step import training_step


def _measure(step: Callable[[], Any], steps: int, warmup: int) -> tuple[float, int]:
    """Seconds per step (CUDA events, mean over ``steps`` after ``warmup``) and peak bytes allocated."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, torch.cuda.max_memory_allocated()


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_profile(step: Callable[[], Any], device: str, steps: int = 3, top: int = 12) -> dict[str, Any]:
    """Where a training step's time goes, over ``steps`` steps after one warm-up step.

    Returns a dict, times in ms per step:

    - ``host_ms``: the host's time to issue the step (until ``step()`` returns, no sync first);
    - ``wall_ms``: the step with the device finished (synchronized);
    - ``kernel_ms`` (CUDA): the sum of the device time of every kernel, from ``torch.profiler``.
      wall well above kernel time with host close to wall means the step is host-bound;
    - ``top``: the ``top`` largest entries, each {name, ms, calls} per step: CUDA kernels by device
      time on CUDA, torch ops by their own (self) CPU time on CPU.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync(device)
    host = wall = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        _sync(device)
        host, wall = host + t1 - t0, wall + time.perf_counter() - t0
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if cuda:
        events = [
            (e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.device_type == DeviceType.CUDA
        ]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    events.sort(key=lambda e: -e[1])
    result = {
        "steps": steps,
        "host_ms": 1e3 * host / steps,
        "wall_ms": 1e3 * wall / steps,
        "top": [{"name": name, "ms": us / 1e3 / steps, "calls": count / steps} for name, us, count in events[:top]],
    }
    if cuda:
        result["kernel_ms"] = sum(us for _, us, _ in events) / 1e3 / steps
    return result


def profile_markdown(profiles: dict[str, dict[str, Any]]) -> str:
    """The tables of :func:`step_profile` results, one per variant ({variant: result})."""
    sections = []
    for name, p in profiles.items():
        kernel = f", kernels {p['kernel_ms']:.2f} ms" if "kernel_ms" in p else ""
        lines = [
            f"{name}: host {p['host_ms']:.2f} ms, wall {p['wall_ms']:.2f} ms{kernel} per step (mean of {p['steps']})",
            "",
            "| op or kernel | ms / step | calls / step |",
            "|---|---|---|",
        ]
        lines += [f"| `{e['name'][:90]}` | {e['ms']:.3f} | {e['calls']:g} |" for e in p["top"]]
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def gpu_step_report(
    batch: int = 256,
    steps: int = 20,
    warmup: int = 5,
    profile: bool = False,
    compile: bool = False,
    channels_last: bool = False,
    cuda_graphs: bool = False,
    progress: Callable[[dict[str, Any], str], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """Images/s and peak memory of ours and the plain baseline, one process, one after the other.

    Returns (result dict, markdown table). Peak memory is ``torch.cuda.max_memory_allocated``
    over the timed steps, after warm-up (weights, gradients, optimizer state and activations).
    With ``profile``, each variant is then profiled by :func:`step_profile` (its row's "profile").
    With ``channels_last``, both again in channels-last memory format (rows "ours channels_last"
    and "plain channels_last"); with ``compile``, both again (NCHW) with their models under
    ``torch.compile`` (rows "ours compiled" and "plain compiled"; the warm-up steps include the
    compilation); with ``cuda_graphs``, both again (NCHW) with each step one replayed CUDA graph
    (rows "ours CUDA graph" and "plain CUDA graph", capturable optimizers; the capture's own
    warm-up runs before the timed steps' warm-up). ``progress(result, table)`` is called after each row, so a run stopped at a
    time limit keeps what it measured. A variant that fails becomes a row with "error" (its
    traceback) and the others still run.

    Raises:
        RuntimeError: torch sees no CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("--gpu-step needs a CUDA GPU")
    base = {
        "ours": "bnnops + Bop (bf16 activations)",
        "plain": "plain nn.Conv2d/nn.Linear + ste_sign + Adam (bf16 autocast)",
    }
    # (row suffix, label suffix, compile, channels_last, cuda_graph), in the order they run.
    kinds = [("", "", False, False, False)]
    if channels_last:
        kinds.append((" channels_last", ", channels_last", False, True, False))
    if compile:
        kinds.append((" compiled", ", torch.compile", True, False, False))
    if cuda_graphs:
        kinds.append((" CUDA graph", ", one CUDA graph per step", False, False, True))
    runs = [(name + suffix, name, compiled, cl, graph) for suffix, _, compiled, cl, graph in kinds for name in base]
    labels = {name + suffix: label + label_suffix for suffix, label_suffix, *_ in kinds for name, label in base.items()}
    result = {
        "machine": machine.describe("cuda"),
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "rows": {},
        "target": "speedup >= 1.5 at memory_ratio <= 1",
    }
    rows = result["rows"]
    for row_name, variant, compiled, cl, graph in runs:
        try:  # one variant failing still leaves the other's numbers from a short GPU window
            graphed = {"cuda_graph": True} if graph else {}  # the eager rows call it as without graphs
            step = training_step(variant, "cuda", batch, compile=compiled, channels_last=cl, **graphed)
            seconds, peak = _measure(step, steps, warmup)
            row = rows[row_name] = {"seconds_per_step": seconds, "images_per_s": batch / seconds, "peak_bytes": peak}
        except Exception:
            rows[row_name] = {"error": traceback.format_exc()}
        if profile and "error" not in rows[row_name]:
            try:
                row["profile"] = step_profile(step, "cuda")
            except Exception:
                row["profile_error"] = traceback.format_exc()
        step = None  # frees the model, its optimizer and the batch before the next variant
        torch.cuda.empty_cache()
        table = _report_table(result, labels)
        if progress is not None:
            progress(result, table)
    return result, table


def _report_table(result: dict[str, Any], labels: dict[str, str]) -> str:
    """Fills result's ratios and returns the markdown of :func:`gpu_step_report`."""
    rows = result["rows"]
    lines = [
        f"BinaryNet training step, CIFAR-10 shapes, batch {result['batch']} ({result['machine']['device_name']})",
        "",
        "| | images/s | peak memory |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        cells = (
            ("FAILED", row["error"].strip().splitlines()[-1])
            if "error" in row
            else (f"{row['images_per_s']:.0f}", f"{row['peak_bytes'] / 2**20:.0f} MiB")
        )
        lines.append(f"| {labels[name]} | {cells[0]} | {cells[1]} |")
    for suffix in [name[len("ours") :] for name in rows if name.startswith("ours")]:
        ours, plain = rows.get("ours" + suffix), rows.get("plain" + suffix)
        if ours and plain and "error" not in ours and "error" not in plain:
            speedup = ours["images_per_s"] / plain["images_per_s"]
            memory_ratio = ours["peak_bytes"] / plain["peak_bytes"]
            key = suffix.replace(" ", "_")
            result["speedup" + key], result["memory_ratio" + key] = speedup, memory_ratio
            lines.append(f"| ours / plain{suffix} | {speedup:.2f}x | {memory_ratio:.2f}x |")
    profiles = {labels[name]: row["profile"] for name, row in rows.items() if "profile" in row}
    if profiles:
        lines += ["", profile_markdown(profiles)]
    lines += [
        f"\n{labels[name]}: the profile failed: {row['profile_error'].strip().splitlines()[-1]}"
        for name, row in rows.items()
        if "profile_error" in row
    ]
    return "\n".join(lines)
