"""The benchmarks cannot rot: every registered case runs once at tiny size, and the main job
(``python -m bench --quick``) and the pytest-benchmark suite run end to end. The timing harness's
logic (interleaved rounds, spreads, the noisy mark, the CPU ceiling, the recorded GPU section, the
chart's layout, running from any directory) is tested with fake clocks and fake rows. No speed is
asserted: speed lives in the benchmarks themselves.
"""

import importlib.util
import inspect
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import Workload, case, chart, load_cases, machine, recorded, registry, report, runner, timing
from bench.__main__ import default_out_dir
from bench.__main__ import main as bench_main

REPO = Path(__file__).resolve().parent.parent
CASES, LOAD_ERRORS = load_cases()


def test_every_case_module_imports():
    assert not LOAD_ERRORS, "\n".join(text for _, text in LOAD_ERRORS)
    assert {"pack_signs", "unpack_signs"} <= {c.name for c in CASES}


def test_every_case_module_imports_without_triton():
    # bnnops works without Triton (the CPU reference path), so the benchmark's cases must load
    # there too: they reach the kernels modules only when a CUDA case runs.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib.util as u; real = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 'triton' else real(n, *a)\n"
        "from bench import load_cases\n"
        "cases, errors = load_cases()\n"
        "assert not errors, errors\n"
        "print(len(cases), 'cases')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert run.returncode == 0 and "cases" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("bench_case", CASES, ids=lambda c: c.name)
def test_case_body_runs_at_tiny_size(bench_case, device):
    prepared = runner.Prepared(bench_case, "tiny", bench_case.tiny, device)
    assert isinstance(prepared.work, Workload)
    assert next(iter(prepared.fns)) == "ours"
    for fn in prepared.fns.values():
        fn()
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("bench_case", CASES, ids=lambda c: c.name)
def test_case_shapes_fit_the_setup_signature(bench_case):
    # GPU shapes are never built here: a misspelt parameter would otherwise show first on the GPU.
    signature = inspect.signature(bench_case.setup)
    for device in ("cuda", "cpu"):
        for _, params in bench_case.shapes(device, "full"):
            signature.bind(device, **params)


def test_workload_rejects_what_cannot_be_rated():
    ours = lambda: None
    with pytest.raises(ValueError, match="bound"):
        Workload(ours=ours, baselines={}, bound="fp8", bytes=1)
    with pytest.raises(ValueError, match="ops"):
        Workload(ours=ours, baselines={}, bound="int8", bytes=1)
    with pytest.raises(ValueError, match="bytes"):
        Workload(ours=ours, baselines={}, bound="memory", bytes=0)
    with pytest.raises(ValueError, match="ours"):
        Workload(ours=ours, baselines={"ours": ours}, bound="memory", bytes=1)


def test_case_registration_is_checked():
    shapes = {"a": {"n": 1}}
    with pytest.raises(ValueError, match="registered twice"):
        case("pack_signs", cuda=shapes, cpu=shapes, tiny={"n": 1})
    with pytest.raises(ValueError, match="quick labels"):
        case("never_registered", cuda=shapes, cpu=shapes, tiny={"n": 1}, quick=["b"])


def test_plan_runs_headline_shapes_first_and_filters():
    def setup(device, n):
        raise AssertionError("plan must not build inputs")

    fake = [
        registry.Case(
            name, setup, cuda={"big": {"n": 2}, "head": {"n": 1}}, cpu={"c": {"n": 1}}, tiny={"n": 1}, quick=("head",)
        )
        for name in ("k1", "k2")
    ]
    order = [(c.name, label) for c, label, _ in registry.plan(fake, "cuda", "full")]
    assert order == [("k1", "head"), ("k2", "head"), ("k1", "big"), ("k2", "big")]
    assert [(c.name, label) for c, label, _ in registry.plan(fake, "cuda", "full", "K2 B")] == [("k2", "big")]
    assert [label for _, label, _ in registry.plan(fake, "cpu", "quick")] == ["c", "c"]


