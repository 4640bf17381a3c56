"""Training of the reference BNNs of :mod:`bnnops.models` on :mod:`bnnops.data`, with Bop or a
latent-weight baseline; ``python -m bnnops.train`` is its command line (usage: :mod:`bnnops.train.cli`).

- :mod:`bnnops.train.config`: :class:`TrainConfig` (everything a run depends on), ``OPTIMIZERS``,
  ``RESUME_OVERRIDES``.
- :mod:`bnnops.train.presets`: ``PRESETS``, each a :class:`Preset` stating how it departs from
  the paper's code.
- :mod:`bnnops.train.optimization`: the optimizer of a run, its rate schedule, flip counting.
- :mod:`bnnops.train.loop`: :func:`train` (epochs, checkpoint, log) and :func:`evaluate`.
- :mod:`bnnops.train.checkpoint`: the run directory's files (checkpoint, log), written whole or
  not at all, read back with every field checked.
- :mod:`bnnops.train.distributed`: the processes of a torchrun run, the device of each.
- :mod:`bnnops.train.faults`: crash points for the kill-and-resume tests.
- :mod:`bnnops.train.plots`: :func:`plot_history`, the PNG plots of a run.
- :mod:`bnnops.train.cli`: :func:`main`, the argument parsing of ``python -m bnnops.train``.
"""

from bnnops.train.checkpoint import Checkpoint, load_checkpoint
from bnnops.train.cli import main
from bnnops.train.config import OPTIMIZERS, RESUME_OVERRIDES, TrainConfig
from bnnops.train.loop import evaluate, train
from bnnops.train.plots import plot_history
from bnnops.train.presets import DEFAULT_PRESET, PRESETS, Preset

__all__ = [
    "DEFAULT_PRESET",
    "OPTIMIZERS",
    "PRESETS",
    "RESUME_OVERRIDES",
    "Checkpoint",
    "Preset",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "main",
    "plot_history",
    "train",
]
