"""The per-parameter state of Bop and Bop2ndOrder: its rules, fresh state, and state from a checkpoint.

State of a parameter p (``optimizer.state[p]``):

- ``"m"``, and ``"v"`` for Bop2ndOrder: of p's logical shape, in the group's ``state_dtype``
  (one of :data:`STATE_DTYPES`), on p's device; for a ``BinaryTensor`` of rank >= 2 in the packed
  layout's element order (``m.movedim(1, -1)`` contiguous), so the kernel streams it like the
  words, else contiguous. Finite, and v >= 0 (a moving average of g * g from 0).
- ``"flips"``: 0-d int64 on p's device.

A parameter has all of these entries or none (none until its first step): :func:`fresh_state`
builds the whole dict before the optimizer stores it, so an exception while allocating (out of
memory, Ctrl-C) leaves no parameter with m but without v, which would step by the first-order rule.
"""

import math
from collections.abc import Callable
from typing import Any

import torch

from bnnops.binary_tensor import BinaryTensor

__all__ = ["HYPERPARAMETERS", "STATE_DTYPES", "checked_state_dict", "fresh_state", "new_state", "state_from_checkpoint"]

STATE_DTYPES = (torch.float32, torch.bfloat16)
# The param-group keys of the hyperparameters (sigma: Bop2ndOrder only).
HYPERPARAMETERS = ("lr", "threshold", "sigma")


