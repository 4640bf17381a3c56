"""Training of the reference BNNs of :mod:`bnnops.models` on :mod:`bnnops.data`, with Bop or a
latent-weight baseline; ``python -m bnnops.train`` is its command line (usage: :mod:`bnnops.train.cli`).

- :mod:`bnnops.train.config`: :class:`TrainConfig` (everything a run depends on), ``PRESETS``,
  ``OPTIMIZERS``, ``RESUME_OVERRIDES``.
- :mod:`bnnops.train.optimization`: the optimizer of a run, its rate schedule, flip counting.
- :mod:`bnnops.train.loop`: :func:`train` (epochs, checkpoint, log) and :func:`evaluate`.
- :mod:`bnnops.train.plots`: :func:`plot_history`, the PNG plots of a run.
- :mod:`bnnops.train.cli`: :func:`main`, the argument parsing of ``python -m bnnops.train``.
"""

from bnnops.train.cli import main
from bnnops.train.config import DEFAULT_PRESET, OPTIMIZERS, PRESETS, RESUME_OVERRIDES, TrainConfig
from bnnops.train.loop import evaluate, train
from bnnops.train.plots import plot_history

__all__ = [
    "DEFAULT_PRESET",
    "OPTIMIZERS",
    "PRESETS",
    "RESUME_OVERRIDES",
    "TrainConfig",
    "evaluate",
    "main",
    "plot_history",
    "train",
]
