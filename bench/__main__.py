"""``python -m bench``: the kernel benchmark, run from a checkout (see bench/README.md).

Measures the machine's ceilings, then every registered case beside its baselines in interleaved
rounds, prints one table and writes results.json, speedup.png and table.md into the output directory
(default ``<checkout>/bench/out/<timestamp>/``, wherever it is run from). Without a GPU it times the
CPU reference path at small sizes on one pinned thread, says so, and shows the latest recorded GPU
results from ``bench/results/`` apart from its own rows. Exit status 1 when a case failed or a case
module did not import.

``python -m bench`` needs the checkout's root as the working directory (bench/ is not installed);
``python path/to/checkout/bench`` runs the same from any directory.
"""

import sys
from pathlib import Path

if not __package__:  # run as a script (`python path/to/bench`): import bench from its checkout
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import datetime
import time

import torch

from bench import chart, machine, recorded, report, runner
from bench.registry import Case, Item, load_cases, plan
from bench.timing import cpu_clock, plan_for

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CPU_BUDGET_S = 80  # the default --budget on CPU: a CPU run ends in under 2 minutes
# One torch thread by default on CPU: with several, every op waits at a barrier for its slowest
# thread, and on a shared or small machine a thread that loses its core for a scheduler slice
# (milliseconds) stalls the op: the same case then reads 100x faster or slower from run to run.
# One thread's time depends on its own core only.
CPU_THREADS = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m bench`` (``argv`` without the program; None: sys.argv)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only each case's headline shape, shorter timing")
    p.add_argument("--filter", metavar="PATTERN", help="regular expression searched in '<case> <shape>'")
    p.add_argument(
        "--out", metavar="DIR", type=Path, help="output directory (default <checkout>/bench/out/<timestamp>)"
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    p.add_argument(
        "--budget",
        metavar="SECONDS",
        type=float,
        help="start no new shape once this many seconds have passed since the run started "
        "(ceilings included); the rest are recorded as skipped "
        f"(default: none on CUDA, {CPU_BUDGET_S} s on CPU, which keeps a CPU run under 2 minutes)",
    )
    p.add_argument(
        "--threads",
        metavar="N",
        type=int,
        help=f"torch threads while timing (default: {CPU_THREADS} on CPU, where more threads make the "
        "numbers unstable on a shared machine; torch's default on CUDA)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and shapes that would run, and exit")
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="write a torch.profiler Chrome trace of the first case/shape matching NAME (a regex)",
    )
    p.add_argument(
        "--record",
        metavar="RUN_JSON",
        type=Path,
        help="copy a run's results.json into --results-dir with its README markdown, print it, exit",
    )
    p.add_argument(
        "--results-dir",
        metavar="DIR",
        type=Path,
        default=BENCH_DIR / "results",
        help="where --record writes and a CPU run reads the recorded GPU results (default <checkout>/bench/results)",
    )
    return p.parse_args(argv)


def _check_bnnops() -> None:
    """Exit with the install command when bnnops is missing; warn when it is another checkout's."""
    try:
        import bnnops
    except ImportError as error:
        sys.exit(
            f"python -m bench: cannot import bnnops ({error}); install this checkout: pip install -e '{REPO}[bench]'"
        )
    location = Path(bnnops.__file__).resolve().parent
    if REPO not in location.parents:
        print(
            f"python -m bench: bnnops is imported from {location}, not from this checkout ({REPO}): "
            "the numbers are that bnnops's",
            file=sys.stderr,
        )


