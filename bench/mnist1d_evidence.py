"""Evidence on MNIST-1D: Bop, Bop2ndOrder and latent-weight Adam on binary networks, beside the
MNIST-1D paper's float networks, with the Bop paper's ablations.

Run from the root of a checkout::

    python -m bench.mnist1d_evidence                    # every study below, then the report
    python -m bench.mnist1d_evidence --study grid       # one study (of STUDIES; repeatable)
    python -m bench.mnist1d_evidence --jobs 2           # runs in 2 processes of one thread each
    python -m bench.mnist1d_evidence --report           # tables and plots from the runs saved so far

Studies (each run: a model, a width, an optimizer, a seed; the seed sets the initial weights and
the batch order, the data is the published MNIST-1D split):

- ``optimizers``: Bop, Bop2ndOrder and latent-weight Adam (larq's weight clipping to [-1, 1]) on
  the binary CNN (:func:`bnnops.models.mnist1d_cnn`) and the binary MLP
  (:func:`bnnops.models.mnist1d_mlp`), ``SEEDS`` seeds, test accuracy; every run keeps its flip
  ratio per layer and epoch (larq's FlipRatio: sign changes / weights / steps).
- ``baselines``: the MNIST-1D paper's float CNN and MLP (greydanus/mnist1d's ConvBase and MLPBase,
  Adam 1e-2 as in its code) in the same harness: same data, batch, epochs and schedule.
- ``grid``: the Bop paper's hyperparameter study, gamma x threshold (``GRID_GAMMAS`` x
  ``GRID_THRESHOLDS``) on the binary CNN, seed 0, on the validation split (the last
  ``HOLDOUT`` training signals held out, trained on the rest), at a constant rate: final
  accuracy and flip ratio.
- ``schedule``: Bop and latent Adam on the binary CNN at a constant rate (every other study decays
  the binary weights' rate x0.1 after 2/3 of the epochs), at ``CNN_WIDTH`` (``SEEDS`` seeds) and the
  widest of ``BINARY_WIDTHS`` (``WIDTH_SEEDS``).
- ``long``: the budget the issue's 95% target asks for: the binary CNN at ``LONG_WIDTH`` with Bop,
  Bop2ndOrder and latent Adam, and the paper's float CNN, ``LONG_EPOCHS`` epochs at a constant rate,
  ``SEEDS`` seeds (``--epochs`` does not apply). Width, epochs and the constant rate were chosen on the
  validation split (seed 0: latent Adam 96.4%, Bop 95.8% after 45 epochs at width 64).
- ``widths``: accuracy per stored byte: the binary CNN (Bop and latent Adam) and the float CNN over
  ``BINARY_WIDTHS`` / ``FLOAT_WIDTHS``, ``WIDTH_SEEDS`` seeds (the main width: ``SEEDS``, its runs
  shared with the optimizers study), the widths above ``CNN_WIDTH`` last; bytes as stored by
  :func:`bnnops.summary` (packed words for binary weights, 4 bytes per real value).

Bop's threshold, the rates, the schedule and the CNN's first layer were chosen on the validation
split; the widths, epochs and seed counts by the compute budget (``bench/results/mnist1d/README.md``
lists the trials, and the one time test numbers were seen before a choice). Every run is written as one JSON file under
``<out>/runs/`` as it finishes, named by its settings; a run whose file exists is skipped, so an
interrupted evidence run resumes where it stopped, and ``--report`` works on a partial one. The
names do not hold the models' architecture: delete ``<out>/runs`` after changing a model.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.machine import describe, load_average
from bnnops import data, models, summary
from bnnops.train import TrainConfig
from bnnops.train.loop import evaluate, train_epoch
from bnnops.train.optimization import Optimization

OUT = "bench/results/mnist1d"
SEEDS = 5
HOLDOUT = 500
BATCH = 100
EPOCHS = 15
GAMMA, THRESHOLD = 1e-3, 1e-5
LR = 1e-2  # Adam: the real parameters of a Bop run, every parameter of latent Adam and of the floats
CNN_WIDTH, MLP_WIDTH = 32, 256
FLOAT_CNN_WIDTH, FLOAT_MLP_WIDTH = 25, 100  # the MNIST-1D paper's
GRID_GAMMAS = (1e-4, 1e-3, 1e-2, 1e-1)
GRID_THRESHOLDS = (1e-7, 1e-6, 1e-5, 1e-4)
GRID_WIDTH, GRID_EPOCHS = 16, 8
BINARY_WIDTHS = (8, 16, 32, 64)
WIDTH_SEEDS = 3  # seeds of the widths study (the main width has SEEDS from the optimizers study)
FLOAT_WIDTHS = (4, 8, 16, 25, 50)
LIMIT: int | None = None  # keep only the first LIMIT training and evaluation signals (the tests' quick runs)

# Settings that change a run's result but not its key (its file name): recorded in each run's JSON
# under "settings"; the report and execute use only runs whose settings equal settings().
LEGACY_SETTINGS = {"limit": None, "batch": 100, "holdout": 500}
"""The settings of the runs recorded without a "settings" field (the published runs under
bench/results/mnist1d/runs, made with LIMIT None, BATCH 100 and HOLDOUT 500)."""


def settings() -> dict[str, Any]:
    """The current LIMIT, BATCH and HOLDOUT (read at the call: the tests change LIMIT)."""
    return {"limit": LIMIT, "batch": BATCH, "holdout": HOLDOUT}


def recorded_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The settings a run record was made with (:data:`LEGACY_SETTINGS` when it names none)."""
    return record.get("settings", LEGACY_SETTINGS)