def test_main_job_quick_end_to_end(tmp_path, capsys):
    # `python -m bench` is `sys.exit(main())`; in-process saves a second torch import.
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    status = bench_main(["--quick", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.out + printed.err
    assert torch.get_num_threads() == threads  # the pinned thread count does not leak into the caller
    assert report.CPU_NOTE in printed.out and "speedup" in printed.out
    assert "1 torch thread (pinned; --threads N to change)" in printed.out and "thread CPU time" in printed.out
    document = json.loads((out / "results.json").read_text())
    meta = document["meta"]
    assert meta["mode"] == "cpu-reference" and meta["cpu_threads"] == 1 and meta["threads_pinned"]
    assert meta["timing"]["rounds"] == timing.PLANS["cpu", True].rounds and meta["load_average_end"]
    # On CPU the one ceiling is the fp32 matmul, for compute-bound rows only.
    assert set(document["ceilings"]) == {"fp32"}
    rows = document["results"]
    assert {r["case"] for r in rows} == {c.name for c in CASES}
    for r in rows:
        assert r["ours_s"] > 0 and r["rate"] > 0, r
        assert r["ours_range_s"][0] <= r["ours_s"] <= r["ours_range_s"][1], r
        assert r["rounds"] == meta["timing"]["rounds"] == len(r["rounds_s"]["ours"]), r
        for name, (low, high) in r["speedup_range"].items():
            assert low <= r["speedup"][name] <= high, r
        assert isinstance(r["noisy"], bool)
        assert ("ceiling_fraction" in r) == (r["bound"] != "memory"), r
        assert r.get("ceiling", "fp32") == "fp32"
    assert (out / "table.md").read_text().count("\n|") >= len(rows)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The latest recorded GPU rows follow the CPU table, apart, with their runs.
    assert document["recorded_gpu"]["runs"], "bench/results/ holds H100 runs"
    for text in (printed.out, (out / "table.md").read_text()):
        cpu_part, gpu_part = text.split("Latest recorded GPU results")
        assert "NVIDIA H100" in gpu_part and "NVIDIA H100" not in cpu_part
        assert "T1429: NVIDIA H100 80GB HBM3, 2026-11-26T14:29:12Z, commit 4f8b161" in gpu_part

    # --record turns the run into the README markdown beside a copy of the JSON, without the GPU rows.
    assert bench_main(["--record", str(out / "results.json"), "--results-dir", str(tmp_path / "results")]) == 0
    recorded_files = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(recorded_files) == 2 and recorded_files[0].endswith("_cpu-reference.json")
    assert recorded_files[1].endswith(".md")
    text = (tmp_path / "results" / recorded_files[1]).read_text()
    assert report.CPU_NOTE in text and all(f"| {r['case']} |" in text for r in rows)
    assert "recorded_gpu" not in json.loads((tmp_path / "results" / recorded_files[0]).read_text())
    assert "Latest recorded GPU results" not in text


class _FakeClock:
    """A clock that advances only when a fake callable "runs": ``cost`` seconds times the machine's
    current slowness, which ``drift`` changes after every call (the load rising over the run)."""

    def __init__(self, drift):
        self.now, self.slowness, self.drift, self.calls = 0.0, 1.0, drift, []

    def read(self):
        return self.now

    def callable(self, name, cost):
        def run():
            self.calls.append(name)
            self.now += cost * self.slowness
            self.slowness = self.drift(self.slowness)

        return run


def test_cpu_rounds_interleave_calls_so_drift_cancels_in_the_ratio(monkeypatch):
    # The machine slows down 3% at every call (3x over the run); our callable costs 1, the baseline 2.
    clock = _FakeClock(drift=lambda s: s * 1.03)
    monkeypatch.setattr(timing.time, "thread_time", clock.read)
    monkeypatch.setattr(timing.time, "perf_counter", clock.read)
    fns = {"ours": clock.callable("ours", 0.001), "base": clock.callable("base", 0.002)}
    plan = timing.Plan(rounds=5, round_s=0.003, min_calls=3)
    timings = timing.interleaved_rounds(fns, "cpu", plan)
    # One untimed call each, one calibration call each, then 5 rounds of 3 turns that flip the order.
    timed = clock.calls[4:]
    assert clock.calls[:4] == ["ours", "base", "ours", "base"]
    assert timings.calls_per_round == {"ours": 3, "base": 3} and len(timed) == 5 * 3 * 2
    assert timed[:6] == ["ours", "base", "base", "ours", "ours", "base"]
    assert timed[6:12] == ["base", "ours", "ours", "base", "base", "ours"]  # round 1 starts the other way
    # Absolute times drift by 2x over the rounds, but every round's ratio stays within 3% of 2.
    ours = timings.spread("ours")
    assert ours.high / ours.low > 1.9 and ours.wider_than(0.10)
    speedup = timings.ratio("base", "ours")
    assert speedup.rounds == 5 and 1.94 <= speedup.low <= speedup.median <= speedup.high <= 2.07
    assert not speedup.wider_than(0.10)


def test_cuda_rounds_alternate_which_callable_goes_first(monkeypatch):
    seen = []
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    monkeypatch.setattr(timing, "_cuda_round_seconds", lambda fn, round_s: seen.append(fn()) or 1e-3)
    fns = {"ours": lambda: "ours", "a": lambda: "a", "b": lambda: "b"}
    timings = timing.interleaved_rounds(fns, "cuda", timing.Plan(rounds=3, round_s=0.02))
    assert seen == ["ours", "a", "b", "b", "a", "ours", "ours", "a", "b"]
    assert {name: len(values) for name, values in timings.rounds.items()} == {"ours": 3, "a": 3, "b": 3}


def test_spread_and_the_noisy_rule():
    spread = timing.Spread.of([1.0, 1.2, 0.9, 1.05, 1.0])
    # Five rounds: no interval reaches 95%; the fastest and slowest round, at 1 - 2/32.
    assert (spread.median, spread.low, spread.high, spread.rounds) == (1.0, 0.9, 1.2, 5)
    assert spread.confidence == pytest.approx(1 - 2 / 32)
    assert spread.relative() == pytest.approx((-0.1, 0.2))
    assert spread.wider_than(0.10) and not spread.wider_than(0.20)
    # Symmetric on a log scale: a round at median / 1.1 is as far as one at median * 1.1.
    assert not timing.Spread.of([1.0, 1.0, 1.0 / 1.1]).wider_than(0.10)
    assert timing.Spread.of([1.0, 1.0, 1.0 / 1.11]).wider_than(0.10)
    # Eleven rounds: the 2nd fastest and 2nd slowest (98.8%), so one stray round each side is not noise.
    eleven = timing.Spread.of([1.0] * 4 + [0.98, 0.99, 1.01, 1.02, 1.03] + [0.5, 2.0])
    assert (eleven.low, eleven.high, eleven.rounds) == (0.98, 1.03, 11) and not eleven.wider_than(0.10)
    assert eleven.confidence == pytest.approx(1 - 2 * 12 / 2048)
    assert timing.Spread.of([1.0] * 7 + [0.5, 0.5, 2.0, 2.0]).wider_than(0.10)  # two stray rounds each side
    twenty = timing.Spread.of(list(range(1, 21)))
    assert (twenty.low, twenty.high) == (6, 15) and twenty.confidence >= 0.95
    with pytest.raises(ValueError, match="at least one round"):
        timing.Spread.of([])
    paired = timing.Timings({"ours": [1.0, 2.0, 4.0], "base": [3.0, 6.0, 12.0]}, {"ours": 1, "base": 1})
    ratio = paired.ratio("base", "ours")
    assert (ratio.median, ratio.low, ratio.high, ratio.rounds) == (3.0, 3.0, 3.0, 3)


def _fake_prepared(bound, names):
    """A Prepared on CPU for a case of ``bound`` with callables ``names`` ("ours" first)."""

    def setup(device):
        return Workload(
            ours=lambda: None,
            baselines={name: (lambda: None) for name in names if name != "ours"},
            bound=bound,
            bytes=4096,
            ops=None if bound == "memory" else 2**20,
        )

    fake = registry.Case("fake", setup, cuda={"s": {}}, cpu={"s": {}}, tiny={})
    return runner.Prepared(fake, "s", {}, "cpu")


def _fake_timings(monkeypatch, rounds):
    monkeypatch.setattr(
        runner, "interleaved_rounds", lambda fns, device, plan: timing.Timings(rounds, dict.fromkeys(rounds, 9))
    )


@pytest.mark.parametrize(
    ("base_rounds", "noisy"),
    [([2.0, 2.1, 1.95, 2.05, 2.0], False), ([2.0, 2.5, 1.95, 2.05, 2.0], True), ([2.0, 2.0, 1.7, 2.0, 2.0], True)],
)
def test_measure_marks_rows_whose_rounds_disagree(monkeypatch, base_rounds, noisy):
    _fake_timings(monkeypatch, {"ours": [1.0] * 5, "base": base_rounds})
    ceilings = {"fp32": {"rate": 2**21, "unit": "FLOP/s", "what": "fake"}}
    row = runner.measure(_fake_prepared("int8", ["ours", "base"]), quick=True, ceilings=ceilings)
    assert row["speedup"]["base"] == 2.0 and row["speedup_range"]["base"] == [min(base_rounds), max(base_rounds)]
    assert row["rounds"] == 5 and row["rounds_s"]["base"] == base_rounds and row["calls_per_round"]["ours"] == 9
    assert row["noisy"] is noisy
    # On CPU an int8-bound case is compared with the fp32 matmul (the reference path computes in fp32).
    assert row["ceiling"] == "fp32" and row["ceiling_fraction"] == pytest.approx(0.5)
    cells = report.table_rows([row])[0]
    assert cells[5] == f"2.00x ({min(base_rounds):.2f}-{max(base_rounds):.2f})" and cells[6] == "5"
    assert cells[-1] == ("noisy" if noisy else "") and cells[-2] == "50% fp32"
    meta = {"device": "cpu", "device_name": "cpu", "torch": "x", "date": "d"}
    text = report.text_report({"meta": meta, "ceilings": ceilings, "results": [row]})
    assert ("NOISY (1): fake s" in text) is noisy


def test_memory_bound_rows_have_no_ceiling_on_cpu(monkeypatch):
    _fake_timings(monkeypatch, {"ours": [1.0, 1.0, 1.0]})
    ceilings = {"fp32": {"rate": 1e9, "unit": "FLOP/s", "what": "fake"}}
    row = runner.measure(_fake_prepared("memory", ["ours"]), quick=True, ceilings=ceilings)
    assert "ceiling" not in row and "ceiling_fraction" not in row and row["noisy"] is False
    # Two rounds (a run cut short by its budget) cannot show a spread: noisy.
    _fake_timings(monkeypatch, {"ours": [1.0, 1.0]})
    assert runner.measure(_fake_prepared("memory", ["ours"]), quick=True, ceilings=ceilings)["noisy"] is True
    assert machine.ceiling_for("memory", "cuda") == "memory" and machine.ceiling_for("int8", "cuda") == "int8"
    assert machine.ceiling_for("memory", "cpu") is None and machine.ceiling_for("bf16", "cpu") == "fp32"


def test_cpu_run_spreads_every_case_over_the_run(monkeypatch):
    calls = []

    def counting_case(name, fail_at=None):
        def setup(device):
            count = itertools.count()

            def ours():
                calls.append(name)
                if next(count) == fail_at:
                    raise RuntimeError(f"{name} broke")

            return Workload(ours=ours, baselines={}, bound="memory", bytes=1)

        return registry.Case(name, setup, cuda={"s": {}}, cpu={"s": {}}, tiny={})

    def no_inputs(device):
        raise ValueError("no inputs")

    cases = [counting_case("a"), counting_case("b"), counting_case("c", fail_at=4)]
    cases.append(registry.Case("d", no_inputs, cuda={"s": {}}, cpu={"s": {}}, tiny={}))
    monkeypatch.setitem(timing.PLANS, ("cpu", True), timing.Plan(rounds=3, round_s=0.0, min_calls=1))
    saved = []
    rows = runner.run([(c, "s", {}) for c in cases], "cpu", True, {}, on_row=lambda rows: saved.append(len(rows)))
    # Inputs first (a warm-up and a calibration call each), then one round of every case per pass.
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3
    assert [r["case"] for r in rows] == ["a", "b", "c", "d"] and saved == [4, 4, 4]
    assert rows[0]["rounds"] == rows[1]["rounds"] == 3
    assert "c broke" in rows[2]["error"] and "no inputs" in rows[3]["error"]


def _gpu_run(date, rows, commit=None):
    meta = {"device": "cuda", "device_name": "GPU X", "date": date, "commit": commit, "torch": "2.11"}
    return {"meta": meta, "ceilings": {}, "results": rows}


def _row(case_name, shape, ours_s):
    return {
        "case": case_name,
        "shape": shape,
        "bound": "memory",
        "ours_s": ours_s,
        "baselines_s": {"b": 2 * ours_s},
        "speedup": {"b": 2.0},
        "rate": 1e12,
        "rate_unit": "B/s",
    }


def test_latest_gpu_results_take_each_shape_from_its_newest_run(tmp_path):
    (tmp_path / "2026-01-01T1000_GPU_X.json").write_text(
        json.dumps(_gpu_run("2026-01-01T10:00:00Z", [_row("k1", "a", 1.0), _row("k2", "b", 1.0)]))
    )
    (tmp_path / "2026-01-01T1000_GPU_X.md").write_text("Notes:\n- Code: main at commit 1234abc, for the test.\n")
    newer = [_row("k1", "a", 0.5), {"case": "k2", "shape": "b", "skipped": "time budget of 1 s spent"}]
    (tmp_path / "2026-01-02T0900_GPU_X.json").write_text(json.dumps(_gpu_run("2026-01-02T09:00:00Z", newer, "ff" * 20)))
    cpu = dict(_gpu_run("2026-01-03T09:00:00Z", [_row("k1", "a", 9.0)]), meta={"device": "cpu", "date": "2026-01-03"})
    (tmp_path / "2026-01-03T0900_cpu-reference.json").write_text(json.dumps(cpu))
    (tmp_path / "train_evidence.json").write_text(json.dumps({"arms": []}))

    latest = recorded.latest_gpu_results(tmp_path)
    assert [(r["case"], r["shape"], r["ours_s"], r["run"]) for r in latest["rows"]] == [
        ("k1", "a", 0.5, "T0900"),  # the newer run measured it
        ("k2", "b", 1.0, "T1000"),  # the newer run skipped it: the older run's row stands
    ]
    assert list(latest["runs"]) == ["T0900", "T1000"]
    assert latest["runs"]["T0900"]["commit"] == "ff" * 5 and latest["runs"]["T0900"]["commit_source"] == "run metadata"
    assert latest["runs"]["T1000"]["commit"] == "1234abc"  # from the run's notes: the JSON has none
    lines = "\n".join(report.recorded_lines(latest))
    assert "T1000: GPU X, 2026-01-01T10:00:00Z, commit 1234abc (2026-01-01T1000_GPU_X.md notes)" in lines
    assert recorded.latest_gpu_results(tmp_path / "empty") is None


def test_repo_results_hold_the_h100_runs():
    latest = recorded.latest_gpu_results(REPO / "bench" / "results", REPO)
    assert {run["device_name"] for run in latest["runs"].values()} == {"NVIDIA H100 80GB HBM3"}
    bop = next(r for r in latest["rows"] if r["shape"] == "105M: 25 x 2048x2048 fp32")
    assert bop["run"] == "T1429" and latest["runs"]["T1429"]["file"].startswith("bench/results/")


def _boxes(fig, texts):
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_text() and t.get_visible()]


def _overlapping(boxes):
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]


