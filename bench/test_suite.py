"""pytest-benchmark suite over the one case registry: one benchmark per case and shape.

    python -m pytest bench/ --benchmark-json=bench/out/suite.json      # then --benchmark-compare
    python -m pytest bench/ --bench-size quick -k gemm

pytest-benchmark times our callable (on a GPU each round ends with a device synchronize, so a
round is a wall-clock time of a finished call). ``extra_info`` holds the row of ``python -m bench``
for the same case: CUDA-event medians of ours and of every baseline, speedups, the achieved rate
and its fraction of the ceiling measured in this session. Under ``--benchmark-disable`` each body
runs once (what tests/test_bench.py does at ``--bench-size tiny``).
"""

import pytest

from bench import load_cases, machine, runner
from bench.registry import Item, plan
from bench.timing import synchronize


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``item`` with the planned (case, label, params) of --bench-device and --bench-size."""
    if "item" in metafunc.fixturenames:
        cases, errors = load_cases()
        if errors:
            raise RuntimeError("bench/cases modules failed to import:\n" + "\n".join(text for _, text in errors))
        items = plan(
            cases,
            metafunc.config.getoption("--bench-device") or machine.default_device(),
            metafunc.config.getoption("--bench-size"),
        )
        metafunc.parametrize("item", items, ids=[f"{c.name}[{label}]" for c, label, _ in items])


def test_case(benchmark, item: Item, device: str, ceilings: dict) -> None:
    case, label, params = item
    prepared = runner.Prepared(case, label, params, device)
    benchmark.group = f"{case.name} {label}"
    ours = prepared.fns["ours"]
    if benchmark.disabled:
        for fn in prepared.fns.values():
            fn()
        benchmark(ours)
        return
    benchmark.extra_info.update(runner.measure(prepared, quick=False, ceilings=ceilings))

    def finished_call():
        ours()
        synchronize(device)

    benchmark.pedantic(finished_call, rounds=20, warmup_rounds=3)
