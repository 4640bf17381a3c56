"""The tables and plots of the MNIST-1D evidence (:mod:`bench.mnist1d_evidence`), from the run
JSONs saved under ``<out>/runs``: ``<out>/summary.md`` (every table), ``<out>/summary.json`` (the
same numbers), and the PNG plots ``grid.png`` (gamma x threshold heat maps), ``flip_ratio.png``
(flip ratio per layer over training, Bop against latent Adam), ``bytes.png`` (accuracy per stored
byte) and ``accuracy.png`` (evaluation accuracy over training, per optimizer).

Run ``python -m bench.mnist1d_evidence --report`` (or :func:`report`); a partial evidence run gives
the tables and plots of what it finished.
"""

import glob
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from bench.train_evidence import spread

if TYPE_CHECKING:
    from bench.mnist1d_evidence import Run

OPT_NAMES = {"bop": "Bop", "bop2": "Bop2ndOrder", "latent-adam": "latent Adam", "adam": "Adam (float)"}
MODEL_NAMES = {
    "cnn": "binary CNN",
    "mlp": "binary MLP",
    "float_cnn": "float CNN (paper)",
    "float_mlp": "float MLP (paper)",
}


# Epochs at which the optimizers table also reads the runs' accuracy: a short budget, seen inside the
# full run (before the rate decays at 2/3 of the epochs, so not the run a short budget would schedule).
EARLY_EPOCHS = (3, 5, 10)


def load_runs(out: str) -> list[dict[str, Any]]:
    """Every run record under ``out``/runs (unordered)."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "runs", "*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


def _group(records: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> dict[tuple, list[dict[str, Any]]]:
    """Test-split records that ``keep`` accepts, grouped by (model, width, optimizer, epochs, gamma,
    threshold, lr, decay): the seeds of one arm together."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        r = rec["run"]
        if r["split"] == "test" and keep(r):
            key = (r["model"], r["width"], r["optimizer"], r["epochs"], r["gamma"], r["threshold"], r["lr"], r["decay"])
            groups.setdefault(key, []).append(rec)
    return groups


def _arm_row(key: tuple, recs: list[dict[str, Any]]) -> dict[str, Any]:
    model, width, optimizer, epochs = key[:4]
    return {
        "model": model,
        "width": width,
        "optimizer": optimizer,
        "epochs": epochs,
        "decay": key[-1],
        "runs": len(recs),
        "seeds": sorted(r["run"]["seed"] for r in recs),
        "acc": spread([r["final_acc"] for r in recs]),
        "train_seconds": spread([r["train_seconds"] for r in recs]),
        "memory_bytes": recs[0]["memory_bytes"],
        "binary_params": recs[0]["binary_params"],
        "real_params": recs[0]["real_params"],
        "last_flip_ratio": spread([_mean_flips(r["history"][-1]) for r in recs]) if recs[0]["binary_params"] else None,
        "acc_by_epoch": {
            e: spread([r["history"][e - 1]["acc"] for r in recs]) for e in EARLY_EPOCHS if e < len(recs[0]["history"])
        },
    }


def _mean_flips(epoch: dict[str, Any]) -> float:
    ratios = epoch["flip_ratio"]
    return sum(ratios.values()) / len(ratios) if ratios else 0.0


def _arm_name(a: dict[str, Any]) -> str:
    return OPT_NAMES[a["optimizer"]] + ("" if a["decay"] else ", constant rate")


def _pct(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.2f}% ± {100 * s['std']:.2f} | {100 * s['min']:.1f} - {100 * s['max']:.1f}%"


def summarize(records: list[dict[str, Any]], main_widths: dict[str, int], long_epochs: int) -> dict[str, Any]:
    """The numbers of every table: ``optimizers`` (the main widths, every optimizer), ``widths``
    (binary and float CNNs over width), ``grid`` (the gamma x threshold runs) and ``long`` (the
    runs of ``long_epochs`` epochs, apart from the others)."""
    long = _group(records, lambda r: r["epochs"] == long_epochs)
    records = [rec for rec in records if rec["run"]["epochs"] != long_epochs]
    main = _group(records, lambda r: r["width"] == main_widths.get(r["model"]))
    cnns = _group(
        records,
        lambda r: r["model"] in ("cnn", "float_cnn") and r["optimizer"] in ("bop", "latent-adam", "adam"),
    )
    grid = [
        {
            "gamma": rec["run"]["gamma"],
            "threshold": rec["run"]["threshold"],
            "acc": rec["final_acc"],
            "flip_ratio": _mean_flips(rec["history"][-1]),
            "median_abs_m": rec["median_abs_m"],
            "epochs": rec["run"]["epochs"],
            "width": rec["run"]["width"],
        }
        for rec in records
        if rec["run"]["split"] == "validation"
    ]
    return {
        "optimizers": [_arm_row(k, v) for k, v in sorted(main.items(), key=lambda kv: (kv[0][0], kv[0][2]))],
        "widths": [_arm_row(k, v) for k, v in sorted(cnns.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1]))],
        "grid": sorted(grid, key=lambda g: (g["gamma"], g["threshold"])),
        "long": [_arm_row(k, v) for k, v in sorted(long.items(), key=lambda kv: (kv[0][0], kv[0][2]))],
    }


