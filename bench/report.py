"""What a run leaves behind: the printed table, the JSON, the README markdown (the chart: ``bench.chart``).

A run's document (``results.json``) is ``{"meta", "ceilings", "results", "load_errors"}`` and, on a
machine without a GPU, ``"recorded_gpu"``: meta from ``bench.machine.describe`` plus the run's
threads, timing plan and load; ceilings from ``bench.machine.measure_ceilings``; results the rows of
``bench.runner`` in table order; recorded_gpu from ``bench.recorded.latest_gpu_results``. Everything
here reads only that document, so a recorded JSON renders the same table later (``python -m bench
--record``), recorded runs of an older row format included (rows without ranges show medians only).
"""

import json
import re
from pathlib import Path
from typing import Any

HEADERS = [
    "kernel",
    "shape",
    "ours",
    "baseline",
    "baseline time",
    "speedup",
    "rounds",
    "achieved",
    "of ceiling",
    "note",
]
RECORDED_HEADERS = ["run", *HEADERS[:6], *HEADERS[7:9]]
UNIT_NAMES = {"B/s": "B/s", "FLOP/s": "FLOP/s", "OP/s": "OPS"}
CPU_NOTE = (
    "No CUDA GPU: these are CPU timings of bnnops' pure-PyTorch reference path at small sizes, "
    "not numbers of the Triton kernels."
)
CPU_CEILING_NOTE = (
    "Of ceiling on CPU: compute-bound rows against this CPU's fp32 matmul in its fastest round (the "
    "reference path computes in fp32); memory-bound rows have none (their inputs fit in cache: a DRAM "
    "copy does not bound them)."
)
SPREAD_NOTE = (
    "Times: median over rounds (low-high: a confidence interval of at least 95% for that median, from the "
    "rounds' order statistics; 5 or fewer rounds: fastest-slowest); speedup = baseline time / our time per "
    "round (> 1: ours is faster), median (interval)."
)


def format_seconds(seconds: float) -> str:
    """0.00123 -> "1.23 ms": three significant digits in s, ms, us or ns."""
    scale, unit = _time_unit(seconds)
    return f"{seconds / scale:.3g} {unit}"


def _time_unit(seconds: float) -> tuple[float, str]:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return scale, unit
    return 1e-9, "ns"


def format_seconds_range(seconds: float, seconds_range: list[float] | None) -> str:
    """0.00123, [0.0012, 0.0013] -> "1.23 ms (1.2-1.3)": the range in the median's unit; no range: the median."""
    if not seconds_range:
        return format_seconds(seconds)
    scale, _ = _time_unit(seconds)
    low, high = (_digits(t / scale) for t in seconds_range)
    return f"{format_seconds(seconds)} ({low}-{high})"


