"""Train a reference BNN: ``python -m bnnops.train``.

Examples::

    python -m bnnops.train                                   # small-bnn on digits with Bop, CPU-sized
    python -m bnnops.train --optimizer latent-adam --seed 1  # the latent-weight baseline
    python -m bnnops.train --preset paper-cifar10 --data-dir ~/data/cifar-10-batches-py
    python -m bnnops.train --out runs/digits --resume        # continue from runs/digits/checkpoint.pt

Optimizers (the model is the same; only how its binary weights are stored and trained differs):

- ``bop``: binary weights are packed :class:`bnnops.BinaryTensor` parameters trained by
  :class:`bnnops.optim.Bop` (gamma = ``--gamma``, tau = ``--threshold``); every real parameter
  (batch-norm shifts and scales, real layers) by Adam(``--adam-lr``), as in the paper.
- ``bop2``: the same with :class:`bnnops.optim.Bop2ndOrder` (``--sigma``).
- ``latent-adam``: the usual baseline: float latent weights binarized by ``ste_sign`` in every
  forward, trained with every other parameter by Adam(``--adam-lr``); after each step the latent
  weights are clipped to [-1, 1] (larq's ``weight_clip``, as in the paper's baseline).

``--decay F --decay-every E`` multiplies the binary weights' rate (Bop's gamma, or latent-adam's
Adam lr) by F every E epochs; the paper decays gamma x0.1 every 100 epochs on CIFAR-10.

Each epoch: a progress bar, then per-epoch train and test loss and accuracy and each binary
layer's flip ratio (weights flipped per step / weights, averaged over the epoch's steps: larq's
FlipRatio, the quantity the paper reads training through) go to ``<out>/log.json``, and
``<out>/checkpoint.pt`` is rewritten (model, optimizer, scheduler and random-generator states,
history), so ``--resume`` continues exactly where it stopped. At the end ``loss.png``,
``accuracy.png`` and ``flip_ratio.png`` are written to ``<out>``.
"""

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from bnnops import data, models
from bnnops.train.config import DEFAULT_PRESET, OPTIMIZERS, PRESETS, RESUME_OVERRIDES, TrainConfig
from bnnops.train.loop import train

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bnnops.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help=f"hyperparameters to start from (default {DEFAULT_PRESET}); the options below override them",
    )
    p.add_argument("--model", choices=sorted(models.MODELS))
    p.add_argument("--dataset", choices=data.DATASETS)
    p.add_argument("--data-dir", help="CIFAR-10's directory (the unpacked cifar-10-batches-py)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default bop")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--gamma", type=float, help="Bop's adaptivity rate (its param-group lr)")
    p.add_argument("--threshold", type=float, help="Bop's threshold tau")
    p.add_argument("--sigma", type=float, help="Bop2ndOrder's second-moment rate")
    p.add_argument("--adam-lr", type=float, help="Adam's lr: real parameters (bop), all parameters (latent-adam)")
    p.add_argument("--decay", type=float, help="multiply gamma (bop) or Adam's lr (latent-adam) by this ...")
    p.add_argument("--decay-every", type=int, help="... every this many epochs (0: never)")
    p.add_argument("--seed", type=int, help="model initialization and batch order (default 0)")
    p.add_argument("--data-seed", type=int, help="digits split / teacher network (default 0)")
    p.add_argument("--limit", type=int, help="use only the first N training and test samples")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--out", help="directory for checkpoint, log and plots (default runs/<preset>-<optimizer>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or epoch lines")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots at the end")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the training and print its summary line.

    Returns:
        The run's log (:func:`bnnops.train.train`).

    Raises:
        SystemExit for bad arguments, and for ``--resume`` with an option that differs from the
        saved configuration and is not one a resumed run may change (``RESUME_OVERRIDES``).
    """
    args = vars(_parser().parse_args(argv))
    preset, resume = args.pop("preset"), args.pop("resume")
    if args["out"] is None:
        args["out"] = os.path.join("runs", f"{preset}-{args['optimizer'] or 'bop'}")
    saved = None  # the configuration a resumed run was started with: its log's, or its checkpoint's
    log_path, ckpt_path = os.path.join(args["out"], "log.json"), os.path.join(args["out"], "checkpoint.pt")
    if resume and os.path.isfile(log_path):
        with open(log_path) as f:
            saved = json.load(f)["config"]
    elif resume and os.path.isfile(ckpt_path):
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["config"]
    if saved is not None:
        if args["epochs"] is None:
            # Without --epochs a resumed run trains to the epoch count it was started with.
            args["epochs"] = saved["epochs"]
        # --preset only picks defaults, which a resumed run takes from its checkpoint; an option
        # equal to the saved value changes nothing. Refuse the others rather than drop them.
        changed = [
            f"--{k.replace('_', '-')} {v}"
            for k, v in args.items()
            if v is not None and k not in RESUME_OVERRIDES and saved.get(k) != v
        ]
        if changed:
            raise SystemExit(
                f"--resume continues {args['out']} with its saved configuration; it cannot change "
                f"{', '.join(changed)} (only --epochs, --device, --data-dir, --out and the output "
                "switches). Start a new run with a new --out instead."
            )
    cfg = TrainConfig.from_preset(preset, **args)
    result = train(cfg, resume=resume)
    print(
        f"{cfg.out}: final test accuracy {result['final_test_acc']:.4f}, best {result['best_test_acc']:.4f}, "
        f"{result['train_seconds']:.1f} s training"
    )
    return result
