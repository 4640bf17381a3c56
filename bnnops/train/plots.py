"""The PNG plots of a training run's history (matplotlib, imported on use)."""

import os
from typing import Any

__all__ = ["plot_history"]


def plot_history(history: list[dict[str, Any]], out: str, run: str = "") -> list[str]:
    """Write loss.png, accuracy.png and flip_ratio.png (log scale, one line per layer) to ``out``,
    each whole or not at all (through a temporary file).

    Args:
        history: one dict per epoch, as :func:`bnnops.train.train` logs them (``epoch``,
            ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``, ``flip_ratio``).
        out: an existing directory.
        run: what the run is (model, data, optimizer), added to every plot's title.

    Returns:
        The three paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    paths = []
    for name, keys, ylabel in (
        ("loss", ("train_loss", "test_loss"), "cross-entropy"),
        ("accuracy", ("train_acc", "test_acc"), "accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        for key in keys:
            ax.plot(epochs, [h[key] for h in history], label=key.replace("_", " "))
        ax.set(xlabel="epoch", ylabel=ylabel, title=f"{name}: {run}" if run else name)
        ax.legend()
        paths.append(_save(fig, os.path.join(out, f"{name}.png")))
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for layer in history[0]["flip_ratio"] if history else []:
        # A zero ratio has no place on a log axis; it shows as a gap.
        ax.plot(epochs, [h["flip_ratio"][layer] or float("nan") for h in history], label=layer)
    ax.set(
        xlabel="epoch",
        ylabel="flips per weight per step",
        title=f"flip ratio: {run}" if run else "flip ratio",
        yscale="log",
    )
    ax.legend(fontsize="small", ncol=2)
    paths.append(_save(fig, os.path.join(out, "flip_ratio.png")))
    return paths


def _save(fig: Any, path: str) -> str:
    """Write ``fig`` as a PNG to ``path`` through ``path.tmp`` and close it: a run killed while
    plotting leaves no half-written plot."""
    import matplotlib.pyplot as plt

    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
