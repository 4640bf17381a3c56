"""Host cost of an op call: each ``torch.ops.bnnops`` op on a tiny input, against a direct call of
the implementation the dispatcher picks for that device (the reference on CPU, the Triton launcher
on CUDA). At these sizes both are bound by host time, so the difference is what the op layer
(``bnnops/library.py``: dispatcher, input checks) adds to every call of a layer.
"""

import torch

from bench import Workload, case
from bnnops import conv, linear
from bnnops.packing import pack_signs, pack_weight


def _direct(device, reference, launcher):
    return launcher if torch.device(device).type == "cuda" else reference


@case("op_dispatch", cuda={"w1a16 4x64x64": dict(op="w1a16"), "conv2d 1x32x8x8": dict(op="conv2d")},
      cpu={"w1a16 4x64x64": dict(op="w1a16"), "conv2d 1x32x8x8": dict(op="conv2d")},
      tiny=dict(op="conv2d"), quick=["w1a16 4x64x64", "conv2d 1x32x8x8"])
def op_dispatch(device, op):
    if op == "w1a16":
        x, words = torch.randn(4, 64, device=device), pack_signs(torch.randn(64, 64, device=device))
        args = (x, words, None, None)
        call, direct = torch.ops.bnnops.binary_linear_w1a16, _direct(device, linear.w1a16_reference, linear._w1a16_cuda)
        nbytes = x.numel() * 4 + words.numel() * 4 + 4 * 64 * 4
    else:
        x, words = torch.randn(1, 32, 8, 8, device=device), pack_weight(torch.randn(32, 32, 3, 3, device=device))
        args = (x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True)
        call, direct = torch.ops.bnnops.binary_conv2d, _direct(device, conv.binary_conv2d_reference, conv._conv2d_cuda)
        nbytes = 2 * x.numel() * 4 + words.numel() * 4
    return Workload(ours=lambda: call(*args), baselines={"implementation, called directly": lambda: direct(*args)},
                    bound="memory", bytes=nbytes)
