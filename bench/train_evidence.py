"""Evidence that Bop trains binarized networks: Bop against latent-weight Adam, same model, 3 seeds.

Run from the root of a checkout::

    python -m bench.train_evidence            # the arms below, 3 seeds each (CPU, several minutes)
    python -m bench.train_evidence --sweep    # the hyperparameter values tried (seed 0), to show the choice
    python -m bench.train_evidence --gpu-step # BinaryNet training step, CIFAR-10 shapes, batch 256 (needs a GPU)
    python -m bench.train_evidence --gpu-step --profile  # ... and where each step's time goes
    python -m bench.train_evidence --gpu-step --compile  # ... and both models under torch.compile
    python -m bench.train_evidence --gpu-step --channels-last  # ... and both in channels_last
    python -m bench.train_evidence --gpu-step --cuda-graphs  # ... and both as one CUDA graph per step

Tasks (``bnnops.train`` presets; each optimizer takes the preset's settings for it):

- ``digits``: ``small-bnn`` on scikit-learn's 8x8 digits (1438 train / 359 test images).
- ``teacher-student``: ``mlp`` (real input 32 -> binary 32 -> binary 4) on 8192 Gaussian inputs
  labelled by a random binary network of that same architecture, so 100% test accuracy is
  reachable; a float logistic regression and the majority class are measured as references.

Each arm (task, optimizer, settings: ``ARMS``) runs once per seed (the seed sets the initial
weights and the batch order; the data and the teacher stay fixed): final and best test accuracy,
training wall seconds (the epochs' training loops, evaluation excluded), process CPU seconds (the
whole run; less sensitive to other processes than wall time), the last epoch's flip ratio, and for
Bop the median |m| of the binary weights at the end (the scale the threshold is compared with).
The arms run seed by seed, interleaved, so a busy machine slows all of them alike. The JSON
(``--out``) holds every run, the per-arm summary, the references and the machine; a markdown table
is written beside it.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch

from bench.machine import describe
from bnnops import data
from bnnops.train import TrainConfig, train

TASKS = ("digits", "teacher-student")
# (task, optimizer, settings over the preset): the preset's Bop (the paper's section 5.1 values,
# gamma 1e-3 and tau 1e-6) and latent Adam on both tasks, and on the teacher-student task also Bop
# with the threshold the sweep preferred there (its gradients are larger; see the README text).
ARMS = [
    ("digits", "bop", {}),
    ("digits", "latent-adam", {}),
    ("teacher-student", "bop", {}),
    ("teacher-student", "bop", {"threshold": 1e-4}),
    ("teacher-student", "latent-adam", {}),
]
# What --sweep tries with seed 0 (the presets' values are among them), for SWEEP_EPOCHS epochs:
# half the presets' 30, before their decay at epoch 20, so every value runs at a constant rate.
SWEEP = {
    "bop": [dict(gamma=g, threshold=t) for g in (1e-4, 1e-3, 1e-2) for t in (1e-8, 1e-6, 1e-5, 1e-4)],
    "latent-adam": [dict(adam_lr=lr) for lr in (1e-3, 1e-2, 3e-2)],
}
SWEEP_EPOCHS = 15


def _load() -> float | None:
    """The 1-minute load average (other processes on the machine distort the seconds)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_one(task: str, optimizer: str, seed: int, epochs: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Train ``task``'s preset with ``optimizer`` and ``seed`` on the CPU; return the run's row.

    ``epochs``: None keeps the preset's; ``overrides``: ``TrainConfig`` fields over the preset.
    """
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_preset(
            task,
            optimizer=optimizer,
            seed=seed,
            epochs=epochs,
            out=out,
            progress=False,
            plots=False,
            device="cpu",
            **overrides,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        log = train(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m_median = _median_abs_m(os.path.join(out, "checkpoint.pt")) if optimizer != "latent-adam" else None
    last = log["history"][-1]
    flips = last["flip_ratio"]
    return {
        "task": task,
        "optimizer": optimizer,
        "seed": seed,
        "epochs": cfg.epochs,
        "settings": overrides,
        "final_test_acc": log["final_test_acc"],
        "best_test_acc": log["best_test_acc"],
        "final_train_acc": last["train_acc"],
        "train_seconds": log["train_seconds"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "final_flip_ratio": sum(flips.values()) / len(flips),
        "test_acc_by_epoch": [h["test_acc"] for h in log["history"]],
        "load_avg": _load(),
        "median_abs_m": m_median,
    }


def _median_abs_m(checkpoint: str) -> float:
    """Median |m| over all binary weights at the end of a Bop run: the scale the threshold meets."""
    state = torch.load(checkpoint, weights_only=True)["optimization"]["optimizer"]["binary"]["state"]
    return torch.cat([s["m"].float().abs().flatten() for s in state.values()]).median().item()


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (sample; 0 for one value), min and max of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm ("task / optimizer[, setting value]"): run count, and mean std min max of final and
    best test accuracy, training and CPU seconds and the last epoch's flip ratio."""
    out = {}
    for row in rows:
        settings = "".join(f", {k} {v:g}" for k, v in row["settings"].items())
        out.setdefault(f"{row['task']} / {row['optimizer']}{settings}", []).append(row)
    return {
        key: {
            "runs": len(rs),
            "final_test_acc": spread([r["final_test_acc"] for r in rs]),
            "best_test_acc": spread([r["best_test_acc"] for r in rs]),
            "train_seconds": spread([r["train_seconds"] for r in rs]),
            "cpu_seconds": spread([r["cpu_seconds"] for r in rs]),
            "final_flip_ratio": spread([r["final_flip_ratio"] for r in rs]),
        }
        for key, rs in out.items()
    }


def markdown(summary: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    """The per-arm table of :func:`summarize`, with a line naming the machine."""
    lines = [
        "| task / optimizer | runs | final test acc (mean ± std) | min - max | best epoch acc | "
        "train wall s (mean) | process CPU s (mean) | last-epoch flip ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        f, b, t, fr = s["final_test_acc"], s["best_test_acc"], s["train_seconds"], s["final_flip_ratio"]
        cpu = s["cpu_seconds"]
        lines.append(
            f"| {key} | {s['runs']} | {100 * f['mean']:.1f}% ± {100 * f['std']:.1f} | "
            f"{100 * f['min']:.1f} - {100 * f['max']:.1f}% | {100 * b['mean']:.1f}% | {t['mean']:.1f} | {cpu['mean']:.1f} | "
            f"{fr['mean']:.1e} |"
        )
    lines.append("")
    lines.append(
        f"{machine['device_name']}, {machine['cpu_threads']} threads, torch {machine['torch']}, "
        f"{machine['date']}, commit {str(machine['commit'])[:10]}"
    )
    return "\n".join(lines)


def _write(out: str, result: dict[str, Any], table: str) -> None:
    """The JSON at ``out`` and the markdown beside it, each replaced whole (a run killed while
    writing leaves the previous version, not half a file)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=1)), (os.path.splitext(out)[0] + ".md", table + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def evidence(seeds: Iterable[int], epochs: int | None = None) -> list[dict[str, Any]]:
    """Every arm of ``ARMS`` once per seed (:func:`run_one` rows), progress on stderr."""
    rows = []
    for seed in seeds:
        for task, optimizer, settings in ARMS:  # seed by seed, so load on the machine hits every arm alike
            rows.append(run_one(task, optimizer, seed, epochs, **settings))
            r = rows[-1]
            print(
                f"{task:16s} {optimizer:12s} {settings} seed {seed}: final test acc {r['final_test_acc']:.4f} "
                f"(best {r['best_test_acc']:.4f}), {r['train_seconds']:.1f} s, load {r['load_avg']}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def references() -> dict[str, float]:
    """What simple guesses get on the teacher-student test set (the binary teacher itself gets 100%):
    always the majority class, and a float logistic regression on the raw inputs."""
    from sklearn.linear_model import LogisticRegression

    d = data.teacher_student()
    fit = LogisticRegression(max_iter=2000).fit(d.x_train.numpy(), d.y_train.numpy())
    return {
        "teacher-student majority class": d.info["majority_accuracy"],
        "teacher-student float logistic regression": fit.score(d.x_test.numpy(), d.y_test.numpy()),
    }


def sweep(epochs: int | None = None) -> list[dict[str, Any]]:
    """Every ``SWEEP`` setting on every task with seed 0 (:func:`run_one` rows), progress on stderr."""
    rows = []
    for task in TASKS:
        for optimizer, grid in SWEEP.items():
            for settings in grid:
                rows.append(run_one(task, optimizer, 0, epochs, **settings))
                r = rows[-1]
                print(
                    f"{task:16s} {optimizer:12s} {settings}: final {r['final_test_acc']:.4f} best "
                    f"{r['best_test_acc']:.4f} flips {r['final_flip_ratio']:.1e} {r['train_seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def sweep_markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """The table of :func:`sweep` rows, with a line naming the seed, epochs and machine."""
    lines = [
        "| task | optimizer | settings | final test acc | best | last-epoch flip ratio | median abs m |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k} {v:g}" for k, v in r["settings"].items())
        lines.append(
            f"| {r['task']} | {r['optimizer']} | {settings} | {100 * r['final_test_acc']:.1f}% | "
            f"{100 * r['best_test_acc']:.1f}% | {r['final_flip_ratio']:.1e} | "
            f"{'-' if r['median_abs_m'] is None else format(r['median_abs_m'], '.1e')} |"
        )
    lines.append("")
    lines.append(f"seed 0, {rows[0]['epochs']} epochs, {machine['device_name']}, {machine['date']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m bench.train_evidence`` with ``argv``: write the JSON and markdown, print the table."""
    p = argparse.ArgumentParser(prog="python -m bench.train_evidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="try the SWEEP grid with seed 0 instead")
    p.add_argument("--gpu-step", action="store_true", help="BinaryNet training step on the GPU instead")
    p.add_argument("--profile", action="store_true", help="with --gpu-step: profile each variant's step too")
    p.add_argument("--compile", action="store_true", help="with --gpu-step: both variants under torch.compile too")
    p.add_argument("--channels-last", action="store_true", help="with --gpu-step: both variants in channels_last too")
    p.add_argument("--cuda-graphs", action="store_true", help="with --gpu-step: both variants as CUDA graphs too")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, help="override the presets' epochs (quick looks)")
    p.add_argument("--out", help="JSON path (default bench/results/train_evidence[_sweep|_gpu_step].json)")
    args = p.parse_args(argv)
    if (args.profile or args.compile or args.channels_last or args.cuda_graphs) and not args.gpu_step:
        p.error("--profile, --compile, --channels-last and --cuda-graphs go with --gpu-step")
    if args.gpu_step:
        from bench.train_step_report import gpu_step_report

        out = args.out or "bench/results/train_evidence_gpu_step.json"
        # Written after every row: a run stopped at its time limit keeps what it measured.
        result, table = gpu_step_report(
            profile=args.profile,
            compile=args.compile,
            channels_last=args.channels_last,
            cuda_graphs=args.cuda_graphs,
            progress=lambda result, table: _write(out, result, table),
        )
    elif args.sweep:
        machine = describe("cpu")
        rows = sweep(args.epochs or SWEEP_EPOCHS)
        result, table = {"machine": machine, "runs": rows}, sweep_markdown(rows, machine)
        out = args.out or "bench/results/train_evidence_sweep.json"
    else:
        machine = describe("cpu")
        machine["load_avg_start"] = _load()
        rows = evidence(range(args.seeds), args.epochs)
        machine["load_avg_end"] = _load()
        summary = summarize(rows)
        refs = references()
        result = {"machine": machine, "summary": summary, "references": refs, "runs": rows}
        table = markdown(summary, machine) + "".join(f"\n{k}: {100 * v:.1f}% test accuracy" for k, v in refs.items())
        out = args.out or "bench/results/train_evidence.json"
    _write(out, result, table)
    print(table)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
