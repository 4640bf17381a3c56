"""What a run leaves behind: the printed table, the JSON, the speedup chart, the README markdown.

A run's document (``results.json``) is ``{"meta", "ceilings", "results", "load_errors"}``: meta
from ``bench.machine.describe``, ceilings from ``bench.machine.measure_ceilings``, results the rows
of ``bench.runner`` in table order. Everything here reads only that document, so a recorded JSON
renders the same table later (``python -m bench --record``).
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

HEADERS = ["kernel", "shape", "ours", "baseline", "baseline time", "speedup", "achieved", "of ceiling"]
UNIT_NAMES = {"B/s": "B/s", "FLOP/s": "FLOP/s", "OP/s": "OPS"}
CPU_NOTE = (
    "No CUDA GPU: these are CPU timings of bnnops' pure-PyTorch reference path at small sizes, "
    "not numbers of the Triton kernels."
)


def format_seconds(seconds: float) -> str:
    """0.00123 -> "1.23 ms": three significant digits in s, ms, us or ns."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


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
            rows.append([r["case"], r["shape"], "FAILED" if "error" in r else "skipped"] + [""] * 5)
            continue
        ours = [
            format_seconds(r["ours_s"]),
            format_rate(r["rate"], r["rate_unit"]),
            f"{r['ceiling_fraction']:.0%} {r['bound']}" if "ceiling_fraction" in r else "",
        ]
        baselines = list(r["baselines_s"].items()) or [("", None)]
        for i, (name, seconds) in enumerate(baselines):
            head = [r["case"], r["shape"], ours[0]] if i == 0 else ["", "", ""]
            versus = [name, format_seconds(seconds), f"{r['speedup'][name]:.2f}x"] if seconds else ["", "", ""]
            rows.append(head + versus + (ours[1:] if i == 0 else ["", ""]))
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


def describe_ceilings(ceilings: dict[str, dict[str, Any]]) -> str:
    """One line: each bound's measured rate and what was timed for it."""
    return "; ".join(f"{bound} {format_rate(c['rate'], c['unit'])} ({c['what']})" for bound, c in ceilings.items())


def text_report(document: dict[str, Any]) -> str:
    """The table ``python -m bench`` prints, with the machine, the ceilings and the CPU note."""
    meta = document["meta"]
    lines = [f"bnnops benchmark on {describe_run(meta)}"]
    if meta["device"] != "cuda":
        lines.append(CPU_NOTE)
    lines.append(f"Measured ceilings: {describe_ceilings(document['ceilings'])}")
    lines += ["", text_table(table_rows(document["results"])), ""]
    lines.append("speedup = baseline time / our time (> 1: ours is faster); times are medians.")
    lines += [
        f"FAILED: {r['case']} {r['shape']}: {r['error'].strip().splitlines()[-1]}"
        for r in document["results"]
        if "error" in r
    ]
    lines += [
        f"FAILED to import bench/cases/{name}.py: {text.strip().splitlines()[-1]}"
        for name, text in document.get("load_errors", [])
    ]
    return "\n".join(lines)


def markdown(document: dict[str, Any], source: str | None = None) -> str:
    """The README "Performance" section body: machine, ceilings and the measured rows only.

    ``source``: the recorded JSON's path, named after the machine line.
    """
    meta = document["meta"]
    measured = [r for r in document["results"] if "ours_s" in r]
    missing = [f"{r['case']} {r['shape']}" for r in document["results"] if "ours_s" not in r]
    lines = [f"Measured on {describe_run(meta)}" + (f" (`{source}`)." if source else ".")]
    if meta["device"] != "cuda":
        lines.append(f"**{CPU_NOTE}**")
    lines += [f"Ceilings measured in the same run: {describe_ceilings(document['ceilings'])}.", ""]
    lines.append(markdown_table(table_rows(measured)))
    lines += ["", "Speedup = baseline time / our time (> 1: ours is faster); median times, CUDA events on a GPU."]
    if missing:
        lines.append(f"Not measured in this run: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def chart(document: dict[str, Any], path: str | Path) -> bool:
    """Write a PNG bar chart of every speedup (log scale, 1x marked). Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars = [
        (f"{r['case']} {r['shape']}", name, s) for r in document["results"] for name, s in r.get("speedup", {}).items()
    ]
    names = list(dict.fromkeys(name for _, name, _ in bars))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.32 * max(len(bars), 1)))
    for y, (_, name, speedup) in enumerate(reversed(bars)):
        # Bars grow from 1x, left for slower and right for faster, symmetric on the log axis.
        ax.barh(y, speedup - 1.0, left=1.0, color=colors[name], label=name)
        ax.annotate(
            f"{speedup:.2f}x",
            (speedup, y),
            xytext=(3 if speedup >= 1 else -3, 0),
            textcoords="offset points",
            va="center",
            ha="left" if speedup >= 1 else "right",
            fontsize=7,
        )
    ax.set_yticks(range(len(bars)), [label for label, _, _ in reversed(bars)], fontsize=7)
    speedups = [s for _, _, s in bars] or [1.0]
    low, high = min(min(speedups), 1.0) / 2, max(max(speedups), 1.0) * 2
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.axvline(1.0, color="black", linewidth=0.8)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    if handles:
        ax.legend([handles[n] for n in names], names, fontsize=7, title="baseline", title_fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no measured results", transform=ax.transAxes, ha="center")
    meta = document["meta"]
    title = f"bnnops speedups on {meta['device_name']}"
    if meta["device"] != "cuda":
        title += "\nCPU reference path at small sizes, not kernel numbers"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def record(run_json: str | Path, results_dir: str | Path) -> tuple[Path, str]:
    """Copy a run's JSON into ``results_dir`` with its README markdown beside it.

    Names are <date>T<hhmm>_<device>[_cpu-reference].json / .md. Returns (json path, markdown text).
    """
    document = json.loads(Path(run_json).read_text())
    meta = document["meta"]
    stem = f"{meta['date'][:16].replace(':', '')}_{slug(meta['device_name'])}"  # 2026-01-31T1405_NVIDIA_H100...
    stem += "" if meta["device"] == "cuda" else "_cpu-reference"
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / f"{stem}.json"
    shutil.copyfile(run_json, target)
    try:
        source = target.resolve().relative_to(Path(__file__).resolve().parent.parent).as_posix()
    except ValueError:
        source = target.name
    text = markdown(document, source)
    target.with_suffix(".md").write_text(text)
    return target, text