# Model name -> (builder taking num_classes, input_shape, width[, weight_quantizer]; binary?).
MODELS: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "cnn": (models.mnist1d_cnn, True),
    "mlp": (models.mnist1d_mlp, True),
    "float_cnn": (models.mnist1d_float_cnn, False),
    "float_mlp": (models.mnist1d_float_mlp, False),
}
OPTIMIZERS = ("bop", "bop2", "latent-adam", "adam")  # adam: a float model's every parameter
STUDIES = ("optimizers", "baselines", "grid", "widths", "schedule", "long")
LONG_WIDTH, LONG_EPOCHS = 64, 45


@dataclass(frozen=True)
class Run:
    """One training run's settings. ``split``: "test" (train on all 4000, report the published
    test set) or "validation" (train on 4000 - HOLDOUT, report the held-out signals). ``decay``:
    the binary weights' rate (gamma, or Adam's lr for latent and float models) x0.1 after 2/3 of
    the epochs, else constant."""

    model: str
    width: int
    optimizer: str
    seed: int
    epochs: int = EPOCHS
    split: str = "test"
    gamma: float = GAMMA
    threshold: float = THRESHOLD
    lr: float = LR
    decay: bool = True

    def __post_init__(self) -> None:
        binary = MODELS[self.model][1]
        if binary == (self.optimizer == "adam") or self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} does not train model {self.model!r}")
        if self.split not in ("test", "validation"):
            raise ValueError(f"split must be 'test' or 'validation', got {self.split!r}")

    @property
    def key(self) -> str:
        """The run's file name (no extension): every setting that changes its result."""
        bop = f"-g{self.gamma:g}-t{self.threshold:g}" if self.optimizer in ("bop", "bop2") else ""
        return (
            f"{self.model}-w{self.width}-{self.optimizer}{bop}-lr{self.lr:g}-e{self.epochs}"
            f"{'' if self.decay else '-const'}-{self.split}-s{self.seed}"
        )


def build(run: Run) -> nn.Module:
    """The run's model, its weights drawn from torch's generator seeded with ``run.seed``."""
    builder, binary = MODELS[run.model]
    torch.manual_seed(run.seed)
    if not binary:
        return builder(10, (1, 40), run.width)
    return builder(10, (1, 40), run.width, weight_quantizer="ste_sign" if run.optimizer == "latent-adam" else None)


