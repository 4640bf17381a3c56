"""What a training run depends on: :class:`TrainConfig`, and the optimizers it can name."""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

import torch

from bnnops import data, models
from bnnops.train.presets import PRESETS

__all__ = ["OPTIMIZERS", "RESUME_OVERRIDES", "TrainConfig"]

OPTIMIZERS: tuple[str, ...] = ("bop", "bop2", "latent-adam")
# What a resumed run may change; everything else comes from its checkpoint.
RESUME_OVERRIDES: tuple[str, ...] = ("epochs", "device", "data_dir", "progress", "plots", "out")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in the checkpoint and the log).

    ``model`` is a key of :data:`bnnops.models.MODELS`, ``dataset`` one of
    :data:`bnnops.data.DATASETS`, ``optimizer`` one of :data:`OPTIMIZERS`. gamma / threshold /
    sigma are Bop's (gamma is the param-group "lr" of the Bop optimizer); adam_lr and adam_eps are
    Adam's rate and epsilon, for the real parameters (bop, bop2) or for all of them
    (latent-adam). ``decay`` multiplies the binary weights' rate (gamma, or latent-adam's lr)
    every ``decay_every`` epochs (0: never). ``batch_size`` is the global batch: the samples of
    one optimizer step, split across the processes of a multi-process run. ``limit`` keeps only
    the first ``limit`` training and test samples (quick runs, tests). ``preset`` names the
    preset the values came from (None: none); it is a record, the values are the fields.

    Raises:
        ValueError naming the field, for a value of the wrong type, an unknown model, dataset,
        optimizer or preset, a count below its minimum (epochs, batch_size, limit: 1;
        decay_every, seed, data_seed: 0), decay <= 0, gamma or sigma outside [0, 1], or a
        negative or non-finite threshold, adam_lr or adam_eps.
    """

    model: str = "small_bnn"
    dataset: str = "digits"
    optimizer: str = "bop"
    epochs: int = 30
    batch_size: int = 50
    gamma: float = 1e-3
    threshold: float = 1e-6
    sigma: float = 1e-2
    adam_lr: float = 1e-2
    adam_eps: float = 1e-8
    decay: float = 1.0
    decay_every: int = 0
    seed: int = 0
    data_seed: int = 0
    data_dir: str | None = None
    limit: int | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "runs/train"
    progress: bool = True
    plots: bool = True
    preset: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name, choices in (
            ("model", models.MODELS),
            ("dataset", data.DATASETS),
            ("optimizer", OPTIMIZERS),
            ("preset", PRESETS),
        ):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("decay_every", 0),
            ("limit", 1),
            ("seed", 0),
            ("data_seed", 0),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("gamma", "threshold", "sigma", "adam_lr", "adam_eps", "decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not self.decay > 0:
            raise ValueError(f"decay must be > 0 (a factor on the rate), got {self.decay}")
        for name in ("gamma", "sigma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("threshold", "adam_lr", "adam_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "TrainConfig":
        """The preset's settings for ``overrides['optimizer']`` (default bop), then ``overrides``
        (``None`` values are skipped: an option not given on the command line).

        Raises:
            ValueError for an unknown preset, or as :class:`TrainConfig` does.
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        settings = PRESETS[preset].values(overrides.get("optimizer") or "bop")
        settings.update({k: v for k, v in overrides.items() if v is not None}, preset=preset)
        return cls(**settings)

    @classmethod
    def from_dict(cls, values: Any, source: str) -> "TrainConfig":
        """The configuration ``values`` as read from ``source`` (a checkpoint or a log), with
        every field present and no other key.

        Raises:
            ValueError naming ``source`` and the keys or values that are wrong.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{source}: the configuration is a {type(values).__name__}, not a dict")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, values)) - names)
        missing = sorted(names - set(values))
        if unknown or missing:
            problems = [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
            problems += [f"no {', '.join(missing)}"] if missing else []
            raise ValueError(
                f"{source}: the configuration has {' and '.join(problems)}; it was not written by this "
                "version of bnnops"
            )
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{source}: the configuration is invalid: {e}") from None


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise ValueError unless ``value`` is of ``annotation`` (int, float, str, bool, or X | None;
    an int is a float, a bool is neither an int nor a float)."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
    expected = " or ".join("None" if k is type(None) else k.__name__ for k in allowed)
    raise ValueError(f"{name} must be {expected}, got {value!r}")