def test_chart_labels_never_overlap():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    def fake_row(i, speedup):
        return {
            "case": f"layer_overhead_{i}",
            "shape": f"BinaryConv2d 1x32x8x8 training forward variant {i}",
            "speedup": {"its op, called directly": speedup, "another baseline with a long name": 1 / speedup},
            "speedup_range": {"its op, called directly": [speedup / 1.3, speedup * 1.3]},
            "noisy": i % 3 == 0,
        }

    rows = [fake_row(i, s) for i, s in enumerate([166.0, 0.01, 1.0, 3.2, 0.4, 12.0, 0.9, 1.1])]
    document = {
        "meta": {"device": "cpu", "device_name": "AMD EPYC", "date": "2026-12-06T22:00:00Z", "cpu_threads": 1},
        "results": rows,
        "recorded_gpu": {
            "runs": {"T1429": {"date": "2026-11-26T14:29:12Z", "device_name": "NVIDIA H100 80GB HBM3"}},
            "rows": [dict(fake_row(i, 10.0**i), run="T1429") for i in range(-2, 3)],
        },
    }
    fig = chart.figure(document)
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            y_labels, x_labels = _boxes(fig, ax.get_yticklabels()), _boxes(fig, ax.get_xticklabels())
            values = _boxes(fig, ax.texts)
            assert len(y_labels) >= 5 and len(x_labels) >= 3 and len(values) >= 10
            assert not _overlapping(y_labels) and not _overlapping(x_labels) and not _overlapping(values)
            # The case labels sit left of the axes, the value column right of it, both inside the figure.
            axes_box = ax.get_window_extent()
            assert all(b.x0 >= 0 and b.x1 <= axes_box.x0 for b in y_labels)
            assert all(axes_box.x1 <= b.x0 and b.x1 <= fig.bbox.x1 for b in values)
        renderer = fig.canvas.get_renderer()
        assert not _overlapping([ax.get_tightbbox(renderer) for ax in fig.axes])  # titles and axis labels included
        assert fig.axes[1].get_title(loc="left").startswith("Recorded GPU runs, not this machine")
    finally:
        plt.close(fig)