def run_one(run: Run) -> dict[str, Any]:
    """Train ``run`` on the CPU in this process; return its record: the settings, the model's
    stored bytes and parameter counts, per epoch train loss and accuracy, evaluation accuracy
    and flip ratio per binary layer, the final accuracy, training seconds (evaluation excluded)
    and, for Bop, the median |m| of the binary weights at the end."""
    dataset = data.mnist1d(holdout=HOLDOUT if run.split == "validation" else 0)
    if LIMIT is not None:
        dataset = dataset.subset(LIMIT)
    model = build(run)
    size = summary(model, print_table=False)
    cfg = TrainConfig(
        model="mnist1d_mlp" if "mlp" in run.model else "mnist1d_cnn",
        dataset="mnist1d",
        optimizer="latent-adam" if run.optimizer == "adam" else run.optimizer,
        epochs=run.epochs,
        batch_size=BATCH,
        gamma=run.gamma,
        threshold=run.threshold,
        adam_lr=run.lr,
        decay=0.1 if run.decay else 1.0,
        decay_every=round(2 * run.epochs / 3) if run.decay else 0,
        seed=run.seed,
        progress=False,
        plots=False,
        device="cpu",
    )
    opt = Optimization(model, cfg)
    generator = torch.Generator().manual_seed(run.seed)
    history, seconds = [], 0.0
    for epoch in range(1, run.epochs + 1):
        t0 = time.perf_counter()
        train_loss, train_acc = train_epoch(model, dataset, opt, cfg, generator, epoch)
        seconds += time.perf_counter() - t0
        flip_ratio = opt.end_epoch()
        _, acc = evaluate(model, dataset, 1000)
        history.append(
            {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "acc": acc, "flip_ratio": flip_ratio}
        )
    median_abs_m = None
    if run.optimizer in ("bop", "bop2"):
        state = opt.optimizer.binary.state
        median_abs_m = torch.cat([state[p]["m"].float().abs().flatten() for _, p in opt.weights]).median().item()
    return {
        "run": dataclasses.asdict(run),
        "key": run.key,
        "settings": settings(),
        "memory_bytes": size.memory_bytes,
        "binary_params": size.binary_params,
        "real_params": size.real_params,
        "history": history,
        "final_acc": history[-1]["acc"],
        "train_seconds": seconds,
        "median_abs_m": median_abs_m,
        "load_avg": load_average(),
        "threads": torch.get_num_threads(),
    }


def study_runs(study: str, seeds: int = SEEDS, epochs: int = EPOCHS) -> list[Run]:
    """The runs of ``study`` (one of :data:`STUDIES`), seed by seed (a stopped run has whole seeds)."""
    if study == "optimizers":
        arms = [(m, w, o) for m, w in (("cnn", CNN_WIDTH), ("mlp", MLP_WIDTH)) for o in ("bop", "bop2", "latent-adam")]
        return [Run(m, w, o, s, epochs) for s in range(seeds) for m, w, o in arms]
    if study == "baselines":
        arms = (("float_cnn", FLOAT_CNN_WIDTH), ("float_mlp", FLOAT_MLP_WIDTH))
        return [Run(m, w, "adam", s, epochs) for s in range(seeds) for m, w in arms]
    if study == "grid":
        return [
            Run("cnn", GRID_WIDTH, "bop", 0, GRID_EPOCHS, "validation", g, t, decay=False)
            for g in GRID_GAMMAS
            for t in GRID_THRESHOLDS
        ]
    if study == "widths":
        arms = [("cnn", w, o) for w in BINARY_WIDTHS for o in ("bop", "latent-adam")]
        arms += [("float_cnn", w, "adam") for w in FLOAT_WIDTHS]
        return [Run(m, w, o, s, epochs) for s in range(min(seeds, WIDTH_SEEDS)) for m, w, o in arms]
    if study == "schedule":
        # Bop and latent Adam at a constant rate beside the decayed runs of the other studies (the
        # decay freezes Bop's flips: bench/results/mnist1d/README.md), at the main width and the widest.
        widths = [(CNN_WIDTH, seeds), (max(BINARY_WIDTHS), min(seeds, WIDTH_SEEDS))]
        return [
            Run("cnn", w, o, s, epochs, decay=False)
            for w, n in widths
            for s in range(n)
            for o in ("bop", "latent-adam")
        ]
    if study == "long":
        arms = [("cnn", LONG_WIDTH, o) for o in ("bop", "bop2", "latent-adam")] + [
            ("float_cnn", FLOAT_CNN_WIDTH, "adam")
        ]
        return [Run(m, w, o, s, LONG_EPOCHS, decay=False) for s in range(seeds) for m, w, o in arms]
    raise ValueError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")


