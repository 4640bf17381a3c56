"""Optimizers for binary weights (imported as ``bnnops.optim``): Bop, Bop2ndOrder, a threshold
scheduler, and the pairing of Bop with a torch optimizer for the real-valued parameters."""

from bnnops.optim.binary_and_real import BinaryAndReal, split_parameters
from bnnops.optim.bop import Bop, Bop2ndOrder, bop_reference_
from bnnops.optim.schedules import ThresholdScheduler

__all__ = ["BinaryAndReal", "Bop", "Bop2ndOrder", "ThresholdScheduler", "bop_reference_", "split_parameters"]
