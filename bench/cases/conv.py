"""Cases of the binary conv2d kernel (kernels/conv2d.py): ``bnnops::binary_conv2d``, W1A1.

ResNet-18's 3x3 stride-1 convolutions at batch 64 and 256, zero padding 1: our op binarizes the bf16
channels-last input and reads the packed weight; the baseline is cuDNN (``F.conv2d``) in bf16,
channels_last, on the same +-1 values (already binarized: the sign pass a latent-weight BNN would
run before it is not timed). Each layer does 2*N*H*W*O*C*9 operations (59.2 G at batch 256 for all
four) and moves at least x and y once in bf16 plus the packed weight. Both are timed eagerly, as a
user calls them: at batch 64 the op's GPU time (~20-40 us) is below its host time (op
dispatch plus two Triton launches, ~100 us or more), which the sweep below measures on its own.

Run as a script (GPU only) for the sweep that decides what is still open, in about 40 s::

    python -m bench.cases.conv            # host time per call; ResNet-18 layers at batch 256: configs, passes, cuDNN
    python -m bench.cases.conv --quick    # the same on layers 1 and 4 only

It compiles its ~10 kernel variants in parallel worker processes first (Triton's disk cache then
serves the timing process), so compile time does not dominate.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import time

import torch
import torch.nn.functional as F

from bench import Workload, case
from bnnops.packing import pack_weight

LAYERS = {
    "layer1 56x56x64": (56, 64),
    "layer2 28x28x128": (28, 128),
    "layer3 14x14x256": (14, 256),
    "layer4 7x7x512": (7, 512),
}
CUDA_SHAPES = {
    f"{name} b{batch}": dict(N=batch, HW=hw, C=c, dtype=torch.bfloat16)
    for batch in (256, 64)
    for name, (hw, c) in LAYERS.items()
}
CPU_SHAPES = {"8x8x32 b8 fp32": dict(N=8, HW=8, C=32, dtype=torch.float32)}
TINY = dict(N=1, HW=5, C=33, dtype=torch.float32)


def _inputs(device, N, HW, C, dtype):
    x = torch.randn(N, C, HW, HW, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dense = torch.randn(C, C, 3, 3, device=device)
    return x, dense


@case(
    "binary_conv2d", cuda=CUDA_SHAPES, cpu=CPU_SHAPES, tiny=TINY, quick=["layer1 56x56x64 b256", "layer4 7x7x512 b256"]
)
def binary_conv2d(device, N, HW, C, dtype):
    x, dense = _inputs(device, N, HW, C, dtype)
    words = pack_weight(dense)
    signs_x = torch.where(x < 0, -1.0, 1.0).to(dtype).contiguous(memory_format=torch.channels_last)
    signs_w = torch.where(dense < 0, -1.0, 1.0).to(dtype).contiguous(memory_format=torch.channels_last)
    return Workload(
        ours=lambda: torch.ops.bnnops.binary_conv2d(x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True),
        # On CPU F.conv2d is not cuDNN and the CPU shape is fp32: name what runs.
        baselines={
            ("cudnn bf16 channels_last" if device == "cuda" else "F.conv2d channels_last"): lambda: F.conv2d(
                signs_x, signs_w, None, 1, 1
            )
        },
        bound="int8",
        bytes=2 * x.numel() * dtype.itemsize + words.numel() * 4,
        ops=2 * N * HW * HW * C * C * 9,
    )


# Configs worth timing per layer besides pick_config's: the neighbours of each picked tile.
ALTERNATIVES = {
    "layer1 56x56x64": [(128, 64, 64, 4, 4), (256, 64, 32, 8, 4)],
    "layer2 28x28x128": [(128, 128, 128, 8, 3), (256, 128, 64, 8, 4)],
    "layer3 14x14x256": [(256, 128, 128, 8, 3), (128, 128, 128, 8, 3)],
    "layer4 7x7x512": [(128, 128, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4)],
}
SWEEP_BATCH = 256


# The host-time problem: small enough that the GPU keeps up with the host.
HOST_PROBLEM = ("host", 1, 8, 64)


def _sweep_items(layers):
    """(label, batch, hw, channels, route, config) to compile and time; config None is pick_config's."""
    items = [(*HOST_PROBLEM, "fp8", None)]
    for name in layers:
        hw, c = LAYERS[name]
        items += [(name, SWEEP_BATCH, hw, c, route, None) for route in ("fp8", "int8")]
        items += [(name, SWEEP_BATCH, hw, c, "fp8", config) for config in ALTERNATIVES[name]]
    return items


