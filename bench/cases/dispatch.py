"""Host cost of a call, on tiny inputs where host time is all there is.

- ``op_dispatch``: each ``torch.ops.bnnops`` op against a direct call of the implementation the
  dispatcher picks for that device (the reference on CPU, the Triton launcher on CUDA): the
  difference is what the op layer (``bnnops.ops``: dispatcher, input checks) adds.
- ``layer_overhead``: a layer's forward against its op, called directly: the difference is the
  layer's Python (argument checks, quantizer lookup, the autograd function when training).
"""

from collections.abc import Callable

import torch

from bench import Workload, case
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.ops.reference import binary_conv2d_reference, w1a16_reference
from bnnops.packing import pack_signs, pack_weight


def _direct(device: str, reference: Callable, launcher: Callable) -> Callable:
    return launcher if torch.device(device).type == "cuda" else reference


@case(
    "op_dispatch",
    cuda={"w1a16 4x64x64": dict(op="w1a16"), "conv2d 1x32x8x8": dict(op="conv2d")},
    cpu={"w1a16 4x64x64": dict(op="w1a16"), "conv2d 1x32x8x8": dict(op="conv2d")},
    tiny=dict(op="conv2d"),
    quick=["w1a16 4x64x64", "conv2d 1x32x8x8"],
)
def op_dispatch(device: str, op: str) -> Workload:
    """``op`` ("w1a16" or "conv2d") through ``torch.ops.bnnops`` against its implementation called directly."""
    if op == "w1a16":
        x, words = torch.randn(4, 64, device=device), pack_signs(torch.randn(64, 64, device=device))
        args = (x, words, None, None)
        call, direct = (
            torch.ops.bnnops.binary_linear_w1a16,
            _direct(device, w1a16_reference, CUDA_IMPLEMENTATIONS["binary_linear_w1a16"]),
        )
        nbytes = x.numel() * 4 + words.numel() * 4 + 4 * 64 * 4
    else:
        x, words = torch.randn(1, 32, 8, 8, device=device), pack_weight(torch.randn(32, 32, 3, 3, device=device))
        args = (x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True)
        call, direct = (
            torch.ops.bnnops.binary_conv2d,
            _direct(device, binary_conv2d_reference, CUDA_IMPLEMENTATIONS["binary_conv2d"]),
        )
        nbytes = 2 * x.numel() * 4 + words.numel() * 4
    return Workload(
        ours=lambda: call(*args),
        baselines={"implementation, called directly": lambda: direct(*args)},
        bound="memory",
        bytes=nbytes,
    )


_LAYER_SHAPES = {
    "BinaryLinear 4x64x64 inference": dict(layer="linear", training=False),
    "BinaryLinear 4x64x64 training forward": dict(layer="linear", training=True),
    "BinaryConv2d 1x32x8x8 inference": dict(layer="conv2d", training=False),
    "BinaryConv2d 1x32x8x8 training forward": dict(layer="conv2d", training=True),
}


@case("layer_overhead", cuda=_LAYER_SHAPES, cpu=_LAYER_SHAPES, tiny=dict(layer="conv2d", training=True))
def layer_overhead(device: str, layer: str, training: bool) -> Workload:
    """``layer``'s ("linear" or "conv2d") forward on a tiny input against the op it runs, called directly."""
    if layer == "linear":
        module = BinaryLinear(64, 64, device=device)
        x = torch.randn(4, 64, device=device, requires_grad=training)
        args = (x.detach(), module.weight.words, 64, None, module.bias, torch.float32)
        op = torch.ops.bnnops.binary_linear_w1a1
    else:
        module = BinaryConv2d(32, 32, 3, padding=1, device=device)
        x = torch.randn(1, 32, 8, 8, device=device, requires_grad=training)
        args = (x.detach(), module.weight.words, module.bias, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True)
        op = torch.ops.bnnops.binary_conv2d
    # Inference: both under no_grad. Training: x requires grad, the op gets it detached (as the
    # layer's autograd function passes it).
    with_grad = torch.enable_grad if training else torch.no_grad

    def call_layer():
        with with_grad():
            return module(x)

    def call_op():
        with torch.no_grad():
            return op(*args)

    return Workload(
        ours=call_layer,
        baselines={"its op, called directly": call_op},
        bound="memory",
        bytes=2 * x.numel() * 4 + module.weight.words.numel() * 4,
    )
