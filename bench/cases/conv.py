"""Cases of the binary conv2d kernel (kernels/conv2d.py): ``bnnops::binary_conv2d``, A1W1.

ResNet-18's 3x3 stride-1 convolutions at batch 64 and 256, zero padding 1: our op binarizes the bf16
channels-last input and reads the packed weight; the baseline is cuDNN (``F.conv2d``) in bf16,
channels_last, on the same +-1 values (already binarized: the sign pass a latent-weight BNN would
run before it is not timed). Each layer does 2*N*H*W*O*C*9 operations (59.2 G at batch 256 for all
four) and moves at least x and y once in bf16 plus the packed weight.

Run as a script for the config and operand-route sweep of the kernel (GPU only, prints a table)::

    python -m bench.cases.conv            # 4 routes x every config, four layers at batch 256 (~20 compiles)
    python -m bench.cases.conv --quick    # fp8 and int8 A routes x every config, layers 1 and 4 (~10 compiles)
"""

import argparse

import torch
import torch.nn.functional as F

from bench import Workload, case
from bnnops.packing import pack_weight

LAYERS = {"layer1 56x56x64": (56, 64), "layer2 28x28x128": (28, 128), "layer3 14x14x256": (14, 256),
          "layer4 7x7x512": (7, 512)}
CUDA_SHAPES = {
    f"{name} b{batch}": dict(N=batch, HW=hw, C=c, dtype=torch.bfloat16)
    for batch in (256, 64) for name, (hw, c) in LAYERS.items()
}
CPU_SHAPES = {"8x8x32 b8 fp32": dict(N=8, HW=8, C=32, dtype=torch.float32)}
TINY = dict(N=1, HW=5, C=33, dtype=torch.float32)


def _inputs(device, N, HW, C, dtype):
    x = torch.randn(N, C, HW, HW, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dense = torch.randn(C, C, 3, 3, device=device)
    return x, dense


@case("binary_conv2d", cuda=CUDA_SHAPES, cpu=CPU_SHAPES, tiny=TINY,
      quick=["layer1 56x56x64 b256", "layer4 7x7x512 b256"])
def binary_conv2d(device, N, HW, C, dtype):
    x, dense = _inputs(device, N, HW, C, dtype)
    words = pack_weight(dense)
    signs_x = torch.where(x < 0, -1.0, 1.0).to(dtype).contiguous(memory_format=torch.channels_last)
    signs_w = torch.where(dense < 0, -1.0, 1.0).to(dtype).contiguous(memory_format=torch.channels_last)
    return Workload(
        ours=lambda: torch.ops.bnnops.binary_conv2d(x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True),
        baselines={"cudnn bf16 channels_last": lambda: F.conv2d(signs_x, signs_w, None, 1, 1)},
        bound="int8",
        bytes=2 * x.numel() * dtype.itemsize + words.numel() * 4,
        ops=2 * N * HW * HW * C * C * 9,
    )


def sweep(quick):
    """Time every (a_route, b_route, config) of the launcher on ResNet-18 layers at batch 256."""
    import triton

    from bnnops import kernels

    conv = kernels.load("conv2d")
    routes = [("fp8", "unpacked"), ("int8", "unpacked")]
    if not quick:
        routes += [("fp8", "bits"), ("sign", "unpacked")]
    layers = ["layer1 56x56x64", "layer4 7x7x512"] if quick else list(LAYERS)
    print(f"{'layer':18} {'a_route':7} {'b_route':8} {'config (BM, BN, BK, warps, stages)':36} {'us':>8} {'TOPS':>7}")
    for name in layers:
        hw, c = LAYERS[name]
        x, dense = _inputs("cuda", 256, hw, c, torch.bfloat16)
        words = pack_weight(dense)
        ops = 2 * 256 * hw * hw * c * c * 9
        signs_x = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
        signs_w = torch.where(dense < 0, -1.0, 1.0).to(x.dtype).contiguous(memory_format=torch.channels_last)
        ms = triton.testing.do_bench(lambda: F.conv2d(signs_x, signs_w, None, 1, 1), return_mode="median")
        print(f"{name:18} {'cudnn bf16 channels_last':54} {ms * 1e3:8.1f} {ops / ms / 1e9:7.0f}")
        ms = triton.testing.do_bench(lambda: conv.conv2d(x, words, padding=(1, 1, 1, 1)), return_mode="median")
        print(f"{name:18} {'fp8':7} {'unpacked':8} {'autotuned (the op)':36} {ms * 1e3:8.1f} {ops / ms / 1e9:7.0f}")
        ms = triton.testing.do_bench(lambda: conv._sign_nhwc(x, torch.float8_e4m3fn), return_mode="median")
        print(f"{name:18} {'(the sign pre-pass alone)':54} {ms * 1e3:8.1f}")
        for a_route, b_route in routes:
            for config in conv.GPU_CONFIGS:
                if config[1] > max(64, triton.next_power_of_2(c)):
                    continue  # what the autotuner's prune drops
                fn = lambda: conv.conv2d(x, words, padding=(1, 1, 1, 1), a_route=a_route, b_route=b_route,  # noqa: E731
                                         config=config)
                ms = triton.testing.do_bench(fn, return_mode="median")
                print(f"{name:18} {a_route:7} {b_route:8} {str(config):36} {ms * 1e3:8.1f} {ops / ms / 1e9:7.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Config and operand-route sweep of the binary conv2d kernel (GPU).")
    parser.add_argument("--quick", action="store_true", help="the default route's configs on two layers only")
    sweep(parser.parse_args().quick)
