"""``bnnops.summary(model, input_shape)``: parameters, memory and multiply-accumulates of a BNN.

What larq's ``larq.models.summary`` reports, for PyTorch models built from bnnops layers:
per layer the parameter count by precision, the memory its weights take as stored, the binary
and real multiply-accumulates (MACs) of one sample of ``input_shape``, and totals with the
compression against float32.

Counting rules (larq's, stated here so the numbers can be checked by hand):

- A weight is *binary* when it is a packed :class:`bnnops.BinaryTensor`, or the float latent
  weight of a layer with a ``weight_quantizer`` (binarized in every forward). Every other
  parameter, and every floating-point buffer (batch norm's running mean and variance, which a
  deployed model also stores), is *real*. Integer buffers (``num_batches_tracked``) are not
  weights and are not counted. A batch norm without a scale (the paper's Keras ``scale=False``,
  here a frozen weight of ones) still stores that weight and it is counted: 4 values per channel
  (weight, bias, running mean, running variance) where larq counts 2, the batch norm's shift
  folded into its moving mean (BinaryNet: 15,400 real values here, 7,700 in larq's summary).
- Memory as stored: a binary weight takes its packed int32 words, ``4 * prod(words shape)``
  bytes (one bit per weight, the reduction dimension padded to a multiple of 32, see
  :mod:`bnnops.packing`), also for a latent weight, which deploys packed. larq counts one bit per
  weight without padding, so a layer with few input channels differs most (BinaryNet's first
  conv, 3 input channels: 4,608 B here, 432 B in larq's count). A real tensor takes
  ``numel * element_size`` bytes of its own dtype. The float32 equivalent is 4 bytes for
  every counted value; ``compression`` is float32 bytes / memory.
- MACs: a convolution or linear layer does ``weight.numel() * output_positions`` MACs per
  sample (output positions: ``out.numel() / out_channels``, 1 for a linear layer on a vector;
  for a grouped conv ``weight.numel()`` already holds ``in_channels / groups``). They are binary
  when both the weight is binary and the layer binarizes its input (``input_quantizer`` set),
  otherwise real: a MAC's precision is the larger of its operands' (larq's rule), so a first
  layer with a binary weight and a real input does real MACs. Other layers (batch norm,
  pooling, additions) are counted as no MACs.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnnops.binary_tensor import BinaryTensor
from bnnops.packing import packed_weight_shape

__all__ = ["LayerSummary", "ModelSummary", "is_binary_weight", "summary"]

_MAC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerSummary:
    """One layer's row. Counts are per sample of the summary's input shape."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    input_binary: bool
    binary_params: int
    real_params: int
    memory_bytes: int
    binary_macs: int
    real_macs: int

    @property
    def params(self) -> int:
        return self.binary_params + self.real_params


@dataclass
class ModelSummary:
    """Per-layer rows and totals; ``str()`` is the printed table, ``to_dict()`` plain data."""

    input_shape: tuple[int, ...]
    layers: list[LayerSummary] = field(default_factory=list)

    def _total(self, attr: str) -> int:
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def binary_params(self) -> int:
        return self._total("binary_params")

    @property
    def real_params(self) -> int:
        return self._total("real_params")

    @property
    def params(self) -> int:
        return self.binary_params + self.real_params

    @property
    def memory_bytes(self) -> int:
        return self._total("memory_bytes")

    @property
    def float32_bytes(self) -> int:
        """Memory if every counted value were float32."""
        return 4 * self.params

    @property
    def compression(self) -> float:
        """float32 bytes / stored bytes."""
        return self.float32_bytes / self.memory_bytes if self.memory_bytes else 1.0

    @property
    def binary_macs(self) -> int:
        return self._total("binary_macs")

    @property
    def real_macs(self) -> int:
        return self._total("real_macs")

    @property
    def binary_mac_ratio(self) -> float:
        """Fraction of the MACs that are binary (XNOR-popcount); 0 for a model without MACs."""
        macs = self.binary_macs + self.real_macs
        return self.binary_macs / macs if macs else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``input_shape``, ``layers`` (one dict per :class:`LayerSummary`), ``totals``."""
        totals = {
            name: getattr(self, name)
            for name in (
                "binary_params",
                "real_params",
                "params",
                "memory_bytes",
                "float32_bytes",
                "compression",
                "binary_macs",
                "real_macs",
                "binary_mac_ratio",
            )
        }
        return {
            "input_shape": list(self.input_shape),
            "layers": [asdict(layer) for layer in self.layers],
            "totals": totals,
        }

    def __str__(self) -> str:
        header = [
            "layer",
            "kind",
            "input",
            "output",
            "binary params",
            "real params",
            "memory (B)",
            "binary MACs",
            "real MACs",
        ]
        rows = [
            [
                layer.name,
                layer.kind,
                "1-bit" if layer.input_binary else "-",
                "x".join(map(str, layer.output_shape)),
                f"{layer.binary_params:,}",
                f"{layer.real_params:,}",
                f"{layer.memory_bytes:,}",
                f"{layer.binary_macs:,}",
                f"{layer.real_macs:,}",
            ]
            for layer in self.layers
        ]
        rows.append(
            [
                "total",
                "",
                "",
                "",
                f"{self.binary_params:,}",
                f"{self.real_params:,}",
                f"{self.memory_bytes:,}",
                f"{self.binary_macs:,}",
                f"{self.real_macs:,}",
            ]
        )
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

        def line(row: list[str]) -> str:
            return "  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        out = [line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), ""]
        out.append(
            f"input shape {tuple(self.input_shape)}; params: {self.params:,} "
            f"({self.binary_params:,} binary, {self.real_params:,} real)"
        )
        out.append(
            f"memory as stored: {_human(self.memory_bytes)}; as float32: {_human(self.float32_bytes)}; "
            f"compression {self.compression:.2f}x"
        )
        out.append(f"MACs per sample: {self.binary_macs + self.real_macs:,} ({self.binary_mac_ratio:.2%} binary)")
        return "\n".join(out)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def is_binary_weight(module: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Whether ``module``'s parameter ``name`` (the tensor ``tensor``) is a binary weight: a packed
    BinaryTensor, or the latent ``weight`` of a layer with a ``weight_quantizer``."""
    if isinstance(tensor, BinaryTensor):
        return True
    return name == "weight" and getattr(module, "weight_quantizer", None) is not None


