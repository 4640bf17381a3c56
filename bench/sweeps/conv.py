"""Host-cost and block-config sweep of the binary conv2d kernel (GPU), in about 40 s:

    python -m bench.sweeps.conv            # host time per call; ResNet-18 layers at batch 256: configs, passes, cuDNN
    python -m bench.sweeps.conv --quick    # the same on layers 1 and 4 only

1. Host time per call of cuDNN, the op, the launcher and the prepare pass alone, on a problem small
   enough that the GPU keeps up with the host.
2. Per ResNet-18 3x3 layer at batch 256 (L2 flushed before every call): cuDNN bf16 channels_last,
   the op, the prepare pass alone, and the launcher (prepare pass + kernel: the kernel alone is the
   difference) with pick_config's config on both routes and with ``conv2d_configs.SWEEP_CONFIGS``;
   then whether the fp8 route's sums equal the int8 route's (FP8_EXACT_K).

The ~10 kernel variants compile in parallel worker processes first (Triton's disk cache then serves
the timing process), so compile time does not dominate. Importing this module needs neither a GPU
nor Triton; :func:`sweep` loads the kernels.
"""

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bench.cases.conv import LAYERS, layer_inputs
from bnnops import kernels
from bnnops.packing import pack_weight

if TYPE_CHECKING:
    import triton

SWEEP_BATCH = 256
# The host-time problem: (label, batch, hw, channels), small enough that the GPU keeps up with the host.
HOST_PROBLEM = ("host", 1, 8, 64)
PADDING = (1, 1, 1, 1)
QUICK_LAYERS = ["layer1 56x56x64", "layer4 7x7x512"]

# (label, batch, hw, channels, route, config): one kernel variant; config None is pick_config's.
Item = tuple[str, int, int, int, str, "triton.Config | None"]


def _describe(config: "triton.Config") -> str:
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def _same(a: "triton.Config", b: "triton.Config") -> bool:
    return (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)


