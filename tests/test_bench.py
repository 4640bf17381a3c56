"""The benchmarks cannot rot: every registered case runs once at tiny size, and the main job
(``python -m bench --quick``) and the pytest-benchmark suite run end to end. No timing is asserted:
speed lives in the benchmarks themselves.
"""

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import Workload, case, load_cases, registry, report, runner
from bench.__main__ import main as bench_main
from bench.timing import median_seconds

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


def test_cpu_timer_takes_the_median_of_several_calls():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), "cpu", quick=True)
    assert seconds > 0 and len(calls) >= 1 + 3  # a warm-up call, then at least 3 timed


def test_main_job_quick_end_to_end(tmp_path, capsys):
    # `python -m bench` is `sys.exit(main())`; in-process saves a second torch import.
    out = tmp_path / "run"
    status = bench_main(["--quick", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.out + printed.err
    assert report.CPU_NOTE in printed.out and "speedup" in printed.out
    document = json.loads((out / "results.json").read_text())
    assert document["meta"]["mode"] == "cpu-reference"
    assert set(document["ceilings"]) == set(registry.BOUNDS)
    rows = document["results"]
    assert {r["case"] for r in rows} == {c.name for c in CASES}
    assert all(r["ours_s"] > 0 and r["rate"] > 0 for r in rows), rows
    assert (out / "table.md").read_text().count("\n|") >= len(rows)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --record turns the run into the README markdown beside a copy of the JSON.
    assert bench_main(["--record", str(out / "results.json"), "--results-dir", str(tmp_path / "results")]) == 0
    recorded = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(recorded) == 2 and recorded[0].endswith("_cpu-reference.json") and recorded[1].endswith(".md")
    text = (tmp_path / "results" / recorded[1]).read_text()
    assert report.CPU_NOTE in text and all(f"| {r['case']} |" in text for r in rows)


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
        # Torch ops by self time: ours runs the binary conv op (6 convolutions a step), the plain twin cuDNN's.
        conv = next(
            e
            for e in result["top"]
            if e["name"] == ("bnnops::binary_conv2d" if variant == "ours" else "aten::convolution")
        )
        assert conv["calls"] == 6
        assert ("bnnops::binary_conv2d" in names) == (variant == "ours")
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
