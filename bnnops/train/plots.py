"""The PNG plots of a training run's history (matplotlib, imported on use)."""

import os
from typing import Any

__all__ = ["plot_history"]


def plot_history(history: list[dict[str, Any]], out: str) -> list[str]:
    """Write loss.png, accuracy.png and flip_ratio.png (log scale, one line per layer) to ``out``.

    Args:
        history: one dict per epoch, as :func:`bnnops.train.train` logs them (``epoch``,
            ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``, ``flip_ratio``).
        out: an existing directory.

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
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        ax.legend()
        paths.append(os.path.join(out, f"{name}.png"))
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for layer in history[0]["flip_ratio"] if history else []:
        # A zero ratio has no place on a log axis; it shows as a gap.
        ax.plot(epochs, [h["flip_ratio"][layer] or float("nan") for h in history], label=layer)
    ax.set(xlabel="epoch", ylabel="flips per weight per step", title="flip ratio", yscale="log")
    ax.legend(fontsize="small", ncol=2)
    paths.append(os.path.join(out, "flip_ratio.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
    return paths