def _op(x: torch.Tensor, words: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The public op on a layer, as the benchmark case calls it."""
    return lambda: torch.ops.bnnops.binary_conv2d(x, words, None, None, [1, 1], list(PADDING), [1, 1], 1, 0.0, True)


def _picked(hw: int, c: int) -> "triton.Config":
    """pick_config's choice for a layer at SWEEP_BATCH on this GPU."""
    configs = kernels.load("conv2d_configs")
    props = torch.cuda.get_device_properties(0)
    return configs.pick_config(
        SWEEP_BATCH * hw * hw, c, c, True, props.multi_processor_count, 2, props.major * 10 + props.minor
    )


def _items(layers: Sequence[str]) -> list[Item]:
    """The kernel variants to compile and time: the host problem, then per layer both routes with
    the picked config and fp8 with each sweep config that differs from it."""
    configs = kernels.load("conv2d_configs")
    items: list[Item] = [(*HOST_PROBLEM, "fp8", None)]
    for name in layers:
        hw, c = LAYERS[name]
        picked = _picked(hw, c)
        items += [(name, SWEEP_BATCH, hw, c, route, None) for route in ("fp8", "int8")]
        items += [
            (name, SWEEP_BATCH, hw, c, "fp8", config)
            for config in configs.SWEEP_CONFIGS[c]
            if not _same(config, picked)
        ]
    return items


def _launcher(item: Item) -> tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A zero-argument call of the conv2d launcher on one variant, and its (x, dense weight, words)."""
    _, batch, hw, c, route, config = item
    conv = kernels.load("conv2d")
    x, dense = layer_inputs("cuda", batch, hw, c, torch.bfloat16)
    words = pack_weight(dense)
    call = functools.partial(conv.conv2d, x, words, padding=PADDING, route=route, config=config)
    return call, x, dense, words


def _compile(item: Item) -> None:
    # In a worker process: one call on the same shapes (so the same specialization) compiles the
    # variant (prepare pass and conv kernel) into Triton's disk cache.
    _launcher(item)[0]()
    torch.cuda.synchronize()


def _host_us(fn: Callable[[], object], calls: int = 300) -> float:
    """Host time of one call: calls are queued without waiting for the GPU, on a problem whose GPU
    time per call is below the host's, so the wall time per call is what the host spends."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host * 1e6


def _gpu_us(fn: Callable[[], object]) -> float:
    """Median time of one call with L2 flushed before it (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def _host_rows() -> dict[str, Callable[[], object]]:
    conv = kernels.load("conv2d")
    prepare = kernels.load("conv2d_prepare").prepare
    call, x, dense, words = _launcher((*HOST_PROBLEM, "fp8", None))
    signs_w = torch.where(dense < 0, -1.0, 1.0).to(x.dtype).contiguous(memory_format=torch.channels_last)
    fp8 = conv.DOT_DTYPES[conv.A_FP8]
    return {
        "F.conv2d (cuDNN)": lambda: F.conv2d(x, signs_w, None, 1, 1),
        "torch.ops.bnnops.binary_conv2d": _op(x, words),
        "kernels conv2d (launcher)": call,
        "kernels prepare (1 launch)": lambda: prepare(x, words, fp8, True, PADDING),
    }


def _layer_rows(name: str, items: Sequence[Item]) -> tuple[dict[str, Callable[[], object]], Callable[[], bool]]:
    """The timed rows of one layer at SWEEP_BATCH, all on the same tensors, and the check that the
    fp8 route's sums equal the int8 route's (FP8_EXACT_K)."""
    conv = kernels.load("conv2d")
    prepare = kernels.load("conv2d_prepare").prepare
    hw, c = LAYERS[name]
    _, x, dense, words = _launcher((name, SWEEP_BATCH, hw, c, "fp8", None))
    signs_x = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    signs_w = torch.where(dense < 0, -1.0, 1.0).to(x.dtype).contiguous(memory_format=torch.channels_last)
    fp8 = conv.DOT_DTYPES[conv.A_FP8]
    rows: dict[str, Callable[[], object]] = {
        "cudnn bf16 channels_last": lambda: F.conv2d(signs_x, signs_w, None, 1, 1),
        "the op (torch.ops.bnnops.binary_conv2d)": _op(x, words),
        "prepare pass alone": lambda: prepare(x, words, fp8, True, PADDING),
    }
    picked = _picked(hw, c)
    for layer, _, _, _, route, config in items:
        if layer == name:
            what = f"picked {_describe(picked)}" if config is None else _describe(config)
            label = f"launcher {route} {what}"
            rows[label] = functools.partial(conv.conv2d, x, words, padding=PADDING, route=route, config=config)
    return rows, lambda: torch.equal(
        conv.conv2d(x, words, padding=PADDING, route="fp8"), conv.conv2d(x, words, padding=PADDING, route="int8")
    )


def sweep(quick: bool) -> None:
    """Print the host time per call, then per layer the GPU time of each row (module docstring)."""
    layers = QUICK_LAYERS if quick else list(LAYERS)
    items = _items(layers)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(8, os.cpu_count() or 1), mp_context=context) as pool:
        list(pool.map(_compile, items))
    print(f"compiled {len(items)} variants in {time.perf_counter() - start:.1f} s")

    for label, fn in _host_rows().items():
        print(f"host time per call  {label:36} {_host_us(fn):8.1f} us")

    print(f"{'layer b' + str(SWEEP_BATCH):18} {'what':46} {'us':>8} {'TOPS':>6}")
    for name in layers:
        hw, c = LAYERS[name]
        ops = 2 * SWEEP_BATCH * hw * hw * c * c * 9
        rows, fp8_is_exact = _layer_rows(name, items)
        for label, fn in rows.items():
            us = _gpu_us(fn)
            rate = f"{ops / us / 1e6:6.0f}" if "prepare" not in label else ""
            print(f"{name:18} {label:46} {us:8.1f} {rate}")
        print(f"{name:18} fp8 == int8 (exact sums at K = {9 * c}): {fp8_is_exact()}")
    print(f"sweep done in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m bench.sweeps.conv [--quick]``."""
    parser = argparse.ArgumentParser(description="Host cost and block-config sweep of the binary conv2d kernel (GPU).")
    parser.add_argument("--quick", action="store_true", help="layers 1 and 4 only")
    sweep(parser.parse_args(argv).quick)


if __name__ == "__main__":
    main()
