"""The training loop: :func:`train` runs a :class:`~bnnops.train.TrainConfig` to its log,
checkpointing every epoch so ``resume=True`` continues exactly where a run stopped, in one process
or in several started by torchrun (DistributedDataParallel)."""

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bnnops import data, models
from bnnops.train import distributed, faults
from bnnops.train.checkpoint import (
    CHECKPOINT,
    LOG,
    PLOTS,
    Checkpoint,
    check_out_dir,
    load_checkpoint,
    remove_run_files,
    remove_temporary_files,
    save_checkpoint,
    write_log,
)
from bnnops.train.config import RESUME_OVERRIDES, TrainConfig
from bnnops.train.faults import crash_point
from bnnops.train.optimization import Optimization
from bnnops.train.plots import plot_history

__all__ = ["describe", "evaluate", "train", "train_epoch"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: data.InMemoryDataset,
    batch_size: int,
    split: str = "test",
    procs: distributed.Processes | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over ``split``; the model's mode
    is restored. With ``procs`` of a multi-process run (its process group joined), each process
    takes every ``world_size``-th batch and the sums are all-reduced: every process gets the
    result for the whole split."""
    procs = procs or distributed.Processes()
    was_training = model.training
    model.eval()
    loss = correct = n = 0  # device tensors after the first batch: one sync at the end, not two a batch
    for i, (x, y) in enumerate(dataset.batches(split, batch_size)):
        if i % procs.world_size != procs.rank:
            continue
        logits = model(x)
        loss = loss + nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct = correct + (logits.argmax(1) == y).sum()
        n += y.numel()
    model.train(was_training)
    if procs.world_size > 1:
        loss, correct, n = distributed.all_reduce_sum([loss, correct, n], dataset.x_test.device)
    return float(loss) / n, int(correct) / n


def train_epoch(
    model: nn.Module,
    dataset: data.InMemoryDataset,
    opt: Optimization,
    cfg: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    procs: distributed.Processes | None = None,
) -> tuple[float, float]:
    """One epoch over the training split: (mean loss, accuracy) of the training batches.

    Every process draws the same global batch of ``cfg.batch_size`` samples and trains on its
    ``tensor_split`` part; its mean loss is weighted by its share, so DistributedDataParallel's
    mean over the processes is the gradient of the global batch's mean loss. A last batch with
    fewer samples than processes is skipped. ``procs`` None: one process."""
    from tqdm.auto import tqdm

    procs = procs or distributed.Processes()
    model.train()
    device = dataset.x_train.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    world, show = procs.world_size, cfg.progress and procs.rank == 0
    bar = tqdm(
        dataset.batches("train", cfg.batch_size, generator),
        total=math.ceil(dataset.x_train.shape[0] / cfg.batch_size),
        leave=False,
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not show,
    )
    for step, (xb, yb) in enumerate(bar):
        if world > 1:
            if xb.shape[0] < world:
                continue
            x, y = xb.tensor_split(world)[procs.rank], yb.tensor_split(world)[procs.rank]
        else:
            x, y = xb, yb
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.optimizer.zero_grad()
        (loss * (y.numel() * world / yb.numel()) if world > 1 else loss).backward()
        opt.step()
        if step == 0:
            crash_point("step", epoch)
        loss_sum += loss.detach() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        n += y.numel()
        if show and bar.n % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}")
    if world > 1:
        total_loss, total_correct, total = distributed.all_reduce_sum([loss_sum, correct, n], device)
        return total_loss / total, total_correct / total
    return loss_sum.item() / n, correct.item() / n


def _optimizer_words(cfg: TrainConfig) -> str:
    if cfg.optimizer == "latent-adam":
        text = f"latent-adam (Adam lr {cfg.adam_lr:g}, eps {cfg.adam_eps:g}, on all parameters"
    else:
        sigma = f", sigma {cfg.sigma:g}" if cfg.optimizer == "bop2" else ""
        text = (
            f"{cfg.optimizer} (gamma {cfg.gamma:g}, threshold {cfg.threshold:g}{sigma}; Adam lr {cfg.adam_lr:g}, "
            f"eps {cfg.adam_eps:g}, on the real parameters"
        )
    return text + (f"; rate x{cfg.decay:g} every {cfg.decay_every} epochs)" if cfg.decay_every else ")")


def describe(
    cfg: TrainConfig, dataset: data.InMemoryDataset, done: int, procs: distributed.Processes, device: torch.device
) -> str:
    """The one-line header of a run: model, data, optimizer, device, output directory, preset,
    epochs and batch; ``done``: epochs already in its checkpoint."""
    where = f"{device}" if procs.world_size == 1 else f"{device.type} x {procs.world_size} processes"
    if done == cfg.epochs:
        epochs = f"all {cfg.epochs} epochs done: nothing to train (raise --epochs to train longer)"
    else:
        epochs = f"epoch {cfg.epochs}" if done + 1 == cfg.epochs else f"epochs {done + 1}-{cfg.epochs}"
    return (
        f"bnnops.train: {cfg.model} on {cfg.dataset} ({dataset.x_train.shape[0]} train / "
        f"{dataset.x_test.shape[0]} test), {_optimizer_words(cfg)}, {where}, out {cfg.out}, "
        f"preset {cfg.preset or 'none'}; {'resuming, ' if done else ''}{epochs}, batch {cfg.batch_size}"
    )


def run_title(cfg: TrainConfig) -> str:
    """What the plots of a run are titled with: model, data, optimizer."""
    return f"{cfg.model} on {cfg.dataset}, {cfg.optimizer}"


def _build_model(cfg: TrainConfig, dataset: data.InMemoryDataset, device: torch.device) -> nn.Module:
    weight_quantizer = "ste_sign" if cfg.optimizer == "latent-adam" else None
    torch.manual_seed(cfg.seed)  # the initial weights; batch order has its own generator
    try:
        model = models.build(cfg.model, dataset.input_shape, dataset.num_classes, weight_quantizer).to(device)
        with torch.no_grad():
            model.eval()(next(dataset.batches("test", 1))[0])  # as training sees it (CIFAR: scaled floats)
    except (IndexError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"model {cfg.model!r} does not take dataset {cfg.dataset!r}'s inputs of shape "
            f"{tuple(dataset.input_shape)}: {e}"
        ) from e
    return model


def _restore(ckpt: Checkpoint, path: str, model: nn.Module, opt: Optimization, generator: torch.Generator) -> None:
    """Load ``ckpt``'s states into the run's objects, naming ``path`` in every error."""
    try:
        model.load_state_dict(ckpt.model)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"{path}: the model state does not fit {ckpt.config.model}: {reason}") from None
    try:
        opt.load_state_dict(ckpt.optimization)
        generator.set_state(ckpt.generator)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: the optimizer or generator state does not fit the run: {e}") from None
    if opt.scheduler.last_epoch != ckpt.epoch or not math.isfinite(opt.rate):
        raise ValueError(
            f"{path}: the rate schedule is at epoch {opt.scheduler.last_epoch} (rate {opt.rate}), the checkpoint "
            f"at epoch {ckpt.epoch}"
        )


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    on_start: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg``; with ``resume``, continue from ``<out>/checkpoint.pt``.

    A new run needs ``cfg.out`` absent or empty unless ``overwrite``, which replaces the run
    files there (:data:`~bnnops.train.checkpoint.RUN_FILES`) when its first epoch is saved.
    Nothing is created before the first epoch ends, so a run that fails or is interrupted before
    leaves no directory behind.

    A resumed run keeps the checkpoint's configuration except ``RESUME_OVERRIDES``: ``epochs``
    (which may be raised to train longer), ``device``, ``data_dir``, ``progress``, ``plots`` and
    ``out``. It first rewrites ``<out>/log.json`` from the checkpoint, the run's single source of
    truth (:mod:`bnnops.train.checkpoint`). Each epoch rewrites ``<out>/checkpoint.pt`` (model,
    optimizer, scheduler and random-generator states, history), then ``<out>/log.json``; with
    ``cfg.plots`` the PNG plots of :func:`~bnnops.train.plot_history` are written at the end.

    Started by torchrun (``WORLD_SIZE`` > 1), every process trains its share of each global
    batch of ``cfg.batch_size`` samples under DistributedDataParallel (gloo on the CPU, nccl on
    CUDA): the gradients are averaged, so every process takes the same Bop and Adam steps. Each
    process keeps batch-norm statistics of its own share; rank 0's are broadcast before each
    evaluation and are the ones saved. Only rank 0 writes files and calls ``on_start``.

    Args:
        on_start: called with the run's header line (:func:`describe`) once the run has been
            checked and set up, before its first epoch.

    Returns:
        The log: a dict with ``config``, ``history`` (one dict per epoch: ``epoch``,
        ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``rate``, ``seconds``,
        ``flip_ratio`` per binary layer), ``train_seconds``, ``best_test_acc``,
        ``final_test_acc``, ``dataset`` (its info), ``train_samples``, ``test_samples``.

    Raises:
        FileNotFoundError when ``resume`` finds no checkpoint, or a dataset's files are missing;
        FileExistsError for a new run in a non-empty ``cfg.out`` without ``overwrite``;
        ValueError for a damaged or foreign checkpoint, a checkpoint past ``cfg.epochs``, a
        device that is not there, a model that cannot take the dataset's inputs, or a batch
        smaller than the number of processes.
    """
    faults.parse(os.environ.get(faults.ENV))  # a misspelt crash point fails now, not never
    procs = distributed.processes()
    device = distributed.resolve_device(cfg.device, procs)
    check_out_dir(cfg.out, resume, overwrite)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        cfg = dataclasses.replace(ckpt.config, **{k: getattr(cfg, k) for k in RESUME_OVERRIDES})
        if ckpt.epoch > cfg.epochs:
            raise ValueError(
                f"{ckpt_path} holds {ckpt.epoch} epochs, more than --epochs {cfg.epochs}: resume with "
                f"--epochs {ckpt.epoch} or more"
            )
    if cfg.batch_size < procs.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} cannot be split across {procs.world_size} processes")

    dataset = data.load(cfg.dataset, seed=cfg.data_seed, data_dir=cfg.data_dir)
    if cfg.limit is not None:
        dataset = dataset.subset(cfg.limit)
    dataset.to(device)
    model = _build_model(cfg, dataset, device)
    opt = Optimization(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, seconds = [], 0.0
    if ckpt is not None:
        _restore(ckpt, ckpt_path, model, opt, generator)
        history, seconds = ckpt.history, ckpt.train_seconds
    start = len(history)
    writer = procs.rank == 0

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

    with distributed.process_group(procs, device):
        forward = model
        if procs.world_size > 1:  # broadcasts rank 0's parameters and buffers
            forward = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if writer and ckpt is not None:
            remove_temporary_files(cfg.out)  # what a killed run left half-written
            write_log(cfg.out, log(), start)
        if writer and on_start is not None:
            on_start(describe(cfg, dataset, start, procs, device))
        for epoch in range(start + 1, cfg.epochs + 1):
            rate = opt.rate
            t0 = time.perf_counter()
            train_loss, train_acc = train_epoch(forward, dataset, opt, cfg, generator, epoch, procs)
            seconds += time.perf_counter() - t0
            flip_ratio = opt.end_epoch()
            if procs.world_size > 1:
                distributed.broadcast_buffers(model)
            test_loss, test_acc = evaluate(model, dataset, max(cfg.batch_size, 500), procs=procs)
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
            if not writer:
                continue
            if cfg.progress:
                mean_flips = sum(flip_ratio.values()) / max(len(flip_ratio), 1)
                print(
                    f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.4f} | test loss {test_loss:.4f} "
                    f"acc {test_acc:.4f} | rate {rate:.3g} | mean flip ratio {mean_flips:.2e}",
                    file=sys.stderr,
                )
            if epoch == 1:  # a new run's first files: what an overwritten run left goes first
                os.makedirs(cfg.out, exist_ok=True)
                remove_run_files(cfg.out, (LOG, *PLOTS))
            state = Checkpoint(
                cfg, epoch, model.state_dict(), opt.state_dict(), generator.get_state(), history, seconds
            )
            save_checkpoint(cfg.out, state)
            crash_point("replaced", epoch)
            write_log(cfg.out, log(), epoch)
            crash_point("epoch", epoch)
        if writer and cfg.plots:
            plot_history(history, cfg.out, run_title(cfg))
        if procs.world_size > 1:
            dist.barrier()  # no process returns before the run's files are whole
    return log()
