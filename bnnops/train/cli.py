"""Train a reference BNN: ``python -m bnnops.train``.

Examples::

    python -m bnnops.train                                   # small_bnn on digits with Bop, CPU-sized
    python -m bnnops.train --optimizer latent-adam --seed 1  # the latent-weight baseline
    python -m bnnops.train --preset paper-cifar10 --data-dir ~/data/cifar-10-batches-py
    python -m bnnops.train --out runs/digits-bop --resume    # continue from runs/digits-bop/checkpoint.pt
    torchrun --nproc_per_node 4 -m bnnops.train --preset paper-cifar10 --data-dir DIR  # 4 processes

Optimizers (the model is the same; only how its binary weights are stored and trained differs):

- ``bop``: binary weights are packed :class:`bnnops.BinaryTensor` parameters trained by
  :class:`bnnops.optim.Bop` (gamma = ``--gamma``, tau = ``--threshold``); every real parameter
  (batch-norm shifts and scales, real layers) by Adam(``--adam-lr``), as in the paper.
- ``bop2``: the same with :class:`bnnops.optim.Bop2ndOrder` (``--sigma``).
- ``latent-adam``: the usual baseline: float latent weights binarized by ``ste_sign`` in every
  forward, trained with every other parameter by Adam(``--adam-lr``); after each step the latent
  weights are clipped to [-1, 1] (larq's ``weight_clip``, as in the paper's baseline).

``--decay F --decay-every E`` multiplies the binary weights' rate (Bop's gamma, or latent-adam's
Adam lr) by F every E epochs; the paper decays gamma x0.1 every 100 epochs on CIFAR-10. The
presets (``--preset``) and how each departs from the paper's code: :mod:`bnnops.train.presets`.

A run starts with one header line (model, data, optimizer, device, output directory, preset).
Each epoch: a progress bar, then per-epoch train and test loss and accuracy and each binary
layer's flip ratio (weights flipped per step / weights, averaged over the epoch's steps: larq's
FlipRatio, the quantity the paper reads training through) go to ``<out>/log.json``, and
``<out>/checkpoint.pt`` is rewritten (model, optimizer, scheduler and random-generator states,
history), so ``--resume`` continues exactly where it stopped: the checkpoint is the run's record,
and a resumed run rewrites the log from it. At the end ``loss.png``, ``accuracy.png`` and
``flip_ratio.png`` are written to ``<out>``. Every file is replaced whole or not at all, so a
run killed at any point resumes as if it had not stopped.

A new run refuses an ``--out`` that holds files, unless ``--resume`` (continue that run) or
``--overwrite`` (replace it). Ctrl-C stops a run with exit status 130 and prints the command
that resumes it; a mistake (missing data or checkpoint, an unusable device or directory) ends
with one line on stderr and exit status 1 (``--debug`` shows the traceback).

Several processes: ``torchrun --nproc_per_node N -m bnnops.train ...`` trains with
DistributedDataParallel (gloo on the CPU, nccl on CUDA: one GPU per process). ``--batch-size``
is the global batch, split across the processes, so a preset trains the same batches whatever
N is; only rank 0 writes files and prints; ``--resume`` works the same under torchrun.
"""

import argparse
import os
import shlex
import sys
import textwrap
import time
import traceback
import typing
from collections.abc import Sequence
from typing import Any

from bnnops import data, models
from bnnops.train import distributed
from bnnops.train.checkpoint import CHECKPOINT, check_out_dir, load_checkpoint
from bnnops.train.config import OPTIMIZERS, RESUME_OVERRIDES, TrainConfig
from bnnops.train.loop import train
from bnnops.train.presets import DEFAULT_PRESET, PRESETS

__all__ = ["main"]