def test_runs_from_any_directory(tmp_path, monkeypatch):
    # `python -m bench` needs the checkout root on sys.path; `python <checkout>/bench` works anywhere.
    done = subprocess.run(
        [sys.executable, str(REPO / "bench"), "--list"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(c.name in done.stdout for c in CASES)
    # Outputs default to <checkout>/bench/out, whichever directory the run starts from.
    monkeypatch.chdir(tmp_path)
    assert default_out_dir().parent == REPO / "bench" / "out"


def test_benchmark_suite_runs_at_tiny_size():
    pytest.importorskip("pytest_benchmark")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "bench",
            "-q",
            "--bench-size",
            "tiny",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(CASES)} passed" in done.stdout


@pytest.mark.parametrize("variant", ["ours", "plain"])
def test_train_step_profile_names_where_the_time_goes(variant, device):
    from bench.cases.train_step import training_step
    from bench.train_step_report import profile_markdown, step_profile

    result = step_profile(training_step(variant, device, batch=2, filters=4, dense_units=8), device, steps=2, top=200)
    assert 0 < result["host_ms"] <= result["wall_ms"]
    names = {e["name"] for e in result["top"]}
    if device == "cuda":
        # Kernels by device time: ours runs the Triton conv kernel, the plain twin never does.
        assert result["kernel_ms"] > 0
        assert any("_conv2d_kernel" in name for name in names) == (variant == "ours")
    else:
        # Torch ops by self time: 6 convolutions a step. Ours runs them as the binary conv ops (on
        # float x, or on the sign words a training forward packed), the plain twin as aten's.
        conv_ops = ("bnnops::binary_conv2d", "bnnops::binary_conv2d_packed")
        calls = {e["name"]: e["calls"] for e in result["top"]}
        assert sum(calls.get(name, 0) for name in conv_ops) == (6 if variant == "ours" else 0)
        if variant == "plain":
            assert calls["aten::convolution"] == 6
    table = profile_markdown({variant: result})
    assert f"{variant}: host" in table and "| calls / step |" in table


@pytest.mark.parametrize("variant", ["ours", "plain"])
def test_train_step_compiled_matches_eager(monkeypatch, variant, device):
    # The GPU report compiles with inductor; aot_eager traces the same graphs (forward and backward)
    # in seconds on a CPU.
    import functools

    from bench.cases.train_step import training_step

    torch.manual_seed(0)  # the models' initial weights
    eager = training_step(variant, device, batch=2, filters=4, dense_units=8)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    torch.manual_seed(0)
    compiled = training_step(variant, device, batch=2, filters=4, dense_units=8, compile=True)
    for _ in range(2):  # the second step runs on the weights the first one changed
        torch.testing.assert_close(compiled(), eager(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["ours", "plain"])
def test_train_step_channels_last_matches_nchw(variant, device):
    # The GPU report's channels_last rows: the same steps (losses within the convolutions'
    # summation order) with every activation channels-last.
    from bench.cases.train_step import training_step

    torch.manual_seed(0)
    nchw = training_step(variant, device, batch=2, filters=4, dense_units=8)
    torch.manual_seed(0)
    channels_last = training_step(variant, device, batch=2, filters=4, dense_units=8, channels_last=True)
    formats = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: (
            formats.append(out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())
            if out.dim() == 4 and out.shape[1] > 1
            else None
        )
    )
    try:
        for _ in range(2):
            torch.testing.assert_close(channels_last(), nchw(), rtol=1e-4, atol=1e-5)
    finally:
        hook.remove()
    # The 4-D activations of both steps: channels_last in one, NCHW in the other.
    assert formats.count(True) == formats.count(False) > 0


def test_gpu_step_report_tables(monkeypatch):
    """The report's rows, ratios and failure lines, with the GPU parts stubbed (this runs anywhere)."""
    from bench import machine, train_step_report

    calls = []

    def fake_training_step(variant, device, batch, compile=False, channels_last=False):
        calls.append((variant, compile, channels_last))
        if variant == "plain" and compile:
            raise RuntimeError("compile failed")
        return lambda: None

    def fake_measure(step, steps, warmup):
        return 0.004, 3 * 2**20  # 4 ms a step, 3 MiB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(machine, "describe", lambda device: {"device_name": "stub GPU"})
    monkeypatch.setattr(train_step_report, "training_step", fake_training_step)
    monkeypatch.setattr(train_step_report, "_measure", fake_measure)
    monkeypatch.setattr(
        train_step_report,
        "step_profile",
        lambda step, device: {
            "steps": 3,
            "host_ms": 1.0,
            "wall_ms": 4.0,
            "kernel_ms": 3.5,
            "top": [{"name": "k", "ms": 1.0, "calls": 2}],
        },
    )
    seen = []
    result, table = train_step_report.gpu_step_report(
        batch=8,
        compile=True,
        profile=True,
        channels_last=True,
        progress=lambda result, table: seen.append(len(result["rows"])),
    )
    assert seen == [1, 2, 3, 4, 5, 6]  # the caller can write the file after every row
    assert calls == [
        ("ours", False, False),
        ("plain", False, False),
        ("ours", False, True),
        ("plain", False, True),
        ("ours", True, False),
        ("plain", True, False),
    ]
    assert list(result["rows"]) == [
        "ours",
        "plain",
        "ours channels_last",
        "plain channels_last",
        "ours compiled",
        "plain compiled",
    ]
    assert result["speedup_channels_last"] == pytest.approx(1.0)
    assert "| ours / plain channels_last | 1.00x | 1.00x |" in table
    assert "| bnnops + Bop (bf16 activations), channels_last | 2000 | 3 MiB |" in table
    assert "wall 4.00 ms, kernels 3.50 ms per step" in table and "| `k` | 1.000 | 2 |" in table
    assert result["rows"]["ours"]["images_per_s"] == pytest.approx(2000)
    assert result["speedup"] == pytest.approx(1.0) and "speedup_compiled" not in result
    assert "| ours / plain | 1.00x | 1.00x |" in table
    assert "FAILED | RuntimeError: compile failed" in table


def test_inference_float_twin_computes_the_converted_model():
    from bench.cases.inference import build_variants

    # ste_sign BinaryNet: integer sums, exact in fp32 in both torch's convolutions and the bnnops
    # references, so the float twin and the folded model give the converted model's bits.
    variants = build_variants("binarynet", "cpu", width=0.1, size=12)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        want = variants["converted"](x)
        for variant in ("float", "folded"):
            assert torch.equal(variants[variant](x), want), variant


def test_inference_activation_bytes_count_each_layer_output():
    from bench.cases.inference import activation_bytes_per_image, build_variants
    from bnnops.nn import BinaryConv2d, BinaryLinear

    variants = build_variants("binarynet", "cpu", width=0.1, size=12)
    x = torch.randn(2, 3, 12, 12)
    counts = {v: activation_bytes_per_image(m, x) for v, m in variants.items()}
    # The float twin writes what the converted model writes plus the sign of every binary layer's
    # input (fp32), which the bnnops ops binarize inside.
    binarized = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: binarized.append(args[0].numel() * 4))
        for m in variants["converted"].modules()
        if isinstance(m, (BinaryConv2d, BinaryLinear)) and m.input_quantizer is not None
    ]
    with torch.no_grad():
        variants["converted"](x)
    for h in hooks:
        h.remove()
    assert len(binarized) == 8
    assert counts["float"] - counts["converted"] == sum(binarized) / 2
    assert counts["folded"] < counts["converted"] / 12