def _layer_row(name: str, module: nn.Module, output: Any) -> LayerSummary:
    binary_params = real_params = memory = 0
    weight_binary = False
    for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if not p.is_floating_point():
            continue
        if is_binary_weight(module, pname, p):
            binary_params += p.numel()
            memory += 4 * math.prod(packed_weight_shape(p.shape))
            weight_binary = weight_binary or pname == "weight"
        else:
            real_params += p.numel()
            memory += p.numel() * p.element_size()
    input_binary = getattr(module, "input_quantizer", None) is not None
    binary_macs = real_macs = 0
    weight = getattr(module, "weight", None)
    is_mac_layer = isinstance(module, _MAC_LAYERS) or hasattr(module, "input_quantizer")
    if is_mac_layer and isinstance(weight, torch.Tensor) and isinstance(output, torch.Tensor):
        # Output positions = out.numel() / out_channels, and out_channels = weight.shape[0] for
        # both a linear weight (out, in) and a conv weight (out, in / groups, *kernel).
        macs = weight.numel() * (output.numel() // weight.shape[0])
        if weight_binary and input_binary:
            binary_macs = macs
        else:
            real_macs = macs
    shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
    return LayerSummary(
        name, type(module).__name__, shape, input_binary, binary_params, real_params, memory, binary_macs, real_macs
    )


@torch.no_grad()
def summary(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    print_table: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ModelSummary:
    """Profile ``model`` on one sample of ``input_shape`` and return a :class:`ModelSummary`.

    Args:
        model: an ``nn.Module`` (bnnops layers, torch layers, any nesting).
        input_shape: shape of one sample without the batch dimension, e.g. (3, 32, 32); by
            default ``model.input_shape``, which the models of :mod:`bnnops.models` carry.
        print_table: print the table (``str(result)``) as well as returning it.
        device, dtype: of the probe input; default the device of the model's first parameter.

    One row per module that holds parameters or buffers itself or has no children, in the
    order they run in a forward pass of a random batch of one (in eval mode, so batch norm
    statistics are untouched; the model's mode is restored). Modules that never run are
    appended after. The counting rules are in this module's docstring.
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                "summary needs the shape of one input sample (without the batch dimension), e.g. "
                "summary(model, (3, 32, 32)): the MACs depend on it and this model has no input_shape attribute"
            )
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    outputs, order = {}, []
    modules = {m: n for n, m in model.named_modules()}
    counted = [
        m
        for m in modules
        if not list(m.children())
        or any(True for _ in m.parameters(recurse=False))
        or any(True for _ in m.buffers(recurse=False))
    ]

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if module not in outputs:
            order.append(module)
        outputs[module] = output

    hooks = [m.register_forward_hook(record) for m in counted]
    was_training = model.training
    try:
        model.eval()
        model(torch.randn(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    order += [m for m in counted if m not in outputs]
    result = ModelSummary(
        tuple(input_shape), [_layer_row(modules[m] or type(m).__name__, m, outputs.get(m)) for m in order]
    )
    if print_table:
        print(result)
    return result
