"""Inference case: BinaryNet and Bi-Real Net-18, a float model against converted and folded bnnops models.

Three variants of one trained-like model (latent weights, batch norms with random eval statistics),
each in eval mode under ``torch.no_grad``:

- ``float``: what a user deploys without bnnops: the same network from ``nn.Conv2d`` / ``nn.Linear``
  with the dense +-1 weights (times the layer's scale) and a sign before every binary layer's input
  (:func:`float_twin`); bf16 and channels_last on a GPU (cuDNN), fp32 on the CPU.
- ``converted``: :func:`bnnops.convert` of the latent model (packed weights, the bnnops ops).
- ``folded``: :func:`bnnops.fold_for_inference` of the converted model (batch norm and sign as
  thresholds, packed sign words between binary layers). Ours, in the table of ``python -m bench``.

BinaryNet's latent weights use ste_sign; Bi-Real Net-18's magnitude_aware_sign (larq-zoo's choice),
so its binary layers carry a scale. The case times one forward per call; ``python -m
bench.cases.inference`` also prints images/s, latency, memory and the activation bytes each variant
writes per image (:func:`activation_bytes_per_image`).
"""

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import bnnops
from bench import Workload, case
from bench.timing import interleaved_rounds, plan_for
from bnnops import models
from bnnops.activation_bytes import activation_bytes_written
from bnnops.folding import fold_for_inference
from bnnops.nn import BinaryConv2d, BinaryLinear

__all__ = ["activation_bytes_per_image", "build_variants", "float_twin", "main"]

VARIANTS = ("float", "converted", "folded")

# Model settings per name: the builder's keyword arguments (widths, input) at full size.
FULL = {
    "binarynet": dict(input_shape=(3, 32, 32)),
    "birealnet18": dict(input_shape=(3, 224, 224)),
}
CUDA_SHAPES = {
    f"{name} b{batch}": dict(model=name, batch=batch, width=1.0, size=FULL[name]["input_shape"][1])
    for name in FULL
    for batch in (256, 1)
}
# The CPU runs the references: an eighth of the widths (Bi-Real Net also at 64x64) keeps a call
# well under the CPU table's 0.2 s; the first shape (run by ``--quick``) is the smallest.
CPU_SHAPES = {
    f"{name} width/8{' 64px' if name == 'birealnet18' else ''} b{batch}": dict(
        model=name, batch=batch, width=0.125, size=64 if name == "birealnet18" else 32
    )
    for name in FULL
    for batch in (1, 4)
}
TINY = dict(model="binarynet", batch=2, width=0.0625, size=12)


def sign(x: torch.Tensor) -> torch.Tensor:
    """-1 where x < 0, else +1, in x's dtype (bnnops' binarization)."""
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


class Sign(nn.Module):
    """:func:`sign` as a module: the float twin's input binarization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign(x)


def _dense_twin(layer: nn.Module) -> nn.Module:
    """nn.Conv2d / nn.Linear computing a packed bnnops ``layer`` (W1A16 part: its weight, scale, bias),
    preceded by :class:`Sign` when the layer binarizes its input."""
    weight = layer.weight.dequantize()
    scale = getattr(layer, "scale", None)
    if scale is not None:
        weight = weight * scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1))
    if isinstance(layer, BinaryLinear):
        dense = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    else:
        if layer.pad_value != 0:
            raise ValueError(f"nn.Conv2d pads with zeros only; this layer pads with {layer.pad_value}")
        dense = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            device="meta",
        )
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return nn.Sequential(Sign(), dense) if layer.input_quantizer is not None else dense


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of a converted ``model`` in which every packed bnnops layer is its float twin
    (:func:`_dense_twin`): the same eval output, on torch's own convolutions and matmuls."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (BinaryConv2d, BinaryLinear)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _dense_twin(module))
    return model


def _latent_model(name: str, width: float, size: int) -> nn.Module:
    """Model ``name`` with latent weights at ``width`` times its channels, on size x size images, its
    batch norms holding random eval statistics (so no threshold is trivial)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "binarynet":
        model = models.binarynet(
            input_shape=(3, size, size),
            filters=max(1, round(128 * width)),
            dense_units=max(1, round(1024 * width)),
            weight_quantizer="ste_sign",
        )
    elif name == "birealnet18":
        model = models.birealnet18(
            input_shape=(3, size, size), filters=max(1, round(64 * width)), weight_quantizer="magnitude_aware_sign"
        )
    else:
        raise ValueError(f"model must be one of {list(FULL)}, got {name!r}")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.bias.normal_(generator=gen)
    return model.eval()


