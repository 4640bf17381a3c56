"""``speedup.png``: every speedup of a run as a horizontal bar on a log axis, the recorded GPU rows apart.

One bar per (case, shape, baseline), from 1x to the median speedup (right: ours faster, left:
slower), a whisker over its confidence interval, noisy rows hatched. Labels never overlap: the case and
shape go on the left (wrapped), the value and baseline in a column on the right, one bar per line.
A run with ``recorded_gpu`` (a CPU run) gets a second panel below with those rows and their run ids.
"""

import math
import textwrap
from pathlib import Path
from typing import Any

LABEL_WIDTH = 34  # characters per line of a case/shape label
BAR_INCHES = 0.28


def _bars(rows: list[dict[str, Any]], run_column: bool = False) -> list[dict[str, Any]]:
    bars = []
    for r in rows:
        for i, (name, speedup) in enumerate(r.get("speedup", {}).items()):
            label = f"{r['case']}: {r['shape']}" + (f" [{r['run']}]" if run_column else "")
            bars.append(
                {
                    "label": textwrap.fill(label, LABEL_WIDTH) if i == 0 else "",
                    "baseline": name,
                    "speedup": speedup,
                    "range": r.get("speedup_range", {}).get(name),
                    "noisy": bool(r.get("noisy")),
                    "first": i == 0,
                }
            )
    return bars


def _ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks for a span under two decades, decades only above (so tick labels never crowd)."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    steps = (1,) if math.log10(high / low) > 2 else (1, 2, 5)
    return [s * 10.0**d for d in decades for s in steps if low <= s * 10.0**d <= high]


def _panel(ax: Any, bars: list[dict[str, Any]], title: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    if not bars:
        ax.text(0.5, 0.5, "no measured results", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        return
    ends = [b["speedup"] for b in bars] + [x for b in bars if b["range"] for x in b["range"]] + [1.0]
    low, high = min(ends) / 1.5, max(ends) * 1.5
    y = list(range(len(bars)))[::-1]
    for pos, bar in zip(y, bars):
        s = bar["speedup"]
        color = "#2e7d32" if s >= 1 else "#c62828"
        ax.barh(pos, s - 1.0, left=1.0, height=0.7, color=color, alpha=0.45 if bar["noisy"] else 0.85)
        if bar["noisy"]:
            ax.barh(pos, s - 1.0, left=1.0, height=0.7, fill=False, hatch="///", edgecolor="black", linewidth=0)
        if bar["range"]:
            lo, hi = bar["range"]
            ax.errorbar(s, pos, xerr=[[s - lo], [hi - s]], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        text = f"{s:.2f}x vs {bar['baseline']}" + ("  (noisy)" if bar["noisy"] else "")
        ax.annotate(
            text,
            xy=(1.01, pos),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=7,
            annotation_clip=False,
        )
        if bar["first"] and pos != y[0]:
            ax.axhline(pos + 0.5, color="0.85", linewidth=0.6)
    ax.set_yticks(y, [b["label"] for b in bars], fontsize=7)
    ax.tick_params(axis="y", length=0)
    ax.set_ylim(-0.6, len(bars) - 0.4)
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ticks = _ticks(low, high)
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(
        "speedup = baseline time / our time (log scale; whisker: confidence interval of the median)", fontsize=7
    )


def figure(document: dict[str, Any]) -> Any:
    """The chart as a matplotlib Figure (Agg backend; see the module docstring).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = document["meta"]
    panels = [(_bars(document["results"]), _this_run_title(meta))]
    recorded = document.get("recorded_gpu")
    if recorded:
        runs = ", ".join(f"{run_id} {run['date'][:10]}" for run_id, run in recorded["runs"].items())
        devices = ", ".join(sorted({run["device_name"] for run in recorded["runs"].values()}))
        title = f"Recorded GPU runs, not this machine: {devices} ({runs})"
        panels.append((_bars(recorded["rows"], run_column=True), title))
    heights = [max(len(bars), 2) * BAR_INCHES + 1.2 for bars, _ in panels]
    total = sum(heights)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, total), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (bars, title) in zip(axes[:, 0], panels):
        _panel(ax, bars, title)
    # Inches of room: wrapped labels on the left, the value column on the right, a title above and
    # the axis label below each panel.
    fig.subplots_adjust(
        left=2.5 / 11, right=1 - 2.6 / 11, top=1 - 0.55 / total, bottom=0.45 / total, hspace=1.0 / (total / len(panels))
    )
    return fig


def chart(document: dict[str, Any], path: str | Path) -> bool:
    """Write :func:`figure` as a PNG to ``path``. Returns False without matplotlib."""
    try:
        fig = figure(document)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _this_run_title(meta: dict[str, Any]) -> str:
    title = f"This run: {meta['device_name']} ({meta['device']}), {meta['date'][:10]}"
    if "cpu_threads" in meta:
        threads = meta["cpu_threads"]
        title += f", {threads} torch thread{'s' if threads != 1 else ''}"
    if meta["device"] != "cuda":
        title += "\nCPU reference path at small sizes, not kernel numbers"
    return title
