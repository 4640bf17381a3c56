"""Memory case: what one BinaryNet training step keeps, ours against the plain-PyTorch twin.

Ours: ``bnnops.models.binarynet`` (packed weights; binary layers keep 2 bits per input element
for backward, :mod:`bnnops.layer_common`; max pools keep one uint8 per output,
:mod:`bnnops.pooling`). Plain: the same net from ``nn.Conv2d`` / ``nn.Linear`` / ``nn.MaxPool2d``
with float latent weights and ``ste_sign`` on input and weight, built as
:func:`bench.cases.train_step.plain_pytorch_copy` builds it, its pools then swapped for torch's
(:func:`with_torch_max_pools`).

Two measures, not timings (the table of ``python -m bench`` has no column for them, so this module
registers no timed case):

- :func:`saved_bytes_table`: bytes kept for backward, per sample and fixed, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on a real forward (:func:`bnnops.memory.memory_report`):
  the binary layers alone, the max pools alone and the whole model, ours and plain. Runs on any device.
- :func:`peak_memory`: ``torch.cuda.max_memory_allocated`` over a training step
  (:func:`bench.cases.train_step.training_step`: forward, loss, backward, optimizer step) of each
  variant, each in a fresh peak window after one warm-up step. CUDA only.

``python -m bench.cases.memory [--batch B] [--filters F] [--dense-units D]`` prints both (the
peak only on a GPU).
"""

import argparse
import gc
from typing import Any

import torch
from torch import nn

from bench.cases.train_step import plain_pytorch_copy, training_step
from bnnops import models
from bnnops.memory import memory_report
from bnnops.nn import MaxPool2d

__all__ = ["peak_memory", "saved_bytes_table", "with_torch_max_pools"]

BINARY_KINDS = ("BinaryConv2d", "BinaryLinear", "SteConv2d", "SteLinear")


def with_torch_max_pools(model: nn.Module) -> nn.Module:
    """``model`` with each :class:`bnnops.nn.MaxPool2d` swapped, in place, for a
    ``torch.nn.MaxPool2d`` of the same arguments (the same output and gradient, torch's saved tensors)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MaxPool2d):
            twin = nn.MaxPool2d(
                module.kernel_size, module.stride, module.padding, module.dilation, False, module.ceil_mode
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, twin)
    return model


def saved_bytes_table(
    batch: int = 4, filters: int = 128, dense_units: int = 1024, device: str = "cpu"
) -> dict[str, Any]:
    """Bytes kept for backward by BinaryNet, ours and plain, float32 activations on ``device``.

    Returns {variant: {"binary_layers_per_sample", "max_pools_per_sample", "per_sample", "fixed"}}
    for "ours" and "plain", and "ratio_binary_layers_per_sample" / "ratio_max_pools_per_sample" /
    "ratio_per_sample" (ours over plain).
    """
    torch.manual_seed(0)
    ours = models.binarynet(filters=filters, dense_units=dense_units).to(device)
    plain = with_torch_max_pools(plain_pytorch_copy(ours))
    result: dict[str, Any] = {}
    for variant, model in (("ours", ours), ("plain", plain)):
        report = memory_report(model, batch=batch)
        result[variant] = {
            "binary_layers_per_sample": sum(layer.per_sample for layer in report.layers if layer.kind in BINARY_KINDS),
            "max_pools_per_sample": sum(layer.per_sample for layer in report.layers if layer.kind == "MaxPool2d"),
            "per_sample": report.saved_bytes_per_sample,
            "fixed": report.saved_bytes_fixed,
        }
    for key in ("binary_layers_per_sample", "max_pools_per_sample", "per_sample"):
        result[f"ratio_{key}"] = result["ours"][key] / result["plain"][key]
    return result


def peak_memory(batch: int = 256, filters: int = 128, dense_units: int = 1024) -> dict[str, int]:
    """Peak CUDA memory (bytes, ``torch.cuda.max_memory_allocated``) of one training step of each
    variant ("ours", "plain"), each measured alone after one warm-up step.

    Raises:
        RuntimeError: CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("peak_memory measures torch.cuda.max_memory_allocated: it needs a CUDA device")
    peaks = {}
    for variant in ("ours", "plain"):
        gc.collect()
        torch.cuda.empty_cache()
        step = training_step(variant, "cuda", batch, filters, dense_units)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks[variant] = torch.cuda.max_memory_allocated()
        del step
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--filters", type=int, default=128)
    parser.add_argument("--dense-units", type=int, default=1024)
    args = parser.parse_args()
    table = saved_bytes_table(4, args.filters, args.dense_units)
    for variant in ("ours", "plain"):
        row = table[variant]
        print(
            f"{variant:<6} saved for backward: {row['per_sample']:,} B/sample "
            f"(binary layers {row['binary_layers_per_sample']:,}, max pools {row['max_pools_per_sample']:,}), "
            f"fixed {row['fixed']:,} B"
        )
    print(
        f"ours / plain: binary layers {table['ratio_binary_layers_per_sample']:.4f}, "
        f"max pools {table['ratio_max_pools_per_sample']:.4f}, whole model {table['ratio_per_sample']:.4f}"
    )
    if torch.cuda.is_available():
        peaks = peak_memory(args.batch, args.filters, args.dense_units)
        print(f"peak memory of a training step, batch {args.batch} ({torch.cuda.get_device_name()}):")
        for variant, peak in peaks.items():
            print(f"{variant:<6} {peak / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