def default_out_dir() -> Path:
    """<checkout>/bench/out/<local timestamp>: the same place from whatever directory the run starts."""
    return BENCH_DIR / "out" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m bench`` with ``argv``; returns the exit status (see the module docstring).

    The torch thread count it sets (``--threads``) is restored before it returns.
    """
    started = time.perf_counter()  # --budget counts from here: the ceilings included
    args = parse_args(argv)
    if args.record:
        path, text = report.record(args.record, args.results_dir)
        print(text)
        print(f"recorded {path} and {path.with_suffix('.md')}", file=sys.stderr)
        return 0

    device = args.device or machine.default_device()
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m bench: --device cuda asked for, but torch sees no CUDA GPU")
    if args.threads is not None and args.threads < 1:
        sys.exit(f"python -m bench: --threads must be at least 1, got {args.threads}")
    _check_bnnops()
    size = "quick" if args.quick else "full"
    cases, load_errors = load_cases()
    for name, text in load_errors:
        print(f"bench/cases/{name}.py failed to import; its cases are missing:\n{text}", file=sys.stderr)
    items = plan(cases, device, size, args.profile or args.filter)

    if args.list:
        headline = {(c.name, label) for c, label, _ in plan(cases, device, "quick")}
        for c, label, params in items:
            mark = "  [headline]" if (c.name, label) in headline else ""
            print(f"{c.name:20} {label:28} {runner.jsonable(params)}{mark}")
        return 1 if load_errors else 0
    if not items:
        sys.exit(f"python -m bench: no {device} case matches {args.profile or args.filter!r}; see --list")

    threads = args.threads or (CPU_THREADS if device != "cuda" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        out = args.out or default_out_dir()
        out.mkdir(parents=True, exist_ok=True)
        if args.profile:
            case, label, _ = items[0]
            print(f"profiling {case.name} {label} on {device}", file=sys.stderr)
            path = runner.profile(items[0], device, out)
            print(f"wrote {path} (open it in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
            return 0
        return _run(args, device, size, cases, items, load_errors, out, threads is not None, started)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    args: argparse.Namespace,
    device: str,
    size: str,
    cases: list[Case],
    items: list[Item],
    load_errors: list[tuple[str, str]],
    out: Path,
    threads_pinned: bool,
    started: float,
) -> int:
    if device != "cuda":
        print(report.CPU_NOTE, file=sys.stderr)
    print(f"measuring the ceilings of {device} ...", file=sys.stderr, flush=True)
    timing = plan_for(device, args.quick)
    meta = dict(
        machine.describe(device),
        threads_pinned=threads_pinned,
        timing={
            "rounds": timing.rounds,
            "round_s": timing.round_s,
            "clock": "CUDA events" if device == "cuda" else cpu_clock(),
            "noisy_beyond": runner.NOISY_BEYOND,
        },
        size=size,
        filter=args.filter,
        argv=sys.argv[1:],
    )
    document = {
        "meta": meta,
        "ceilings": machine.measure_ceilings(device, args.quick),
        "results": [],
        "load_errors": load_errors,
    }
    if device != "cuda":
        document["recorded_gpu"] = recorded.latest_gpu_results(args.results_dir, REPO)
    print(f"ceilings: {report.describe_ceilings(document['ceilings'])}", file=sys.stderr)
    results_json = out / "results.json"

    def save(rows: list[dict]) -> None:
        document["results"] = rows
        report.write_json(results_json, document)

    budget = args.budget if args.budget is not None else (None if device == "cuda" else CPU_BUDGET_S)
    if budget is not None:
        budget -= time.perf_counter() - started  # what the ceilings left of it for the cases
    rows = runner.run(items, device, args.quick, document["ceilings"], on_row=save, budget_s=budget)
    meta["load_average_end"] = machine.load_average()
    # Run order puts headline shapes first; the table follows the registry's order.
    order = {(c.name, label): i for i, (c, label, _) in enumerate(plan(cases, device, size))}
    save(sorted(rows, key=lambda r: order[(r["case"], r["shape"])]))
    (out / "table.md").write_text(report.markdown(document))
    wrote = [results_json, out / "table.md"]
    if chart.chart(document, out / "speedup.png"):
        wrote.append(out / "speedup.png")
    else:
        print("matplotlib is not installed: no speedup.png (pip install matplotlib)", file=sys.stderr)
    print(report.text_report(document))
    print(f"wrote {', '.join(str(p) for p in wrote)}", file=sys.stderr)
    failed = load_errors or any("error" in r for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
