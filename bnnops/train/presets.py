"""The presets of ``python -m bnnops.train``: named hyperparameter sets a run starts from.

Each :class:`Preset` states what it reproduces and every way it departs from that source. The
paper's presets follow its code, plumerai/rethinking-bnn-optimization (TensorFlow 2.0, larq 0.7):
``bnn_optimization/models/binarynet.py``, whose hparams sets are ``default`` (the latent-weight
baseline), ``bop`` (section 5.1) and ``bop_sec52`` (section 5.2).
"""

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A named set of :class:`~bnnops.train.TrainConfig` values.

    Attributes:
        doc: what the preset reproduces, and each departure from its source.
        settings: TrainConfig field -> value, for every optimizer.
        by_optimizer: optimizer name -> the settings that replace ``settings`` for it.
    """

    doc: str
    settings: dict[str, Any]
    by_optimizer: dict[str, dict[str, Any]] = field(default_factory=dict)

    def values(self, optimizer: str) -> dict[str, Any]:
        """The preset's TrainConfig values for ``optimizer``."""
        return {**self.settings, **self.by_optimizer.get(optimizer, {}), "optimizer": optimizer}


# The paper's latent-weight baseline, hparams "default" of binarynet.py: ste_sign weights clipped to
# [-1, 1] (larq's weight_clip), every parameter trained by Keras' Adam(5e-3) at a constant rate,
# batch 256, 100 epochs, on the same network as Bop (128 filters, 1024 dense units).
_PAPER_LATENT = dict(epochs=100, batch_size=256, adam_lr=5e-3, decay=1.0, decay_every=0)
# What every paper preset shares: BinaryNet on CIFAR-10, Keras Adam's epsilon (1e-7, where torch's
# default is 1e-8), Adam(1e-2) for the real parameters of a Bop run (Bop's fp_optimizer).
_PAPER = dict(model="binarynet", dataset="cifar10", adam_lr=1e-2, adam_eps=1e-7)
_PAPER_DEPARTURES = """
    Departures from the paper's code, in every paper preset:

    - An epoch is one pass over a fresh permutation of the 50000 training images, the last batch
      smaller when the batch size does not divide 50000; Keras' fit takes 50000 // batch steps
      from a repeated shuffled stream (the same at batch 50 and 100; at 256, 196 batches here,
      the last of 80 images, against 195 steps).
    - torch's Adam with Keras' epsilon 1e-7; Keras adds epsilon to sqrt(v) before the bias
      correction, torch after it, so Keras' epsilon acts as 1e-7 / sqrt(1 - 0.999^t) in torch's
      terms: larger over the first few thousand steps.
    - The loss is cross-entropy on the logits; the paper's is Keras' categorical cross-entropy on
      a softmax, which clips probabilities to [1e-7, 1 - 1e-7].
    - Weights start from torch's default initialization, not Keras' Glorot uniform.
    - ``bop2`` (Bop2ndOrder) is not in the paper's code: it takes the Bop settings, and sigma
      from TrainConfig (1e-2).
"""

# CPU-sized runs: the paper's section 5.1 values (gamma 1e-3, tau 1e-6) for Bop, Adam(1e-2) for the
# latent weights, both decayed x0.1 after 20 of 30 epochs; bench/train_evidence.py --sweep shows
# the values tried around them. Adam keeps torch's epsilon (1e-8), the setting that
# bench/results/train_evidence.md was measured with.
_CPU = dict(
    epochs=30, batch_size=50, gamma=1e-3, threshold=1e-6, adam_lr=1e-2, adam_eps=1e-8, decay=0.1, decay_every=20
)

PRESETS: dict[str, Preset] = {
    "paper-cifar10": Preset(
        doc="""The paper's CIFAR-10 run (section 5.2, 91.3% top-1 with Bop): BinaryNet, hparams
    ``bop_sec52``: batch 50, 500 epochs, Bop gamma 1e-4 decayed x0.1 every 100 epochs, tau 1e-8,
    Adam(1e-2) for the real parameters at a constant rate. ``latent-adam`` takes hparams
    ``default``: batch 256, 100 epochs, Adam(5e-3) for every parameter at a constant rate.
"""
        + _PAPER_DEPARTURES,
        settings=dict(_PAPER, epochs=500, batch_size=50, gamma=1e-4, threshold=1e-8, decay=0.1, decay_every=100),
        by_optimizer={"latent-adam": _PAPER_LATENT},
    ),
    "paper-hparams": Preset(
        doc="""The paper's hyperparameter study (section 5.1): BinaryNet, hparams ``bop``: batch
    100, 100 epochs, Bop gamma 1e-3 and tau 1e-6 (the values the study varies: --gamma,
    --threshold), Adam(1e-2) for the real parameters, all at a constant rate. ``latent-adam``
    takes hparams ``default``, as in paper-cifar10.
"""
        + _PAPER_DEPARTURES,
        settings=dict(_PAPER, epochs=100, batch_size=100, gamma=1e-3, threshold=1e-6, decay=1.0, decay_every=0),
        by_optimizer={"latent-adam": _PAPER_LATENT},
    ),
    "digits": Preset(
        doc="""A CPU-sized run (minutes): small_bnn on scikit-learn's 8x8 digits, batch 50, 30
    epochs; Bop with the paper's section 5.1 values (gamma 1e-3, tau 1e-6) and Adam(1e-2) for the
    real parameters, latent-adam with Adam(1e-2); the binary weights' rate decays x0.1 after 20
    epochs. Not a setting of the paper; Adam keeps torch's epsilon 1e-8.
""",
        settings=dict(_CPU, model="small_bnn", dataset="digits"),
    ),
    "teacher-student": Preset(
        doc="""A CPU-sized run whose best accuracy is known (100%): binary_mlp on labels made by a
    random binary network of the same architecture; the settings of the digits preset.
""",
        settings=dict(_CPU, model="binary_mlp", dataset="teacher-student"),
    ),
    "mnist1d": Preset(
        doc="""A CPU-sized run on MNIST-1D (bnnops.data.mnist1d: 4000 training and 1000 test
    signals of length 40): mnist1d_cnn (width 64), batch 100 (the MNIST-1D paper's), 30 epochs at a
    constant rate; Bop gamma 1e-3 and tau 1e-5, Adam(1e-2) for the real parameters and for
    latent-adam: the values bench/mnist1d_evidence.py chose on a validation split (a decayed gamma
    stops Bop's flips there: bench/results/mnist1d/README.md). Not a setting of the paper.
""",
        settings=dict(
            _CPU, model="mnist1d_cnn", dataset="mnist1d", batch_size=100, threshold=1e-5, decay=1.0, decay_every=0
        ),
    ),
}
DEFAULT_PRESET = "digits"
