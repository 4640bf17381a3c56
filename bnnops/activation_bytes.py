"""``activation_bytes_written(model, x)``: the bytes of activations a forward writes, counted.

Counted on a real forward: every leaf module's (a module without children) output tensors, each
by ``numel * element_size``, unless it shares storage with one of that module's inputs (a view:
flatten, reshape, ``nn.Identity``), which writes nothing. What a module's implementation writes
internally (a kernel's scratch, the CPU reference's unpacked operands) is not counted: the count is
what one layer hands to the next, the traffic a fused GPU kernel pays. Works on any device (CPU
included), so it compares a model with its folded copy (:func:`bnnops.fold_for_inference`) without
a GPU.
"""

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = ["activation_bytes_written"]


def _storages(values) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_leaves(values) if isinstance(t, torch.Tensor)}


@torch.no_grad()
def activation_bytes_written(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes of output written by each leaf module of ``model`` on input ``x`` (module docstring),
    by qualified name, in call order; a module called twice counts twice. Sum the values for the
    total; divide by ``x.shape[0]`` for bytes per image."""
    written: dict[str, int] = {}
    handles = []

    def hook(name):
        def count(module, args, output):
            inputs = _storages(args)
            total = sum(
                t.numel() * t.element_size()
                for t in tree_leaves(output)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
            )
            written[name] = written.get(name, 0) + total

        return count

    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return written
