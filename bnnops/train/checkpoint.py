"""The files of a run's directory: the checkpoint (the run's single source of truth), the log and
plots derived from it, written so that a crash at any point leaves each file whole.

Every file is written to ``<name>.tmp``, flushed to disk and renamed over ``<name>``, so a reader
sees the old file or the new one, never a mix. The checkpoint and the log are two renames, so a
crash between them leaves a log one epoch behind the checkpoint; a resumed run rewrites the log
from the checkpoint before anything else, so the log never decides anything.
"""

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from bnnops.train.config import TrainConfig
from bnnops.train.faults import crash_point

__all__ = [
    "CHECKPOINT",
    "HISTORY_KEYS",
    "LOG",
    "PLOTS",
    "RUN_FILES",
    "Checkpoint",
    "check_out_dir",
    "load_checkpoint",
    "remove_run_files",
    "remove_temporary_files",
    "save_checkpoint",
    "write_log",
]

CHECKPOINT = "checkpoint.pt"
LOG = "log.json"
PLOTS: tuple[str, ...] = ("loss.png", "accuracy.png", "flip_ratio.png")
RUN_FILES: tuple[str, ...] = (CHECKPOINT, LOG, *PLOTS)
# The entries of one epoch of the history; flip_ratio maps each binary layer to its ratio.
HISTORY_KEYS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "rate",
    "seconds",
    "flip_ratio",
)


@dataclass
class Checkpoint:
    """A run after ``epoch`` epochs: what ``--resume`` continues from.

    Attributes:
        config: the run's configuration.
        epoch: epochs done (0 <= epoch <= config.epochs).
        model: the model's state_dict.
        optimization: :meth:`bnnops.train.optimization.Optimization.state_dict`.
        generator: the batch-order generator's state (a uint8 CPU tensor).
        history: one dict per epoch done (keys :data:`HISTORY_KEYS`).
        train_seconds: training time so far, evaluation excluded.
    """

    config: TrainConfig
    epoch: int
    model: dict[str, Any]
    optimization: dict[str, Any]
    generator: torch.Tensor
    history: list[dict[str, Any]]
    train_seconds: float


def _write_atomically(path: str, payload: bytes, point: str, epoch: int) -> None:
    """Write ``payload`` to ``path`` through ``path.tmp`` (flushed to disk, then renamed), so a
    crash leaves the old file or the new one; the temporary file goes on any exception.
    ``point`` / ``epoch``: the crash point (:mod:`bnnops.train.faults`) half-way through."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload[: len(payload) // 2])
            f.flush()
            crash_point(point, epoch)
            f.write(payload[len(payload) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # the rename itself to disk; not every platform can open a directory
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(out: str, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``<out>/checkpoint.pt`` (atomically; module docstring)."""
    state = {f.name: getattr(ckpt, f.name) for f in dataclasses.fields(ckpt)}  # asdict would copy every tensor
    state["config"] = dataclasses.asdict(ckpt.config)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomically(os.path.join(out, CHECKPOINT), buffer.getvalue(), "checkpoint", ckpt.epoch)


