"""Cases of the packing kernels (``bnnops.kernels.pack``): ``bnnops::pack_signs`` and ``bnnops::unpack_signs``.

Both are memory-bound: the fewest bytes are the float tensor once plus its words once (1/32 of the
elements at 4 bytes per word). The baseline is the pure-PyTorch reference a user would otherwise
run (``bnnops.packing.pack_signs_reference`` / ``unpack_signs_reference``), eager on the same tensor.
"""

import torch

from bench import Workload, case
from bnnops.packing import pack_signs_reference, packed_length, unpack_signs_reference

CUDA_SHAPES = {
    # A 64M-element weight or activation matrix: 128 MB of bf16 in, 8 MB of words out.
    "8192x8192 bf16": dict(M=8192, K=8192, dtype=torch.bfloat16),
    "8192x8192 fp32": dict(M=8192, K=8192, dtype=torch.float32),
    # ResNet-18 stage-1 activations in channels-last at batch 256 (256*56*56 rows of 64 channels):
    # two words per row, where the flat word tiling matters.
    "802816x64 bf16": dict(M=802816, K=64, dtype=torch.bfloat16),
    # K not a multiple of 32: the last word of every row is partial.
    "16384x4097 fp16": dict(M=16384, K=4097, dtype=torch.float16),
}
CPU_SHAPES = {
    "1024x1024 fp32": dict(M=1024, K=1024, dtype=torch.float32),
    "16384x64 bf16": dict(M=16384, K=64, dtype=torch.bfloat16),
}
TINY = dict(M=3, K=33, dtype=torch.float32)


def _bytes(M: int, K: int, dtype: torch.dtype) -> int:
    return M * K * dtype.itemsize + M * packed_length(K) * 4


@case("pack_signs", cuda=CUDA_SHAPES, cpu=CPU_SHAPES, tiny=TINY)
def pack_signs(device: str, M: int, K: int, dtype: torch.dtype) -> Workload:
    x = torch.randn(M, K, device=device, dtype=dtype)
    return Workload(
        ours=lambda: torch.ops.bnnops.pack_signs(x),
        baselines={"torch eager": lambda: pack_signs_reference(x)},
        bound="memory",
        bytes=_bytes(M, K, dtype),
    )


@case("unpack_signs", cuda=CUDA_SHAPES, cpu=CPU_SHAPES, tiny=TINY)
def unpack_signs(device: str, M: int, K: int, dtype: torch.dtype) -> Workload:
    # Random words, garbage in the padding bits included (unpacking must ignore them).
    words = torch.randint(-(2**31), 2**31 - 1, (M, packed_length(K)), device=device, dtype=torch.int32)
    return Workload(
        ours=lambda: torch.ops.bnnops.unpack_signs(words, K, dtype),
        baselines={"torch eager": lambda: unpack_signs_reference(words, K, dtype)},
        bound="memory",
        bytes=_bytes(M, K, dtype),
    )