def test_inference_report_runs(monkeypatch, capsys):
    from bench.cases import inference

    monkeypatch.setattr(sys, "argv", ["inference", "--device", "cpu", "--model", "binarynet", "--batch", "2"])
    monkeypatch.setattr(inference, "FULL", {"binarynet": dict(input_shape=(3, 12, 12))})
    monkeypatch.setattr(inference, "plan_for", lambda device, quick: timing.Plan(rounds=1, round_s=0.0))
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--width", "0.0625"])
    inference.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| binarynet | 2 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["float", "converted", "folded"]


def test_gpu_step_report_cuda_graph_rows(monkeypatch):
    """With cuda_graphs the report adds a CUDA-graph row per variant, built with cuda_graph=True."""
    from bench import machine, train_step_report

    calls = []

    def fake_training_step(variant, device, batch, compile=False, channels_last=False, cuda_graph=False):
        calls.append((variant, cuda_graph))
        return lambda: None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(machine, "describe", lambda device: {"device_name": "stub GPU"})
    monkeypatch.setattr(train_step_report, "training_step", fake_training_step)
    monkeypatch.setattr(train_step_report, "_measure", lambda step, steps, warmup: (0.004, 2**20))
    result, table = train_step_report.gpu_step_report(batch=8, cuda_graphs=True)
    assert calls == [("ours", False), ("plain", False), ("ours", True), ("plain", True)]
    assert list(result["rows"]) == ["ours", "plain", "ours CUDA graph", "plain CUDA graph"]
    assert "one CUDA graph per step" in table and "ours / plain CUDA graph" in table


def test_train_step_cuda_graph_variants_not_applicable_on_cpu(capsys):
    from bench.cases.train_step import binarynet_train_step, training_step

    with pytest.raises(ValueError, match="not applicable on cpu"):
        training_step("ours", "cpu", 2, 4, 8, cuda_graph=True)
    with pytest.raises(ValueError, match="reduce-overhead"):
        training_step("plain", "cuda", 2, 4, 8, compile=True, cuda_graph=True)
    workload = binarynet_train_step("cpu", batch=2, filters=4, dense_units=8)
    assert list(workload.baselines) == ["plain ste_sign + Adam"]
    assert "CUDA-graph variants (ours and plain) are not applicable on cpu" in capsys.readouterr().err