def _final_accuracy_table(title: str, arms: list[dict[str, Any]]) -> list[str]:
    """A markdown table of ``arms`` (rows of :func:`_arm_row`): test accuracy at the last epoch,
    train time, stored bytes, last-epoch flip ratio."""
    lines = [
        title,
        "",
        "| model | width | optimizer | runs | test acc mean ± std | min - max | train s (mean) | stored bytes | "
        "last-epoch flip ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        fr = "-" if a["last_flip_ratio"] is None else f"{a['last_flip_ratio']['mean']:.1e}"
        lines.append(
            f"| {MODEL_NAMES[a['model']]} | {a['width']} | {_arm_name(a)} | {a['runs']} | "
            f"{_pct(a['acc'])} | {a['train_seconds']['mean']:.0f} | {a['memory_bytes']:,} | {fr} |"
        )
    return lines


def markdown(result: dict[str, Any], machine: dict[str, Any] | None) -> str:
    """The tables of :func:`summarize` as markdown."""
    lines = _final_accuracy_table(
        "## Optimizers and float baselines (test accuracy at the last epoch)", result["optimizers"]
    )
    if result["long"]:
        title = (
            f"## The longer budget ({result['long'][0]['epochs']} epochs at a constant rate, test accuracy at the "
            "last epoch)"
        )
        lines += ["", *_final_accuracy_table(title, result["long"])]
    lines += [
        "",
        "## Early in training (test accuracy after k epochs of the same runs, mean ± std)",
        "",
        "| model | optimizer | " + " | ".join(f"epoch {e}" for e in EARLY_EPOCHS) + " | final |",
        "|---|---|" + "---|" * (len(EARLY_EPOCHS) + 1),
    ]
    for a in result["optimizers"]:
        cells = [
            f"{100 * a['acc_by_epoch'][e]['mean']:.1f}% ± {100 * a['acc_by_epoch'][e]['std']:.1f}"
            if e in a["acc_by_epoch"]
            else "-"
            for e in EARLY_EPOCHS
        ]
        final = f"{100 * a['acc']['mean']:.1f}% ± {100 * a['acc']['std']:.1f}"
        lines.append(f"| {MODEL_NAMES[a['model']]} | {_arm_name(a)} | {' | '.join(cells)} | {final} |")
    lines += [
        "",
        "## Accuracy per stored byte (CNNs over width, test accuracy)",
        "",
        "| model | width | optimizer | runs | test acc mean ± std | min - max | stored bytes | binary / real params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in result["widths"]:
        lines.append(
            f"| {MODEL_NAMES[a['model']]} | {a['width']} | {_arm_name(a)} | {a['runs']} | "
            f"{_pct(a['acc'])} | {a['memory_bytes']:,} | {a['binary_params']:,} / {a['real_params']:,} |"
        )
    lines += ["", "## Bop against latent Adam by width (binary CNN, mean of the seeds)", ""]
    lines += [
        "| width | schedule | Bop | latent Adam | Bop - latent Adam | within one std |",
        "|---|---|---|---|---|---|",
    ]
    by = {(a["width"], a["optimizer"], a["decay"]): a for a in result["widths"] if a["model"] == "cnn"}
    for w, optimizer, decay in sorted(by):
        if optimizer == "bop" and (w, "latent-adam", decay) in by:  # the same schedule for both
            b, la = by[w, "bop", decay]["acc"], by[w, "latent-adam", decay]["acc"]
            diff = b["mean"] - la["mean"]
            ok = diff >= -max(b["std"], la["std"])
            lines.append(
                f"| {w} | {'x0.1 at 2/3' if decay else 'constant'} | {100 * b['mean']:.2f}% ± {100 * b['std']:.2f} | "
                f"{100 * la['mean']:.2f}% ± {100 * la['std']:.2f} | {100 * diff:+.2f} | {'yes' if ok else 'no'} |"
            )
    if result["grid"]:
        g0 = result["grid"][0]
        lines += [
            "",
            f"## Bop's gamma x threshold (binary CNN width {g0['width']}, {g0['epochs']} epochs at a constant "
            "rate, seed 0, validation accuracy)",
            "",
            "| gamma | threshold | validation acc | last-epoch flip ratio | median abs m |",
            "|---|---|---|---|---|",
        ]
        for g in result["grid"]:
            lines.append(
                f"| {g['gamma']:g} | {g['threshold']:g} | {100 * g['acc']:.1f}% | {g['flip_ratio']:.1e} | "
                f"{g['median_abs_m']:.1e} |"
            )
    if machine:
        walls = [i.get("evidence_wall_seconds") for i in machine.get("invocations") or [machine]]
        timing = (
            f"evidence wall time {sum(walls) / 60:.1f} min ({len(walls)} invocation(s): "
            + ", ".join(f"{w / 60:.1f}" for w in walls)
            + " min)"
            if None not in walls
            else "an evidence invocation had not finished (or was stopped): a partial report"
        )
        lines += [
            "",
            f"{machine.get('device_name')}, {machine.get('cpu_threads')} threads, {machine.get('jobs')} process(es), "
            f"torch {machine.get('torch')}, {machine.get('date')}, commit {str(machine.get('commit'))[:10]}; {timing}",
        ]
    return "\n".join(lines) + "\n"


def plots(records: list[dict[str, Any]], result: dict[str, Any], out: str, main_widths: dict[str, int]) -> list[str]:
    """Write the PNG plots (module docstring) that the records allow; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnnops.train.plots import _save

    paths = []
    grid = result["grid"]
    if grid:
        gammas = sorted({g["gamma"] for g in grid})
        taus = sorted({g["threshold"] for g in grid})
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, field, title, fmt in (
            (axes[0], "acc", "validation accuracy (%)", lambda v: f"{100 * v:.1f}"),
            (axes[1], "flip_ratio", "last-epoch flip ratio", lambda v: f"{v:.0e}"),
        ):
            table = [[float("nan")] * len(taus) for _ in gammas]
            for g in grid:
                table[gammas.index(g["gamma"])][taus.index(g["threshold"])] = g[field]
            shown = table if field == "acc" else [[max(v, 1e-9) for v in row] for row in table]
            norm = None if field == "acc" else matplotlib.colors.LogNorm()
            im = ax.imshow(shown, cmap="viridis", norm=norm, origin="lower")
            fig.colorbar(im, ax=ax)
            for i, row in enumerate(table):
                for j, v in enumerate(row):
                    if v == v:
                        ax.text(j, i, fmt(v), ha="center", va="center", color="w", fontsize=8)
            ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
            ax.set_yticks(range(len(gammas)), [f"{g:g}" for g in gammas])
            ax.set_xlabel("threshold tau")
            ax.set_ylabel("gamma")
            ax.set_title(title)
        fig.suptitle(f"Bop on the binary CNN (width {grid[0]['width']}, {grid[0]['epochs']} epochs, seed 0)")
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out, "grid.png")))

    def seed0(model: str, optimizer: str) -> dict[str, Any] | None:
        for rec in records:
            r = rec["run"]
            if (r["model"], r["width"], r["optimizer"], r["seed"], r["split"], r["decay"]) == (
                model,
                main_widths[model],
                optimizer,
                0,
                "test",
                True,
            ):
                return rec
        return None

    pairs = [(m, o, seed0(m, o)) for m in ("cnn", "mlp") for o in ("bop", "latent-adam")]
    pairs = [p for p in pairs if p[2] is not None]
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.6), sharey=True, squeeze=False)
        for ax, (model, optimizer, rec) in zip(axes[0], pairs):
            epochs = [h["epoch"] for h in rec["history"]]
            for layer in rec["history"][0]["flip_ratio"]:
                ax.plot(epochs, [max(h["flip_ratio"][layer], 1e-7) for h in rec["history"]], label=layer)
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_title(f"{MODEL_NAMES[model]} w{main_widths[model]}, {OPT_NAMES[optimizer]}", fontsize=9)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("flip ratio (flips / weights / step)")
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out, "flip_ratio.png")))

    arms = [a for a in result["widths"] if a["runs"]]
    if arms:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (model, optimizer, decay), style in (
            (("cnn", "bop", True), "o-"),
            (("cnn", "bop", False), "o:"),
            (("cnn", "latent-adam", True), "s--"),
            (("cnn", "latent-adam", False), "s:"),
            (("float_cnn", "adam", True), "^-"),
        ):
            line = sorted(
                (a for a in arms if (a["model"], a["optimizer"], a["decay"]) == (model, optimizer, decay)),
                key=lambda a: a["width"],
            )
            if line:
                ax.errorbar(
                    [a["memory_bytes"] for a in line],
                    [100 * a["acc"]["mean"] for a in line],
                    yerr=[100 * a["acc"]["std"] for a in line],
                    fmt=style,
                    capsize=3,
                    label=f"{MODEL_NAMES[model]}, {_arm_name(line[0])}",
                )
                for a in line:
                    ax.annotate(f"w{a['width']}", (a["memory_bytes"], 100 * a["acc"]["mean"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("model bytes as stored (packed bits for binary weights)")
        ax.set_ylabel("test accuracy (%), mean ± std")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out, "bytes.png")))

    curves = [(m, o, seed0(m, o)) for m in ("cnn", "mlp") for o in ("bop", "bop2", "latent-adam")]
    curves += [(m, "adam", seed0(m, "adam")) for m in ("float_cnn", "float_mlp")]
    curves = [c for c in curves if c[2] is not None]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, optimizer, rec in curves:
            ax.plot(
                [h["epoch"] for h in rec["history"]],
                [100 * h["acc"] for h in rec["history"]],
                label=f"{MODEL_NAMES[model]}, {OPT_NAMES[optimizer]}",
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%), seed 0")
        ax.set_ylim(bottom=50)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out, "accuracy.png")))
    return paths


def planned_runs(records: list[dict[str, Any]], runs: "Iterable[Run]") -> list[dict[str, Any]]:
    """The records of ``runs`` (by key) made with the current settings
    (:func:`bench.mnist1d_evidence.settings`; a record without them has
    :data:`~bench.mnist1d_evidence.LEGACY_SETTINGS`); the others are named on stderr and left out."""
    from bench.mnist1d_evidence import recorded_settings, settings

    keys, current = {r.key for r in runs}, settings()
    kept, foreign, other = [], [], []
    for rec in records:
        if rec["key"] not in keys:
            foreign.append(rec["key"])
        elif recorded_settings(rec) != current:
            other.append(rec["key"])
        else:
            kept.append(rec)
    for keys_left, why in ((foreign, "not in the study plan"), (other, f"made with settings other than {current}")):
        if keys_left:
            shown = ", ".join(keys_left[:5]) + (", ..." if len(keys_left) > 5 else "")
            print(f"mnist1d report: {len(keys_left)} run(s) left out, {why}: {shown}", file=sys.stderr)
    return kept


def report(out: str, runs: "Iterable[Run] | None" = None) -> str:
    """Write ``summary.md``, ``summary.json`` and the plots under ``out`` from its runs; return the
    markdown. Only the records of ``runs`` (default: every study's at the default seeds and
    epochs, :func:`bench.mnist1d_evidence.evidence_runs`) made with the current settings count
    (:func:`planned_runs`)."""
    from bench.mnist1d_evidence import (
        CNN_WIDTH,
        FLOAT_CNN_WIDTH,
        FLOAT_MLP_WIDTH,
        LONG_EPOCHS,
        MLP_WIDTH,
        STUDIES,
        evidence_runs,
    )

    main_widths = {"cnn": CNN_WIDTH, "mlp": MLP_WIDTH, "float_cnn": FLOAT_CNN_WIDTH, "float_mlp": FLOAT_MLP_WIDTH}
    records = planned_runs(load_runs(out), evidence_runs(STUDIES) if runs is None else runs)
    result = summarize(records, main_widths, LONG_EPOCHS)
    machine_path = os.path.join(out, "machine.json")
    machine = None
    if os.path.exists(machine_path):
        with open(machine_path) as f:
            machine = json.load(f)
    text = markdown(result, machine)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"machine": machine, **result}, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    short = [rec for rec in records if rec["run"]["epochs"] != LONG_EPOCHS]
    if short:
        plots(short, result, out, main_widths)
    return text
