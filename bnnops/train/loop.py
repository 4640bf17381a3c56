"""The training loop: :func:`train` runs a :class:`~bnnops.train.TrainConfig` to its log,
checkpointing every epoch so ``resume=True`` continues exactly where a run stopped."""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from bnnops import data, models
from bnnops.train.config import RESUME_OVERRIDES, TrainConfig
from bnnops.train.optimization import Optimization
from bnnops.train.plots import plot_history

__all__ = ["evaluate", "train"]


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: data.InMemoryDataset, batch_size: int, split: str = "test"
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over ``split``; the model's mode
    is restored."""
    was_training = model.training
    model.eval()
    loss = correct = n = 0  # device tensors after the first batch: one sync at the end, not two a batch
    for x, y in dataset.batches(split, batch_size):
        logits = model(x)
        loss = loss + nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct = correct + (logits.argmax(1) == y).sum()
        n += y.numel()
    model.train(was_training)
    return float(loss) / n, int(correct) / n


def _train_epoch(
    model: nn.Module,
    dataset: data.InMemoryDataset,
    opt: Optimization,
    cfg: TrainConfig,
    generator: torch.Generator,
    epoch: int,
) -> tuple[float, float]:
    """One epoch over the training split: (mean loss, accuracy) of the training batches."""
    from tqdm.auto import tqdm

    model.train()
    loss_sum = torch.zeros((), device=cfg.device)
    correct = torch.zeros((), dtype=torch.int64, device=cfg.device)
    n = 0
    total = math.ceil(dataset.x_train.shape[0] / cfg.batch_size)
    bar = tqdm(
        dataset.batches("train", cfg.batch_size, generator),
        total=total,
        leave=False,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not cfg.progress,
    )
    for x, y in bar:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.optimizer.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        n += y.numel()
        if cfg.progress and bar.n % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}")
    return loss_sum.item() / n, correct.item() / n


def _write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file, so a reader never sees half a log."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg``; with ``resume``, continue from ``<out>/checkpoint.pt``.

    A resumed run keeps the checkpoint's configuration except ``RESUME_OVERRIDES``: ``epochs``
    (which may be raised to train longer), ``device``, ``data_dir``, ``progress``, ``plots`` and
    ``out``. Each epoch rewrites ``<out>/checkpoint.pt`` (model, optimizer, scheduler and
    random-generator states, history) and ``<out>/log.json``; with ``cfg.plots`` the PNG plots of
    :func:`~bnnops.train.plot_history` are written at the end.

    Returns:
        The log: a dict with ``config``, ``history`` (one dict per epoch: ``epoch``,
        ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``rate``, ``seconds``,
        ``flip_ratio`` per binary layer), ``train_seconds``, ``best_test_acc``,
        ``final_test_acc``, ``dataset`` (its info), ``train_samples``, ``test_samples``.

    Raises:
        FileNotFoundError when ``resume`` finds no checkpoint; ValueError when the model cannot
        take the dataset's inputs, or for an unknown model, dataset or optimizer.
    """
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    ckpt = None
    if resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=cfg.device, weights_only=True)
        keep = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if getattr(cfg, k) is not None}
        cfg = dataclasses.replace(TrainConfig(**ckpt["config"]), **keep)

    dataset = data.load(cfg.dataset, seed=cfg.data_seed, data_dir=cfg.data_dir)
    if cfg.limit is not None:
        dataset = dataset.subset(cfg.limit)
    dataset.to(cfg.device)
    weight_quantizer = "ste_sign" if cfg.optimizer == "latent-adam" else None
    torch.manual_seed(cfg.seed)  # the initial weights; batch order has its own generator
    try:
        model = models.build(cfg.model, dataset.input_shape, dataset.num_classes, weight_quantizer).to(cfg.device)
        with torch.no_grad():
            model.eval()(next(dataset.batches("test", 1))[0])  # as training sees it (CIFAR: scaled floats)
    except (IndexError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"model {cfg.model!r} does not take dataset {cfg.dataset!r}'s inputs of shape "
            f"{tuple(dataset.input_shape)}: {e}"
        ) from e
    opt = Optimization(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, start, seconds = [], 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimization"])
        generator.set_state(ckpt["generator"])
        history, start, seconds = ckpt["history"], ckpt["epoch"], ckpt["train_seconds"]

    def log() -> dict[str, Any]:
        accs = [h["test_acc"] for h in history]
        return {
            "config": dataclasses.asdict(cfg),
            "history": history,
            "train_seconds": seconds,
            "best_test_acc": max(accs, default=None),
            "final_test_acc": accs[-1] if accs else None,
            "dataset": {k: v for k, v in dataset.info.items() if k != "teacher"},
            "train_samples": dataset.x_train.shape[0],
            "test_samples": dataset.x_test.shape[0],
        }

    for epoch in range(start + 1, cfg.epochs + 1):
        rate = opt.rate
        t0 = time.perf_counter()
        train_loss, train_acc = _train_epoch(model, dataset, opt, cfg, generator, epoch)
        seconds += time.perf_counter() - t0
        flip_ratio = opt.end_epoch()
        test_loss, test_acc = evaluate(model, dataset, max(cfg.batch_size, 500))
        history.append(
            dict(
                epoch=epoch,
                train_loss=train_loss,
                train_acc=train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                rate=rate,
                seconds=seconds,
                flip_ratio=flip_ratio,
            )
        )
        if cfg.progress:
            mean_flips = sum(flip_ratio.values()) / max(len(flip_ratio), 1)
            print(
                f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f} | test loss {test_loss:.4f} "
                f"acc {test_acc:.4f} | rate {rate:.3g} | mean flip ratio {mean_flips:.2e}",
                file=sys.stderr,
            )
        torch.save(
            {
                "config": dataclasses.asdict(cfg),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimization": opt.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "train_seconds": seconds,
            },
            ckpt_path + ".tmp",
        )
        os.replace(ckpt_path + ".tmp", ckpt_path)
        _write_json(os.path.join(cfg.out, "log.json"), log())
    if cfg.plots:
        plot_history(history, cfg.out)
    return log()
