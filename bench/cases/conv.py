"""Cases of the binary conv2d kernel (``bnnops.kernels.conv2d``): ``bnnops::binary_conv2d``, W1A1.

ResNet-18's 3x3 stride-1 convolutions at batch 64 and 256, zero padding 1: our op binarizes the bf16
channels-last input and reads the packed weight; the baseline is cuDNN (``F.conv2d``) in bf16,
channels_last, on the same +-1 values (already binarized: the sign pass a latent-weight BNN would
run before it is not timed). Each layer does 2*N*H*W*O*C*9 operations (59.2 G at batch 256 for all
four) and moves at least x and y once in bf16 plus the packed weight. Both are timed eagerly, as a
user calls them: at batch 64 the op's GPU time (~20-40 us) is below its host time (op dispatch plus
two Triton launches, ~100 us or more). ``python -m bench.sweeps.conv`` measures the host time on its
own and times the kernel's block configs per layer.
"""

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


def layer_inputs(device: str, N: int, HW: int, C: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input x (N, C, HW, HW), channels_last, and a dense float weight (C, C, 3, 3)."""
    x = torch.randn(N, C, HW, HW, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dense = torch.randn(C, C, 3, 3, device=device)
    return x, dense


@case(
    "binary_conv2d", cuda=CUDA_SHAPES, cpu=CPU_SHAPES, tiny=TINY, quick=["layer1 56x56x64 b256", "layer4 7x7x512 b256"]
)
def binary_conv2d(device: str, N: int, HW: int, C: int, dtype: torch.dtype) -> Workload:
    x, dense = layer_inputs(device, N, HW, C, dtype)
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