def evidence_runs(studies: Iterable[str], seeds: int = SEEDS, epochs: int = EPOCHS) -> list[Run]:
    """The runs of ``studies`` in the order they run, each once: seed 0 of the optimizers and the
    baselines first (the flip-ratio plot needs only it), then the grid, then the rest seed by seed,
    binary CNNs wider than ``CNN_WIDTH`` (the costliest runs) last."""
    by_study = {study: study_runs(study, seeds, epochs) for study in studies}
    first = [r for study in ("optimizers", "baselines") for r in by_study.get(study, []) if r.seed == 0]
    grid = by_study.get("grid", [])
    # sorted() is stable: within a seed, the studies' order.
    rest = sorted((r for runs in by_study.values() for r in runs), key=lambda r: (_costly(r), r.seed))
    return list(dict.fromkeys(first + grid + rest))


def _costly(run: Run) -> bool:
    return run.model == "cnn" and run.width > CNN_WIDTH


def run_path(out: str, run: Run) -> str:
    return os.path.join(out, "runs", run.key + ".json")


def _run_and_save(args: tuple[Run, str]) -> tuple[Run, dict[str, Any]]:
    """Run one (in a worker process) and write its JSON, whole or not at all."""
    run, out = args
    record = run_one(run)
    path = run_path(out, run)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return run, record


def _one_thread() -> None:
    torch.set_num_threads(1)


def _done(out: str, run: Run) -> bool:
    """Whether ``run``'s JSON is under ``out``/runs, made with the current :func:`settings`."""
    path = run_path(out, run)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return recorded_settings(json.load(f)) == settings()


def execute(runs: list[Run], out: str, jobs: int = 1) -> int:
    """Every run of ``runs`` whose JSON is not yet under ``out``/runs, or was made with other
    :func:`settings` (then overwritten), in ``jobs`` processes of one thread each (``jobs`` 1: in
    this process, at torch's thread count); progress on stderr. Returns how many ran."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    todo = [r for r in runs if not _done(out, r)]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to run", file=sys.stderr)
    t0 = time.perf_counter()
    if jobs > 1:
        pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_one_thread)
        results = pool.imap_unordered(_run_and_save, [(r, out) for r in todo])
    else:
        results = (_run_and_save((r, out)) for r in todo)
    for i, (run, record) in enumerate(results, 1):
        print(
            f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f} s] {run.key}: acc {record['final_acc']:.4f} "
            f"({record['train_seconds']:.0f} s, load {record['load_avg']})",
            file=sys.stderr,
            flush=True,
        )
    if jobs > 1:
        pool.close()
        pool.join()
    return len(todo)


INVOCATION_KEYS = ("date", "jobs", "studies", "runs_done", "evidence_wall_seconds", "load_average", "load_avg_end")


def _write_machine(out: str, machine: dict[str, Any]) -> None:
    """``<out>/machine.json``: the machine of the latest invocation, and under ``invocations`` one
    entry per invocation (its studies, processes, runs finished and wall seconds; None while it runs
    or if it was stopped), so that studies run one by one keep their times."""
    path = os.path.join(out, "machine.json")
    invocations = []
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        invocations = previous.get("invocations") or [{k: previous.get(k) for k in INVOCATION_KEYS}]
        if invocations[-1].get("date") == machine["date"]:
            invocations.pop()  # this invocation's first entry, now completed
    invocations.append({k: machine.get(k) for k in INVOCATION_KEYS})
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({**machine, "invocations": invocations}, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.mnist1d_evidence``: run the studies asked for, then write the report."""
    from bench.mnist1d_report import report

    p = argparse.ArgumentParser(prog="python -m bench.mnist1d_evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", action="append", choices=STUDIES, help="a study to run (repeatable; default all)")
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of every study but the grid")
    p.add_argument("--jobs", type=int, default=1, help="processes (one thread each when > 1)")
    p.add_argument("--out", default=OUT, help=f"results folder (default {OUT})")
    p.add_argument("--report", action="store_true", help="only write the report from the saved runs")
    args = p.parse_args(argv)
    runs = evidence_runs(args.study or STUDIES, args.seeds, args.epochs)
    if not args.report:
        machine = dict(describe("cpu"), jobs=args.jobs, studies=args.study or list(STUDIES), evidence_wall_seconds=None)
        _write_machine(args.out, machine)  # a stopped run still names its machine
        t0 = time.perf_counter()
        machine["runs_done"] = execute(runs, args.out, args.jobs)
        machine.update(evidence_wall_seconds=time.perf_counter() - t0, load_avg_end=load_average())
        _write_machine(args.out, machine)
    print(report(args.out, evidence_runs(STUDIES, max(args.seeds, SEEDS), args.epochs)))


if __name__ == "__main__":
    main()
