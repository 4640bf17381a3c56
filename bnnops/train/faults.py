"""Deterministic crash points, for the tests that kill a run and resume it.

With ``BNNOPS_TRAIN_FAULT=<point>@<epoch>`` in the environment, a run kills its own process with
SIGKILL (no cleanup, as a power cut or the OOM killer would) when it reaches ``<point>`` in epoch
``<epoch>``. The points, in the order an epoch passes them:

- ``step``: after the epoch's first optimizer step (a kill mid-epoch);
- ``checkpoint``: inside the checkpoint write, half of its bytes in the temporary file;
- ``replaced``: the checkpoint in place, the log not yet written;
- ``log``: inside the log write, half of its bytes in the temporary file;
- ``epoch``: the epoch's files all written.

Unset (the normal case), :func:`crash_point` does nothing.
"""

import os
import signal

__all__ = ["ENV", "POINTS", "crash_point", "parse"]

ENV = "BNNOPS_TRAIN_FAULT"
POINTS: tuple[str, ...] = ("step", "checkpoint", "replaced", "log", "epoch")


def parse(spec: str | None) -> tuple[str, int] | None:
    """``"<point>@<epoch>"`` -> (point, epoch); None or "" -> None.

    Raises:
        ValueError for another form, an unknown point, or an epoch below 1: a misspelt fault
        must not pass as a run that never reached it.
    """
    if not spec:
        return None
    point, _, epoch = spec.partition("@")
    if point not in POINTS or not epoch.isdigit() or int(epoch) < 1:
        raise ValueError(f"{ENV}={spec!r}: expected <point>@<epoch>, point one of {', '.join(POINTS)}, epoch >= 1")
    return point, int(epoch)


def crash_point(point: str, epoch: int) -> None:
    """SIGKILL this process if ``BNNOPS_TRAIN_FAULT`` names ``point`` in ``epoch``."""
    if parse(os.environ.get(ENV)) == (point, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
