"""Optimizers for binary weights (imported as ``bnnops.optim``).

- ``bop.py``: :class:`Bop`, :class:`Bop2ndOrder`.
- ``bop_reference.py``: :func:`bop_reference_`, the rule on one tensor in plain PyTorch (the CPU
  path, and the reference the fused kernel equals bit for bit).
- ``bop_state.py``: the per-parameter state's rules, fresh state, and state from a checkpoint.
- ``schedules.py``: :class:`ThresholdScheduler` (gamma is the group's ``"lr"``: torch's LR schedulers
  drive it).
- ``binary_and_real.py``: :class:`BinaryAndReal` and :func:`split_parameters`: Bop for the binary
  weights and any torch optimizer for the real-valued parameters, as one optimizer.
"""

from bnnops.optim.binary_and_real import BinaryAndReal, split_parameters
from bnnops.optim.bop import Bop, Bop2ndOrder
from bnnops.optim.bop_reference import bop_reference_
from bnnops.optim.schedules import ThresholdScheduler

__all__ = ["BinaryAndReal", "Bop", "Bop2ndOrder", "ThresholdScheduler", "bop_reference_", "split_parameters"]