PROG = "python -m bnnops.train"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line on stderr and status 2 (argparse's usage block, 20 lines here, would bury it)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {name}:\n    " + textwrap.dedent("    " + preset.doc).split("\n\n")[0].strip().replace("\n", "\n    ")
        for name, preset in PRESETS.items()
    )
    p = _Parser(
        prog=PROG,
        description=__doc__,
        epilog=f"presets (their departures from the paper's code: bnnops/train/presets.py):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"hyperparameters to start from (default {DEFAULT_PRESET}); the options below override them",
    )
    p.add_argument("--model", choices=sorted(models.MODELS))
    p.add_argument("--dataset", choices=data.DATASETS)
    p.add_argument("--data-dir", help="CIFAR-10's directory (the unpacked cifar-10-batches-py)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default bop")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="the global batch: split across the processes under torchrun")
    p.add_argument("--gamma", type=float, help="Bop's adaptivity rate (its param-group lr)")
    p.add_argument("--threshold", type=float, help="Bop's threshold tau")
    p.add_argument("--sigma", type=float, help="Bop2ndOrder's second-moment rate")
    p.add_argument("--adam-lr", type=float, help="Adam's lr: real parameters (bop), all parameters (latent-adam)")
    p.add_argument("--adam-eps", type=float, help="Adam's epsilon (paper presets: Keras' 1e-7; others torch's 1e-8)")
    p.add_argument("--decay", type=float, help="multiply gamma (bop) or Adam's lr (latent-adam) by this ...")
    p.add_argument("--decay-every", type=int, help="... every this many epochs (0: never)")
    p.add_argument("--seed", type=int, help="model initialization and batch order (default 0)")
    p.add_argument("--data-seed", type=int, help="digits split / teacher network (default 0)")
    p.add_argument("--limit", type=int, help="use only the first N training and test samples")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--out", help="directory for checkpoint, log and plots (default runs/<preset>-<optimizer>)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    run.add_argument("--overwrite", action="store_true", help="start a new run in --out, replacing the run there")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or epoch lines")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots at the end")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _config(args: dict[str, Any], resume: bool, overwrite: bool) -> TrainConfig:
    """The run's configuration from the parsed options: the preset's values and the options
    given, or for ``--resume`` the checkpoint's with the options a resumed run may change."""
    preset = args.pop("preset")
    if args["out"] is None:
        args["out"] = os.path.join("runs", f"{preset or DEFAULT_PRESET}-{args['optimizer'] or 'bop'}")
    check_out_dir(args["out"], resume, overwrite)
    if not resume:
        return TrainConfig.from_preset(preset or DEFAULT_PRESET, **args)
    saved = load_checkpoint(os.path.join(args["out"], CHECKPOINT)).config
    # --preset only picks defaults, which a resumed run takes from its checkpoint; an option equal
    # to the saved value changes nothing. Refuse the others rather than drop them.
    given = dict(args, preset=preset)
    changed = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in given.items()
        if v is not None and k not in RESUME_OVERRIDES and getattr(saved, k) != v
    ]
    if changed:
        raise SystemExit(
            f"{PROG}: error: --resume continues {args['out']} with its saved configuration; it cannot change "
            f"{', '.join(changed)} (only --epochs, --device, --data-dir, --out and the output switches). "
            "Start a new run with a new --out instead."
        )
    return TrainConfig(**{**vars(saved), **{k: v for k, v in args.items() if k in RESUME_OVERRIDES and v is not None}})


def _resume_command(out: str, world_size: int) -> str:
    launcher = f"torchrun --nproc_per_node {world_size} -m bnnops.train" if world_size > 1 else PROG
    return f"{launcher} --out {shlex.quote(out)} --resume"


def _what_was_saved(out: str | None, resume: bool, started: float, procs: distributed.Processes) -> str:
    """After Ctrl-C: where the run stands, and the command that resumes it."""
    path = os.path.join(out or "", CHECKPOINT)
    if out is not None and os.path.isfile(path) and (resume or os.path.getmtime(path) >= started):
        return f"the last finished epoch is in {path}. Resume with: {_resume_command(out, procs.world_size)}"
    return "no epoch had finished, nothing was saved."


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the training and print its summary line.

    Returns:
        The run's log (:func:`bnnops.train.train`).

    Raises:
        SystemExit: status 2 for bad arguments (argparse); status 1 with one line on stderr for
        ``--resume`` with an option that differs from the saved configuration and is not one a
        resumed run may change (``RESUME_OVERRIDES``), and for every ValueError or OSError of
        the run (missing data or checkpoint, a damaged checkpoint, an unusable device or output
        directory), re-raised as it is with ``--debug``; status 130 on Ctrl-C, after printing
        the command that resumes the run.
    """
    args = vars(_parser().parse_args(argv))
    debug, resume, overwrite = args.pop("debug"), args.pop("resume"), args.pop("overwrite")
    started, procs = time.time(), distributed.Processes()
    try:
        procs = distributed.processes()
        cfg = _config(args, resume, overwrite)
        result = train(cfg, resume=resume, overwrite=overwrite, on_start=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        if procs.rank == 0:
            print(f"{PROG}: interrupted; {_what_was_saved(args['out'], resume, started, procs)}", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError) as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        where = f" (process {procs.rank} of {procs.world_size})" if procs.world_size > 1 else ""
        raise SystemExit(f"{PROG}: error{where}: {message}") from None
    if procs.rank == 0:
        print(
            f"{cfg.out}: final test accuracy {result['final_test_acc']:.4f}, best {result['best_test_acc']:.4f}, "
            f"{result['train_seconds']:.1f} s training"
        )
    return result