def _launcher(label, batch, hw, c, route, config):
    """A zero-argument call of the conv2d launcher on one layer, and the layer's tensors."""
    from bnnops import kernels

    conv = kernels.load("conv2d")
    x, dense = _inputs("cuda", batch, hw, c, torch.bfloat16)
    words = pack_weight(dense)
    return (lambda: conv.conv2d(x, words, padding=(1, 1, 1, 1), route=route, config=config)), x, dense, words


def _compile(item):
    # In a worker process: one call on the same shapes (so the same specialization) compiles the
    # variants (prepare pass and conv kernel) into Triton's disk cache.
    _launcher(*item)[0]()
    torch.cuda.synchronize()


def _host_us(fn, calls=300):
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


def sweep(quick):
    """Print what decides the open questions of the conv kernel (see the module docstring)."""
    from triton.testing import do_bench

    from bnnops import kernels

    conv = kernels.load("conv2d")
    layers = ["layer1 56x56x64", "layer4 7x7x512"] if quick else list(LAYERS)
    items = _sweep_items(layers)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(8, os.cpu_count() or 1), mp_context=context) as pool:
        list(pool.map(_compile, items))
    print(f"compiled {len(items)} variants in {time.perf_counter() - start:.1f} s")

    # 1. Host time per call (the first GPU run found ~400 us per op call at batch 64).
    _, x, dense, words = _launcher(*HOST_PROBLEM, "fp8", None)
    signs_w = torch.where(dense < 0, -1.0, 1.0).to(x.dtype).contiguous(memory_format=torch.channels_last)
    host = {
        "F.conv2d (cuDNN)": lambda: F.conv2d(x, signs_w, None, 1, 1),
        "torch.ops.bnnops.binary_conv2d": lambda: torch.ops.bnnops.binary_conv2d(
            x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True
        ),
        "kernels conv2d (launcher)": lambda: conv.conv2d(x, words, padding=(1, 1, 1, 1)),
        "kernels prepare (1 launch)": lambda: conv.prepare(x, words, torch.float8_e4m3fn, True, (1, 1, 1, 1)),
    }
    for label, fn in host.items():
        print(f"host time per call  {label:36} {_host_us(fn):8.1f} us")

    # 2. GPU time per layer at batch 256 (L2 flushed before every call).
    def bench(fn):
        return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3

    print(f"{'layer b' + str(SWEEP_BATCH):18} {'what':46} {'us':>8} {'TOPS':>6}")
    for name in layers:
        hw, c = LAYERS[name]
        ops = 2 * SWEEP_BATCH * hw * hw * c * c * 9
        fn, x, dense, words = _launcher(name, SWEEP_BATCH, hw, c, "fp8", None)
        signs_x = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
        signs_w = torch.where(dense < 0, -1.0, 1.0).to(x.dtype).contiguous(memory_format=torch.channels_last)
        rows = {
            "cudnn bf16 channels_last": lambda: F.conv2d(signs_x, signs_w, None, 1, 1),
            "the op (torch.ops.bnnops.binary_conv2d)": lambda: torch.ops.bnnops.binary_conv2d(
                x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True
            ),
            "prepare pass alone": lambda: conv.prepare(x, words, torch.float8_e4m3fn, True, (1, 1, 1, 1)),
        }
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        picked = conv.pick_config(SWEEP_BATCH * hw * hw, c, c, conv.A_FP8, sms)
        for layer, _, _, _, route, config in items:
            if layer == name:
                # The launcher runs the prepare pass too: the kernel alone is the difference.
                call = lambda route=route, config=config: conv.conv2d(
                    x, words, padding=(1, 1, 1, 1), route=route, config=config
                )
                rows[f"launcher {route} {config or 'picked ' + str(picked)}"] = call
        for label, f in rows.items():
            us = bench(f)
            rate = f"{ops / us / 1e6:6.0f}" if "prepare" not in label else ""
            print(f"{name:18} {label:46} {us:8.1f} {rate}")
        # fp8 accumulation must be exact (FP8_EXACT_K): the same integers as the int8 route.
        same = torch.equal(fn(), conv.conv2d(x, words, padding=(1, 1, 1, 1), route="int8"))
        print(f"{name:18} fp8 == int8 (exact sums at K = {9 * c}): {same}")
    print(f"sweep done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="What decides the binary conv2d kernel's open questions (GPU).")
    parser.add_argument("--quick", action="store_true", help="layers 1 and 4 only")
    sweep(parser.parse_args().quick)