def write_log(out: str, log: dict[str, Any], epoch: int) -> None:
    """Write ``log`` as JSON to ``<out>/log.json`` (atomically; module docstring); ``epoch``: the
    epoch it describes."""
    _write_atomically(os.path.join(out, LOG), json.dumps(log, indent=1).encode(), "log", epoch)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_history(history: Any, epoch: int, path: str) -> None:
    if not isinstance(history, list) or len(history) != epoch:
        raise ValueError(f"{path}: the history must be a list of {epoch} epochs (the checkpoint's epoch)")
    for i, h in enumerate(history, 1):
        if not isinstance(h, dict) or set(h) != set(HISTORY_KEYS) or h["epoch"] != i:
            raise ValueError(f"{path}: history entry {i} is not epoch {i} with the keys {', '.join(HISTORY_KEYS)}")
        numbers_ok = all(_is_number(h[k]) for k in HISTORY_KEYS if k != "flip_ratio")
        ratios = h["flip_ratio"]
        if not numbers_ok or not (
            isinstance(ratios, dict) and all(isinstance(k, str) and _is_number(v) for k, v in ratios.items())
        ):
            raise ValueError(f"{path}: history entry {i} holds a value that is not a number")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and check the checkpoint at ``path`` (tensors to ``map_location``). Only tensors and
    plain containers are unpickled (``weights_only``).

    The structure, the configuration (:meth:`TrainConfig.from_dict`) and the history are checked
    here; whether the model and optimizer states fit the configuration's model is checked when
    they are loaded into it.

    Raises:
        FileNotFoundError when there is no file; ValueError naming ``path`` and what is wrong
        when it is not a readable checkpoint of this version of bnnops.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # torch.load's errors for a damaged or foreign file are of many kinds, OSError too
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"{path} is damaged or not a checkpoint ({type(e).__name__}: {first_line}); start a new run "
            "with --overwrite"
        ) from None
    fields = [f.name for f in dataclasses.fields(Checkpoint)]
    if not isinstance(state, dict) or set(state) != set(fields):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a bnnops.train checkpoint: expected the keys {', '.join(fields)}, got {keys}")
    config = TrainConfig.from_dict(state["config"], path)
    epoch, seconds = state["epoch"], state["train_seconds"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch <= config.epochs):
        raise ValueError(f"{path}: epoch must be an integer in [0, {config.epochs}] (the run's epochs), got {epoch!r}")
    if not (_is_number(seconds) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{path}: train_seconds must be a number >= 0, got {seconds!r}")
    if not (isinstance(state["model"], dict) and all(isinstance(k, str) for k in state["model"])):
        raise ValueError(f"{path}: model must be a state_dict (a dict of tensors by name)")
    optimization = state["optimization"]
    if not (isinstance(optimization, dict) and set(optimization) == {"optimizer", "scheduler"}):
        raise ValueError(f"{path}: optimization must be a dict with optimizer and scheduler states")
    generator = state["generator"]
    if not (isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8 and generator.dim() == 1):
        raise ValueError(f"{path}: generator must be a torch.Generator state (a 1-d uint8 tensor)")
    _check_history(state["history"], epoch, path)
    return Checkpoint(config, epoch, state["model"], optimization, generator.cpu(), state["history"], float(seconds))


def check_out_dir(out: str, resume: bool, overwrite: bool) -> None:
    """Check that a run may use the directory ``out``, creating nothing.

    A new run needs ``out`` absent or empty, or ``overwrite``; ``resume`` needs
    ``<out>/checkpoint.pt``; the nearest existing directory on the way to ``out`` must be
    writable.

    Raises:
        ValueError for both ``resume`` and ``overwrite``; FileNotFoundError for ``resume``
        without a checkpoint; FileExistsError for a new run in a non-empty directory without
        ``overwrite``, or ``out`` a file; PermissionError where nothing can be written.
    """
    if resume and overwrite:
        raise ValueError(f"--resume continues the run in {out} and --overwrite replaces it: give one of them")
    if resume:
        ckpt = os.path.join(out, CHECKPOINT)
        if not os.path.isfile(ckpt):
            where = "the directory does not exist" if not os.path.isdir(out) else "it holds no checkpoint"
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt} ({where}); is --out the run's directory?")
    elif os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"--out {out} is a file, not a directory")
        held = sorted(os.listdir(out))
        if held and not overwrite:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise FileExistsError(
                f"--out {out} already holds {shown}: pass --resume to continue that run, --overwrite to "
                "replace it, or choose another --out"
            )
    existing = os.path.abspath(out)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot write in {existing}")


def remove_run_files(out: str, names: tuple[str, ...] = RUN_FILES) -> None:
    """Remove ``names`` (default every file a run writes) and their temporary files from ``out``,
    where present."""
    for name in names:
        for path in (os.path.join(out, name), os.path.join(out, name + ".tmp")):
            if os.path.isfile(path):
                os.remove(path)


def remove_temporary_files(out: str) -> None:
    """Remove the temporary files of :data:`RUN_FILES` from ``out`` (what a killed run left
    half-written), where present."""
    for name in RUN_FILES:
        path = os.path.join(out, name + ".tmp")
        if os.path.isfile(path):
            os.remove(path)
