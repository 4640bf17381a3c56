"""Train a BNN's binary weights with Bop and its real-valued parameters with any torch optimizer.

The paper's recipe: Bop for the binary weights, Adam for the rest (batch-norm scales and shifts,
biases, a float first or last layer)::

    binary, real = bnnops.optim.split_parameters(model)
    optimizer = bnnops.optim.BinaryAndReal(bnnops.optim.Bop(binary), torch.optim.Adam(real, lr=1e-2))
    gamma_decay = torch.optim.lr_scheduler.StepLR(optimizer.binary, 100, 0.1)    # one scheduler per part
    adam_decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.real, 500)

``step``, ``zero_grad``, ``state_dict`` / ``load_state_dict`` cover both parts, and
``torch.amp.GradScaler`` works on the pair: it reads every gradient through ``param_groups`` (the
two parts' groups), unscales them, and calls ``step`` only when all are finite.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from bnnops.binary_tensor import BinaryTensor

__all__ = ["BinaryAndReal", "split_parameters"]


def split_parameters(
    params: nn.Module | Iterable[nn.Parameter],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a module's (or an iterable's) trainable parameters into (binary, real) lists.

    Returns:
        (binary, real): binary holds the ``BinaryTensor`` parameters, real every other parameter.
        Parameters with ``requires_grad=False`` are in neither (frozen); a parameter listed twice
        counts once, so every trainable parameter is in exactly one list.
    """
    params = params.parameters() if hasattr(params, "parameters") else params
    binary, real, seen = [], [], set()
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (binary if isinstance(p, BinaryTensor) else real).append(p)
    return binary, real


class BinaryAndReal:
    """One optimizer object made of two: ``binary`` (Bop) and ``real`` (any torch optimizer).

    Args:
        binary: the optimizer of the binary weights, e.g. ``bnnops.optim.Bop(binary_params)``.
        real: the optimizer of the real-valued parameters, e.g. ``torch.optim.Adam(real_params)``.

    Raises:
        TypeError: a part that is not a ``torch.optim.Optimizer``.
        ValueError: a parameter held by both parts, or a ``BinaryTensor`` in ``real`` (its bits
            change only through Bop).

    A parameter held by neither is not trained, as with any torch optimizer;
    :func:`split_parameters` hands every trainable parameter to exactly one part. Schedule each
    part with its own scheduler (``optimizer.binary``, ``optimizer.real``). A step can be captured
    in a CUDA graph when both parts can: ``Bop(..., capturable=True)`` and a torch optimizer with
    ``capturable=True`` (e.g. ``torch.optim.Adam(real_params, capturable=True)``).
    """

    def __init__(self, binary: Optimizer, real: Optimizer) -> None:
        for name, part in (("binary", binary), ("real", real)):
            if not isinstance(part, Optimizer):
                raise TypeError(
                    f"BinaryAndReal's {name} part must be a torch.optim.Optimizer, got {type(part).__name__}"
                )
        held = {id(p) for group in binary.param_groups for p in group["params"]}
        for group in real.param_groups:
            for p in group["params"]:
                if id(p) in held:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is claimed by both the binary and the real optimizer"
                    )
                if isinstance(p, BinaryTensor):
                    raise ValueError(
                        f"the real optimizer holds a BinaryTensor parameter of shape {tuple(p.shape)}: its bits change "
                        "only through Bop; give it to the binary optimizer (see split_parameters)"
                    )
        self.binary = binary
        self.real = real

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The binary part's param groups followed by the real part's (read by GradScaler)."""
        return self.binary.param_groups + self.real.param_groups

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step both parts; the closure, if given, is evaluated once and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.binary.step()
        self.real.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of both parts."""
        self.binary.zero_grad(set_to_none)
        self.real.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{"binary": ..., "real": ...}``: the two parts' state_dicts."""
        return {"binary": self.binary.state_dict(), "real": self.real.state_dict()}

    def load_state_dict(self, state_dict: dict[str, dict[str, Any]]) -> None:
        """Load what :meth:`state_dict` returned into both parts."""
        self.binary.load_state_dict(state_dict["binary"])
        self.real.load_state_dict(state_dict["real"])
