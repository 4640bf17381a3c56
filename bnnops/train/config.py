"""What a training run depends on: :class:`TrainConfig`, the optimizers and the presets."""

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEFAULT_PRESET", "OPTIMIZERS", "PRESETS", "RESUME_OVERRIDES", "TrainConfig"]

OPTIMIZERS: tuple[str, ...] = ("bop", "bop2", "latent-adam")

# Hyperparameters by preset; explicit command-line values override them. "by_optimizer" holds
# the settings that differ between optimizers.
_PAPER = dict(model="binarynet", dataset="cifar10", adam_lr=1e-2, by_optimizer={"latent-adam": dict(adam_lr=5e-3)})
# CPU-sized runs: the paper's section 5.1 values (gamma 1e-3, tau 1e-6) for Bop, Adam(1e-2) for the
# latent weights, both decayed x0.1 after 20 of 30 epochs; bench/train_evidence.py --sweep shows
# the values tried around them.
_CPU = dict(epochs=30, batch_size=50, gamma=1e-3, threshold=1e-6, adam_lr=1e-2, decay=0.1, decay_every=20)
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's CIFAR-10 run (section 5.2, 91.3% top-1): bnn_optimization/models/binarynet.py,
    # hparams "bop_sec52". The latent baseline takes that file's default optimizer, Adam(5e-3), but
    # keeps bop_sec52's network and batch (the file's "default" hparams use 64 filters, 4096 dense
    # units and batch 256): one network for both, so the optimizers are what differs.
    "paper-cifar10": dict(_PAPER, epochs=500, batch_size=50, gamma=1e-4, threshold=1e-8, decay=0.1, decay_every=100),
    # The paper's hyperparameter study (section 5.1, hparams "bop"): gamma 1e-3, tau 1e-6, batch 100.
    "paper-hparams": dict(_PAPER, epochs=100, batch_size=100, gamma=1e-3, threshold=1e-6, decay=1.0, decay_every=0),
    "digits": dict(_CPU, model="small-bnn", dataset="digits"),
    "teacher-student": dict(_CPU, model="mlp", dataset="teacher-student"),
}
DEFAULT_PRESET = "digits"
# What a resumed run may change; everything else comes from its checkpoint.
RESUME_OVERRIDES: tuple[str, ...] = ("epochs", "device", "data_dir", "progress", "plots", "out")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in the checkpoint and the log).

    gamma / threshold / sigma are Bop's (gamma is the param-group "lr" of the Bop optimizer);
    adam_lr is Adam's rate for the real parameters (bop, bop2) or for all of them (latent-adam).
    ``decay`` multiplies the binary weights' rate (gamma, or latent-adam's lr) every
    ``decay_every`` epochs (0: never). ``limit`` keeps only the first ``limit`` training and test
    samples (quick runs, tests).

    Raises:
        ValueError for a count below its minimum (epochs, batch_size, limit: 1; decay_every: 0),
        decay <= 0, gamma or sigma outside [0, 1], or a negative threshold or adam_lr.
    """

    model: str = "small-bnn"
    dataset: str = "digits"
    optimizer: str = "bop"
    epochs: int = 30
    batch_size: int = 50
    gamma: float = 1e-3
    threshold: float = 1e-6
    sigma: float = 1e-2
    adam_lr: float = 1e-2
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

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("decay_every", 0), ("limit", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.decay > 0:
            raise ValueError(f"decay must be > 0 (a factor on the rate), got {self.decay}")
        for name in ("gamma", "sigma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.threshold >= 0 and self.adam_lr >= 0):
            raise ValueError(f"threshold and adam_lr must be >= 0, got {self.threshold} and {self.adam_lr}")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "TrainConfig":
        """The preset's settings for ``overrides['optimizer']`` (default bop), then ``overrides``
        (``None`` values are skipped: an option not given on the command line).

        Raises:
            ValueError for an unknown preset.
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        settings = dict(PRESETS[preset])
        by_optimizer = settings.pop("by_optimizer", {})
        settings.update(by_optimizer.get(overrides.get("optimizer", "bop"), {}))
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)