def build_variants(
    name: str, device: str, width: float = 1.0, size: int | None = None, dtype: torch.dtype | None = None
) -> dict[str, nn.Module]:
    """{variant: eval model} for ``name`` ("binarynet" or "birealnet18"), each on ``device`` in
    ``dtype`` (bf16 on CUDA, fp32 on the CPU by default), channels_last on CUDA."""
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    size = size or FULL[name]["input_shape"][1]
    latent = _latent_model(name, width, size).to(device=device, dtype=dtype, memory_format=fmt)
    converted = bnnops.convert(latent, inplace=True)
    return {
        "float": float_twin(converted),
        "converted": converted,
        "folded": fold_for_inference(converted),
    }


def activation_bytes_per_image(model: nn.Module, x: torch.Tensor) -> float:
    """Bytes of activations ``model`` writes per image of ``x``: the outputs each leaf module hands to
    the next (:func:`bnnops.activation_bytes.activation_bytes_written`), summed, over the batch size.

    Why so: on a GPU each layer's output is written to memory once and read by the next layer; a
    packed layer's output is its int32 words, a view (flatten) writes nothing. Not counted: scratch
    inside one op (the CUDA conv's operand pass writes a padded copy of its input; a CPU reference's
    unpacked operands) and what a compiled graph would fuse away.
    """
    return sum(activation_bytes_written(model, x).values()) / x.shape[0]


def _inputs(device: str, batch: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=gen).to(device, dtype).contiguous(memory_format=fmt)


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return call


@case("inference", cuda=CUDA_SHAPES, cpu=CPU_SHAPES, tiny=TINY, quick=["binarynet b256", "binarynet b1"])
def inference(device: str, model: str, batch: int, width: float, size: int) -> Workload:
    """One forward of the folded model against the float twin and the converted (unfolded) model."""
    variants = build_variants(model, device, width, size)
    x = _inputs(device, batch, size, next(variants["converted"].parameters()).dtype)
    macs = bnnops.summary(variants["converted"], print_table=False)
    float_name = "float bf16 cuDNN" if device == "cuda" else "float fp32"
    return Workload(
        ours=_forward(variants["folded"], x),
        baselines={float_name: _forward(variants["float"], x), "converted": _forward(variants["converted"], x)},
        bound="bf16",
        ops=2 * (macs.binary_macs + macs.real_macs) * batch,
        bytes=x.numel() * x.element_size(),
    )


def measure(name: str, device: str, batch: int, width: float = 1.0, size: int | None = None) -> dict[str, Any]:
    """{variant: {"seconds", "images_per_s", "memory_bytes", "activation_bytes_per_image"}} for model
    ``name`` at ``batch``. memory_bytes: the CUDA peak of one forward above the memory held before it
    (parameters and input), or None on the CPU. Activation bytes are counted on the timed input, in
    its dtype (:func:`activation_bytes_per_image`)."""
    size = size or FULL[name]["input_shape"][1]
    variants = build_variants(name, device, width, size)
    dtype = next(variants["converted"].parameters()).dtype
    x = _inputs(device, batch, size, dtype)
    fns = {v: _forward(m, x) for v, m in variants.items()}
    timings = interleaved_rounds(fns, device, plan_for(device, quick=False))
    result = {}
    for variant, fn in fns.items():
        memory = None
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            memory = torch.cuda.max_memory_allocated() - before
        seconds = timings.spread(variant).median
        result[variant] = {
            "seconds": seconds,
            "images_per_s": batch / seconds,
            "memory_bytes": memory,
            "activation_bytes_per_image": activation_bytes_per_image(variants[variant], x),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=list(FULL), nargs="+", default=list(FULL))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 256 1 (CUDA), 4 1 (CPU)")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (default 1 CUDA, 1/8 CPU)")
    parser.add_argument(
        "--size", type=int, default=None, help="image side (default: the model's; 64 for Bi-Real on CPU)"
    )
    args = parser.parse_args()
    cpu = args.device == "cpu"
    batches = args.batch or ([4, 1] if cpu else [256, 1])
    width = args.width or (0.125 if cpu else 1.0)
    print(f"device: {torch.cuda.get_device_name() if not cpu else 'CPU (the bnnops references)'}, width x{width}")
    print("| model | batch | variant | images/s | latency | memory | activation bytes / image |")
    print("|---|---|---|---|---|---|---|")
    for name in args.model:
        size = args.size or (64 if cpu and name == "birealnet18" else None)
        for batch in batches:
            rows = measure(name, args.device, batch, width, size)
            for variant, row in rows.items():
                memory = "-" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**20:,.1f} MiB"
                print(
                    f"| {name} | {batch} | {variant} | {row['images_per_s']:,.1f} | {row['seconds'] * 1e3:,.2f} ms "
                    f"| {memory} | {row['activation_bytes_per_image']:,.0f} |"
                )


if __name__ == "__main__":
    main()
