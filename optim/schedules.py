"""A scheduler for Bop's threshold (gamma is the param-group key "lr": use torch's LR schedulers).

The paper keeps tau = 1e-8 fixed and decays gamma (CIFAR-10: x0.1 every 100 epochs, ImageNet:
1e-4 -> 1e-6 linearly), so gamma's schedule is any ``torch.optim.lr_scheduler`` on the Bop
optimizer; the threshold, a key torch's schedulers never touch, has this one.
"""

from collections.abc import Callable
from typing import Any

import torch

from bnnops.optim.bop import Bop

__all__ = ["ThresholdScheduler"]

# A threshold multiplier as a function of the step count.
_Factor = Callable[[int], float]


class ThresholdScheduler:
    """Set each group's threshold to ``initial_threshold * factor(step)``, like ``LambdaLR`` for lr.

    Args:
        optimizer: a :class:`bnnops.optim.Bop` (or Bop2ndOrder).
        factor: a function of the step count (an int, 0 at construction) returning a float
            multiplier, or a list of such functions, one per param group.
        last_epoch: the step count to resume from (-1 starts fresh), as in torch's schedulers.

    Raises:
        TypeError: ``optimizer`` is not a Bop.
        ValueError: not one callable factor or one per group; a factor that makes a threshold
            negative (also at :meth:`step`).

    A group whose threshold is a tensor keeps that tensor: it is filled in place, as torch's LR
    schedulers fill a tensor lr (a compiled step then does not recompile).

    Each group's starting threshold is recorded in the group as ``"initial_threshold"`` (as torch's
    schedulers record ``"initial_lr"``; a tensor's as a copy), so the optimizer's ``state_dict``
    saves it; the scheduler also keeps its own copy (``base_thresholds``) for groups that lack the
    key after loading an optimizer checkpoint saved without a scheduler. Its ``state_dict`` holds
    the step count (the functions are code, not state, as in ``LambdaLR``).
    Call :meth:`step` after the optimizer's step, once per epoch or per batch as the schedule reads.

    Example: ``ThresholdScheduler(bop, lambda epoch: 0.5 ** (epoch // 10))`` halves tau every 10 epochs.
    """

    def __init__(
        self,
        optimizer: Bop,
        factor: _Factor | list[_Factor] | tuple[_Factor, ...],
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Bop):
            raise TypeError(f"ThresholdScheduler schedules a bnnops.optim.Bop, got {type(optimizer).__name__}")
        groups = optimizer.param_groups
        factors = list(factor) if isinstance(factor, (list, tuple)) else [factor] * len(groups)
        if len(factors) != len(groups) or not all(callable(f) for f in factors):
            raise ValueError(f"ThresholdScheduler needs one callable factor or one per param group ({len(groups)})")
        self.base_thresholds = [group.setdefault("initial_threshold", _copy(group["threshold"])) for group in groups]
        self.optimizer = optimizer
        self.factors = factors
        self.last_epoch = last_epoch
        self.step()

    def step(self) -> None:
        """Advance the step count and set every group's threshold from it."""
        self.last_epoch += 1
        self._apply()

    def _apply(self):
        for group, base, factor in zip(self.optimizer.param_groups, self.base_thresholds, self.factors):
            # The group's own record wins (an optimizer checkpoint carries it); one loaded from a
            # checkpoint saved without a scheduler lacks it and gets this scheduler's again.
            base = group.setdefault("initial_threshold", _copy(base))
            threshold = base * factor(self.last_epoch)
            if not threshold >= 0:
                raise ValueError(
                    f"ThresholdScheduler: the threshold must stay >= 0, but step {self.last_epoch} "
                    f"gives {base} * {factor(self.last_epoch)} = {threshold}"
                )
            if isinstance(group["threshold"], torch.Tensor):
                group["threshold"].fill_(threshold.reshape(()) if isinstance(threshold, torch.Tensor) else threshold)
            else:
                group["threshold"] = threshold

    def get_last_threshold(self) -> list[float | torch.Tensor]:
        """The thresholds of the groups, as last set (a tensor's as a copy)."""
        return [_copy(group["threshold"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """``{"last_epoch": ...}``: the step count (the factors are code, not state)."""
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and set the thresholds from it (in either order with the optimizer's load)."""
        self.last_epoch = state_dict["last_epoch"]
        self._apply()


def _copy(x):
    """A threshold that does not alias the group's (a tensor is filled in place)."""
    return x.clone() if isinstance(x, torch.Tensor) else x