def _digits(x: float) -> str:
    """Three significant digits without an exponent: 0.688 -> "0.688", 1364.2 -> "1364"."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def format_spread(speedup: float, speedup_range: list[float] | None = None) -> str:
    """2.98, [2.9, 3.05] -> "2.98x (2.90-3.05)"; without a range "2.98x"."""
    if not speedup_range:
        return f"{speedup:.2f}x"
    return f"{speedup:.2f}x ({speedup_range[0]:.2f}-{speedup_range[1]:.2f})"


def format_rate(rate: float, unit: str) -> str:
    """3.01e12, "B/s" -> "3.01 TB/s"; 8.1e14, "FLOP/s" -> "810 TFLOP/s"; 1.2e15, "OP/s" -> "1.2 POPS"."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if rate >= scale:
            return f"{rate / scale:.3g} {prefix}{UNIT_NAMES[unit]}"
    return f"{rate:.3g} {UNIT_NAMES[unit]}"


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits, '-', '.' become '_'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def write_json(path: str | Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` through a temporary file, so a killed run leaves valid JSON."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of strings under HEADERS: one per (case, shape, baseline); ours on the first only."""
    rows = []
    for r in results:
        if "ours_s" not in r:
            rows.append([r["case"], r["shape"], "FAILED" if "error" in r else "skipped"] + [""] * (len(HEADERS) - 3))
            continue
        ceiling = r.get("ceiling", r["bound"])
        ours = [
            format_seconds_range(r["ours_s"], r.get("ours_range_s")),
            str(r.get("rounds", "")),
            format_rate(r["rate"], r["rate_unit"]),
            f"{r['ceiling_fraction']:.0%} {ceiling}" if "ceiling_fraction" in r else "",
            "noisy" if r.get("noisy") else "",
        ]
        ranges, speedup_ranges = r.get("baselines_range_s", {}), r.get("speedup_range", {})
        baselines = list(r["baselines_s"].items()) or [("", None)]
        for i, (name, seconds) in enumerate(baselines):
            head = [r["case"], r["shape"], ours[0]] if i == 0 else ["", "", ""]
            versus = (
                [
                    name,
                    format_seconds_range(seconds, ranges.get(name)),
                    format_spread(r["speedup"][name], speedup_ranges.get(name)),
                ]
                if seconds
                else ["", "", ""]
            )
            rows.append(head + versus + (ours[1:] if i == 0 else ["", "", "", ""]))
    return rows


def text_table(rows: list[list[str]], headers: list[str] = HEADERS) -> str:
    """``rows`` under ``headers`` as fixed-width columns, a dashed line under the headers."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]], headers: list[str] = HEADERS) -> str:
    """``rows`` under ``headers`` as a markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_run(meta: dict[str, Any]) -> str:
    """One line naming the machine and versions of a run."""
    versions = f"torch {meta['torch']}" + (f", CUDA {meta['cuda']}" if meta.get("cuda") else "")
    versions += f", triton {meta['triton']}" if meta.get("triton") else ""
    commit = (meta.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if meta.get("dirty") else "")
    return f"{meta['device_name']} ({meta['device']}); {versions}; bnnops commit {commit}; {meta['date']}"


def describe_conditions(meta: dict[str, Any]) -> str:
    """One line: torch threads (and whether pinned), CPUs, load averages, timing plan; what a run recorded."""
    parts = []
    if "cpu_threads" in meta:
        threads = meta["cpu_threads"]
        pinned = " (pinned; --threads N to change)" if meta.get("threads_pinned") else ""
        cpus = f" on {meta['cpu_count']} CPUs" if meta.get("cpu_count") else ""
        parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}{pinned}{cpus}")
    loads = [meta.get(key) for key in ("load_average", "load_average_end")]
    if loads[0]:
        parts.append(
            f"load average {loads[0][0]:g} at the start"
            + (f", {loads[1][0]:g} at the end" if loads[1] else "")
            + " (processes wanting a CPU, this one included)"
        )
    timing = meta.get("timing")
    if timing:
        ms = f"{timing['round_s'] * 1e3:g} ms"
        if meta["device"] == "cuda":
            how = f"{timing['rounds']} rounds per case, a {ms} do_bench per callable, ours first every other round"
        else:
            how = (
                f"{timing['rounds']} rounds per case spread over the run, ours and baselines taking turns "
                f"call by call, about {ms} per callable per round"
            )
        parts.append(f"{how}, timed in {timing['clock']}")
        parts.append(f"noisy: a speedup's interval reaches over {timing['noisy_beyond']:.0%} from its median")
    return "; ".join(parts)


def describe_ceilings(ceilings: dict[str, dict[str, Any]]) -> str:
    """One line: each ceiling's measured rate and what was timed for it."""
    return "; ".join(
        f"{name} {format_rate(c['rate'], c['unit'])} ({c['what']}"
        + (f"; {c['rate_of']}" if c.get("rate_of", "median") != "median" else "")
        + ")"
        for name, c in ceilings.items()
    )


def _run_line(run_id: str, run: dict[str, Any]) -> str:
    commit = f"commit {run['commit']} ({run['commit_source']})" if run.get("commit") else "commit not recorded"
    versions = ", ".join(
        f"{name} {run[key]}"
        for name, key in (("torch", "torch"), ("CUDA", "cuda"), ("triton", "triton"))
        if run.get(key)
    )
    return f"{run_id}: {run['device_name']}, {run['date']}, {commit}; {versions}; {run['file']}"


def _recorded_rows(recorded: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in recorded["rows"]:
        for i, cells in enumerate(table_rows([r])):
            del cells[6], cells[-1]  # rounds, note: a recorded run's own table has them where it recorded them
            rows.append([r["run"] if i == 0 else "", *cells])
    return rows


def recorded_lines(recorded: dict[str, Any], markdown: bool = False) -> list[str]:
    """The recorded GPU section: a title, one line per run, the table (markdown or fixed-width)."""
    title = "Latest recorded GPU results (bench/results/; other machines and commits, not this run)"
    lines = [f"### {title}" if markdown else f"=== {title} ===", ""]
    lines += [("- " if markdown else "") + _run_line(run_id, run) for run_id, run in recorded["runs"].items()]
    lines.append("")
    table = markdown_table if markdown else text_table
    lines.append(table(_recorded_rows(recorded), RECORDED_HEADERS))
    lines += ["", "Per case and shape the newest recorded run that measured it; medians (CUDA events, L2 flushed)."]
    return lines


def text_report(document: dict[str, Any]) -> str:
    """The table ``python -m bench`` prints: machine, conditions, ceilings, rows, notes; recorded GPU rows apart."""
    meta = document["meta"]
    lines = [f"bnnops benchmark on {describe_run(meta)}"]
    if meta["device"] != "cuda":
        lines.append(CPU_NOTE)
    conditions = describe_conditions(meta)
    if conditions:
        lines.append(f"Conditions: {conditions}")
    lines.append(f"Measured ceilings: {describe_ceilings(document['ceilings'])}")
    if meta["device"] != "cuda":
        lines.append(CPU_CEILING_NOTE)
    lines += ["", text_table(table_rows(document["results"])), ""]
    lines.append(SPREAD_NOTE)
    noisy = [f"{r['case']} {r['shape']}" for r in document["results"] if r.get("noisy")]
    if noisy:
        lines.append(f"NOISY ({len(noisy)}): {', '.join(noisy)}: their rounds disagree; rerun on a quieter machine.")
    lines += [
        f"FAILED: {r['case']} {r['shape']}: {r['error'].strip().splitlines()[-1]}"
        for r in document["results"]
        if "error" in r
    ]
    lines += [
        f"FAILED to import bench/cases/{name}.py: {text.strip().splitlines()[-1]}"
        for name, text in document.get("load_errors", [])
    ]
    if document.get("recorded_gpu"):
        lines += ["", "", *recorded_lines(document["recorded_gpu"])]
    return "\n".join(lines)


def markdown(document: dict[str, Any], source: str | None = None) -> str:
    """The README "Performance" section body: machine, conditions, ceilings and the measured rows;
    then the recorded GPU rows, apart, when the document has them.

    ``source``: the recorded JSON's path, named after the machine line.
    """
    meta = document["meta"]
    measured = [r for r in document["results"] if "ours_s" in r]
    missing = [f"{r['case']} {r['shape']}" for r in document["results"] if "ours_s" not in r]
    lines = [f"Measured on {describe_run(meta)}" + (f" (`{source}`)." if source else ".")]
    if meta["device"] != "cuda":
        lines.append(f"**{CPU_NOTE}**")
    conditions = describe_conditions(meta)
    if conditions:
        lines.append(f"Conditions: {conditions}.")
    lines.append(f"Ceilings measured in the same run: {describe_ceilings(document['ceilings'])}.")
    if meta["device"] != "cuda":
        lines.append(CPU_CEILING_NOTE)
    lines += ["", markdown_table(table_rows(measured)), "", SPREAD_NOTE]
    if any(r.get("noisy") for r in measured):
        lines.append("noisy: the speedup's interval reaches beyond the run's tolerance; rerun before reading it.")
    if missing:
        lines.append(f"Not measured in this run: {', '.join(missing)}.")
    if document.get("recorded_gpu"):
        lines += ["", *recorded_lines(document["recorded_gpu"], markdown=True)]
    return "\n".join(lines) + "\n"


def record(run_json: str | Path, results_dir: str | Path) -> tuple[Path, str]:
    """Copy a run's JSON into ``results_dir`` with its README markdown beside it.

    Names are <date>T<hhmm>_<device>[_cpu-reference].json / .md. The copy leaves out the run's
    "recorded_gpu" section (those rows are recorded already). Returns (json path, markdown text).
    """
    document = json.loads(Path(run_json).read_text())
    document.pop("recorded_gpu", None)
    meta = document["meta"]
    stem = f"{meta['date'][:16].replace(':', '')}_{slug(meta['device_name'])}"  # 2026-01-31T1405_NVIDIA_H100...
    stem += "" if meta["device"] == "cuda" else "_cpu-reference"
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / f"{stem}.json"
    write_json(target, document)
    try:
        source = target.resolve().relative_to(Path(__file__).resolve().parent.parent).as_posix()
    except ValueError:
        source = target.name
    text = markdown(document, source)
    target.with_suffix(".md").write_text(text)
    return target, text