def new_state(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of p's logical shape in ``dtype`` on p's device, in the layout above."""
    if isinstance(p, BinaryTensor) and p.dim() > 1:
        return torch.zeros(p.shape[0], *p.shape[2:], p.shape[1], dtype=dtype, device=p.device).movedim(-1, 1)
    if isinstance(p, BinaryTensor):
        return torch.zeros(p.shape, dtype=dtype, device=p.device)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)


def fresh_state(p: torch.Tensor, dtype: torch.dtype, second_order: bool) -> dict[str, torch.Tensor]:
    """The state of p's first step, whole: zero m (and v) in ``dtype``, zero flips."""
    state = {"m": new_state(p, dtype)}
    if second_order:
        state["v"] = new_state(p, dtype)
    state["flips"] = torch.zeros((), dtype=torch.int64, device=p.device)
    return state


def state_from_checkpoint(
    entry: Any, p: torch.Tensor, where: str, dtype: torch.dtype, second_order: bool
) -> dict[str, torch.Tensor]:
    """Check a checkpoint's state entry for parameter p; return it as new tensors in p's layout.

    Args:
        entry: ``state_dict["state"][id]`` (an empty dict: no state yet).
        p: the parameter it loads into.
        where: how errors name the parameter, e.g. ``"param_groups[0]['params'][3]"``.
        dtype: the group's ``state_dtype``.
        second_order: whether the entry must hold v (Bop2ndOrder), or must not.

    Returns:
        The entries of the module docstring: m (and v) copied onto p's device in ``dtype`` and
        p's layout (a float32 m saved for a bfloat16 group rounds to nearest-even), flips as 0-d
        int64 (0 when the entry has none); an empty dict for an empty entry.

    Raises:
        ValueError: an entry that is not a dict, lacks m (or v), holds a key Bop does not keep, or
            whose m or v is not a floating-point tensor of exactly p's shape (no broadcasting),
            is not finite, or (v) is negative; flips that are not one integer >= 0.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"the state of {where} must be a dict, got {type(entry).__name__}")
    if not entry:
        return {}
    keys = ("m", "v") if second_order else ("m",)
    unknown = set(entry) - {*keys, "flips"}
    if unknown:
        raise ValueError(
            f"the state of {where} holds {sorted(map(str, unknown))}, which {_name(second_order)} does not keep "
            f"(it keeps {', '.join(keys)} and flips)"
        )
    state = {}
    for key in keys:
        x = entry.get(key)
        if x is None:
            raise ValueError(
                f"the state of {where} has no {key!r}: a {_name(second_order)} state has {', '.join(keys)}"
            )
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"state {key!r} of {where} must be a floating-point tensor, got {got}")
        if x.shape != p.shape:
            raise ValueError(
                f"state {key!r} of {where} must have the parameter's shape {tuple(p.shape)}, got {tuple(x.shape)}"
            )
        if not (x.abs() < math.inf).all():
            raise ValueError(f"state {key!r} of {where} holds non-finite values")
        if key == "v" and (x < 0).any():
            raise ValueError(f"state 'v' of {where} holds negative values (a mean of squares is >= 0)")
        state[key] = new_state(p, dtype).copy_(x)
    flips = entry.get("flips", 0)
    if isinstance(flips, torch.Tensor):
        if flips.numel() != 1 or flips.dtype.is_floating_point or flips.dtype.is_complex or flips.dtype == torch.bool:
            raise ValueError(
                f"state 'flips' of {where} must be one integer, got a {flips.dtype} tensor of shape {tuple(flips.shape)}"
            )
        flips = flips.reshape(())
    elif not isinstance(flips, int) or isinstance(flips, bool):
        raise ValueError(f"state 'flips' of {where} must be one integer, got {type(flips).__name__}")
    if flips < 0:
        raise ValueError(f"state 'flips' of {where} must be >= 0, got {int(flips)}")
    state["flips"] = torch.as_tensor(flips).to(p.device, torch.int64, copy=True)
    return state


def checked_state_dict(
    state_dict: dict[str, Any],
    param_groups: list[dict[str, Any]],
    name: str,
    second_order: bool,
    check_hyperparameters: Callable[[dict[str, Any]], None],
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The (parameter, state) pairs a Bop state_dict loads into ``param_groups``, all checked first.

    Args:
        state_dict: ``{"state", "param_groups"}`` as ``Optimizer.state_dict()`` returns it.
        param_groups: the loading optimizer's groups.
        name: the optimizer's class name, for the errors.
        second_order: whether it is a Bop2ndOrder (its groups have sigma, its state v).
        check_hyperparameters: checks one group's hyperparameters (raises TypeError/ValueError).

    Returns:
        Per parameter with saved state, the parameter and its state from
        :func:`state_from_checkpoint`, in group order.

    Raises:
        ValueError: a saved group lacking lr, threshold or state_dtype; a Bop state_dict for a
            Bop2ndOrder or the reverse; groups that do not match ``param_groups`` (as torch); a
            state entry breaking the rules above; state for an id no group names.
        TypeError, ValueError: from ``check_hyperparameters``.
    """
    saved_groups = state_dict["param_groups"]
    for h, saved_group in enumerate(saved_groups):
        missing = sorted({"lr", "threshold", "state_dtype"} - set(saved_group))
        if missing:
            raise ValueError(f"{name} cannot load this state_dict: its param_groups[{h}] lacks {missing}")
    if any(("sigma" in g) != second_order for g in saved_groups):
        raise ValueError(
            f"{name} cannot load a {_name(not second_order)} state_dict: the second moment v and sigma "
            f"{'are missing' if second_order else 'have no use here'}"
        )
    if len(saved_groups) != len(param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(param_groups, saved_groups)):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )
    saved = dict(state_dict["state"])
    loaded = []
    for h, (group, saved_group) in enumerate(zip(param_groups, saved_groups)):
        check_hyperparameters({**saved_group, "fused": group["fused"]})
        for i, (p, k) in enumerate(zip(group["params"], saved_group["params"])):
            where = f"param_groups[{h}]['params'][{i}] (state_dict id {k})"
            state = state_from_checkpoint(saved.pop(k, {}), p, where, saved_group["state_dtype"], second_order)
            if state:
                loaded.append((p, state))
    if saved:
        raise ValueError(f"loaded state dict has state for ids {sorted(saved)}, which name no parameter of its groups")
    return loaded


def _name(second_order):
    return "Bop2ndOrder" if second_order else "Bop"
