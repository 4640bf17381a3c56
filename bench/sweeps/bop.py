"""Host cost and block-config sweep of the fused Bop step (GPU only, ~40 s).

    python -m bench.sweeps.bop            # the CUDA models of bench/cases/bop.py but 1.07B
    python -m bench.sweeps.bop --quick    # 10.5M and 105M only; host cost at 10 and 25 tensors

First the host cost of one step at 1, 10, 25 and 100 tensors of 64x64: ``Bop.step()`` with the
gradients kept (``zero_grad(set_to_none=False)``) and with new gradient tensors each step (assigned
before the timed call, as a backward would), the same step with its launches through Triton's JIT
instead of the compiled kernel's own launcher (what that launcher saves), and torch's
``Adam(foreach=True)`` and ``Adam(fused=True)`` over as many dense tensors. Then per model: the host
cost of ``Bop.step()``, and the GPU time of one step for each config of
``bnnops.kernels.bop_configs.SWEEP_CONFIGS`` (through ``FusedBop``, the launcher the optimizer
uses), with the achieved bandwidth (12.25 bytes per weight, see bench/cases/bop.py).

Host: wall time of the call (it launches and returns; nothing syncs), median of 200 (50 per
model), after a sync each. GPU: CUDA events around the call while the GPU is busy with
``torch.cuda._sleep``, so the host work is hidden and the events see only the device work, L2
flushed first; median of 20.
"""

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bench.cases.bop import CUDA_SHAPES
from bnnops import BinaryTensor, kernels
from bnnops.optim import Bop


def _binary_model(device, shapes):
    params = [nn.Parameter(BinaryTensor.from_float(torch.randn(s, device=device))) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device) * 1e-3
    return params


def _launcher_step(fused, params, ms):
    rows = [0] * len(params)
    return lambda: fused.step([p.grad for p in params], [p.words for p in params], ms, [1e-4], [1e-8], hyper_rows=rows)


def _gpu_us(step: Callable[[], object], flush: torch.Tensor) -> float:
    times = []
    for _ in range(20):
        flush.zero_()
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time while the host queues the step
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _host_us(step: Callable[[], object], calls: int = 50, prepare: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(calls):
        if prepare is not None:
            prepare()
        torch.cuda.synchronize()
        before = time.perf_counter()
        step()
        times.append((time.perf_counter() - before) * 1e6)
    return statistics.median(times)


def _through_jit(launch, addresses, hyper, flips, flips_next) -> None:
    """A ``FusedBop.launcher`` that launches through Triton's JIT (argument binding every call)."""
    kernels.load("bop")._bop_kernel[launch.grid](
        launch.table, addresses, hyper, launch.n_rows, flips, flips_next, **launch.constants, **launch.options
    )


def host_cost(counts: Sequence[int]) -> None:
    """Print the host time of one optimizer step at each number of 64x64 tensors."""
    for n in counts:
        rows = {}
        params = _binary_model("cuda", [(64, 64)] * n)
        opt = Bop(params)
        opt.step()
        rows["Bop.step(), gradients kept"] = _host_us(opt.step, 200)
        fresh = [[torch.randn(p.shape, device="cuda") for p in params] for _ in range(4)]
        turn = iter(range(10**9))

        def new_gradients(params=params, fresh=fresh, turn=turn):
            for p, g in zip(params, fresh[next(turn) % len(fresh)]):
                p.grad = g

        rows["Bop.step(), new gradient tensors"] = _host_us(opt.step, 200, prepare=new_gradients)
        for stepper in opt._steppers.values():  # the optimizer's launch planners
            stepper.launcher = _through_jit
        rows["Bop.step(), launches through the JIT"] = _host_us(opt.step, 200)
        for how in ("foreach", "fused"):
            dense = [nn.Parameter(torch.randn(64, 64, device="cuda")) for _ in range(n)]
            for p in dense:
                p.grad = torch.randn_like(p)
            adam = torch.optim.Adam(dense, **{how: True})
            adam.step()
            rows[f"torch Adam({how}=True)"] = _host_us(adam.step, 200)
        for what, us in rows.items():
            print(f"{f'host cost, {n} tensors':32} {what:38} {us:8.1f}")
        del params, opt, fresh


def _describe(config) -> str:
    return f"{config.kwargs['BLOCK_WORDS']} words, {config.num_warps} warps"


def sweep(quick: bool) -> None:
    """Print the host cost of a step by tensor count, then per model the host cost of ``Bop.step()``
    and the GPU time of each block config."""
    plan = kernels.load("bop_plan")
    configs = kernels.load("bop_configs")
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    labels = list(CUDA_SHAPES)[:2] if quick else [label for label in CUDA_SHAPES if not label.startswith("1.07B")]
    print(f"{'model':32} {'what':38} {'us':>8} {'TB/s':>6}")
    host_cost((10, 25) if quick else (1, 10, 25, 100))
    for label in labels:
        shapes = CUDA_SHAPES[label]["shapes"]
        params = _binary_model("cuda", shapes)
        nbytes = 12 * sum(math.prod(s) for s in shapes) + 8 * sum(p.words.numel() for p in params)
        opt = Bop(params)
        opt.step()  # builds the tables, compiles
        print(f"{label:32} {f'host: Bop.step(), {len(shapes)} tensors':34} {_host_us(opt.step):8.1f}")
        ms = [opt.state[p]["m"] for p in params]
        for config in configs.SWEEP_CONFIGS:
            step = _launcher_step(plan.FusedBop(config), params, ms)
            step()
            us = _gpu_us(step, flush)
            default = " (default)" if _describe(config) == _describe(configs.DEFAULT_CONFIG) else ""
            print(f"{label:32} {f'GPU: {_describe(config)}{default}':34} {us:8.1f} {nbytes / us / 1e6:6.2f}")
        del params, opt, ms


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m bench.sweeps.bop [--quick]``."""
    parser = argparse.ArgumentParser(description="Host cost and block-config sweep of the fused Bop step (GPU).")
    parser.add_argument("--quick", action="store_true", help="10.5M and 105M only")
    sweep(parser.parse_args(argv).quick)


if __name__ == "__main__":
    main()
