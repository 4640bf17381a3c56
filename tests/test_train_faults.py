"""Runs of ``python -m bnnops.train`` that are killed, interrupted or handed damaged files.

A run killed at any point (SIGKILL, through the crash points of :mod:`bnnops.train.faults`:
mid-epoch, inside the checkpoint write, between checkpoint and log, inside the log write) and
resumed ends exactly as a run that was never stopped: bit-identical weights, optimizer and
generator states, the same log (timings aside) and the same files. Ctrl-C leaves nothing
half-written and prints the command that resumes. A damaged or foreign checkpoint, or a damaged
or stale log, never passes unnoticed: the checkpoint is refused with one line naming it and what
is wrong, and the log is rewritten from the checkpoint.

The kill test runs one fixed chain of kills (the suite's); ``BNNOPS_FUZZ_EXAMPLES=N`` adds N
chains of kills at random points and epochs (a longer run by hand, seeded by the example number),
and raises the number of truncated checkpoints tried.
"""

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnnops import train
from bnnops.train import checkpoint, faults, loop

FUZZ = int(os.environ.get("BNNOPS_FUZZ_EXAMPLES", "0"))
EPOCHS = 3
# 200 teacher-student samples, batch 50: 4 steps an epoch; plots would only add time.
ARGS = ["--preset", "teacher-student", "--limit", "200", "--epochs", str(EPOCHS), "--device", "cpu"]
ARGS += ["--no-progress", "--no-plots"]
TIMINGS = ("seconds", "train_seconds")


def _read_json(path):
    return json.loads(Path(path).read_text())


def _without_timings(x):
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


def _assert_same_run(out, ref):
    """``out`` holds what ``ref`` holds: the same files, the same checkpoint bit for bit (timings
    and the directory's name aside), the same log."""
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref)) == ["checkpoint.pt", "log.json"]
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (out, ref))
    assert a["epoch"] == b["epoch"] == EPOCHS
    switches = {"out": "", "progress": None, "plots": None}  # what the resuming command line chose
    assert {**a["config"], **switches} == {**b["config"], **switches}
    assert _without_timings(a["history"]) == _without_timings(b["history"])
    flat_a, flat_b = (
        torch.utils._pytree.tree_flatten([c["model"], c["optimization"], c["generator"]])[0] for c in (a, b)
    )
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        assert type(x) is type(y) and (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y)
    la, lb = (_read_json(os.path.join(d, "log.json")) for d in (out, ref))
    la["config"].update(switches)
    lb["config"].update(switches)
    assert _without_timings(la) == _without_timings(lb)
    assert _without_timings(la["history"]) == _without_timings(a["history"])  # the log is the checkpoint's


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never stopped."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    train.main([*ARGS, "--out", out])
    return out


def _killed_run(out, fault):
    """Run the command in a subprocess that SIGKILLs itself at ``fault``; resume when the run has
    a checkpoint. Returns True if it was killed, False if it ran to the end (the fault came too
    late). Afterwards every file in ``out`` is whole."""
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else []
    done = subprocess.run(
        [sys.executable, "-m", "bnnops.train", *ARGS, "--out", out, *resume],
        env=dict(os.environ, **{faults.ENV: fault}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, -signal.SIGKILL), f"{fault}: {done.stderr[-2000:]}"
    if not os.path.isdir(out):
        return True  # killed before its first checkpoint: nothing on disk, not even the directory
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    # The log is at most one epoch behind the checkpoint, never ahead (absent: killed inside the
    # first log write).
    log_path = os.path.join(out, "log.json")
    history = _read_json(log_path)["history"] if os.path.isfile(log_path) else []
    assert 0 <= ckpt.epoch - len(history) <= 1
    assert _without_timings(history) == _without_timings(ckpt.history[: len(history)])
    return done.returncode != 0


@pytest.mark.slow
def test_killed_anywhere_resumes_bit_identical(tmp_path, reference):
    """Killed inside the checkpoint write of epoch 2 (the half-written temporary file stays, the
    checkpoint of epoch 1 is whole), then between the checkpoint and the log of epoch 3; the last
    resume has nothing left to train and rewrites the stale log. (Kills mid-epoch and inside the
    log write: the random chains by hand, and the Ctrl-C tests below.)"""
    out = str(tmp_path / "run")
    assert _killed_run(out, "checkpoint@2")
    assert os.path.isfile(os.path.join(out, "checkpoint.pt.tmp"))
    assert checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt")).epoch == 1
    assert _killed_run(out, "replaced@3")
    assert len(_read_json(os.path.join(out, "log.json"))["history"]) == EPOCHS - 1
    train.main([*ARGS, "--out", out, "--resume"])
    _assert_same_run(out, reference)


@pytest.mark.skipif(FUZZ == 0, reason="by hand: BNNOPS_FUZZ_EXAMPLES=N kills at random points")
@pytest.mark.parametrize("example", range(FUZZ))
def test_killed_at_random_points_resumes_bit_identical(tmp_path, reference, example):
    rng = random.Random(example)
    out = str(tmp_path / "run")
    for _ in range(rng.randint(1, 6)):
        fault = f"{rng.choice(faults.POINTS)}@{rng.randint(1, EPOCHS)}"
        print(f"example {example}: {fault}")
        if not _killed_run(out, fault):
            break
    train.main([*ARGS, "--out", out, *(["--resume"] if os.path.isdir(out) else [])])
    _assert_same_run(out, reference)


def test_a_bad_fault_spec_is_refused():
    with pytest.raises(ValueError, match="expected <point>@<epoch>"):
        faults.parse("chekpoint@2")
    assert faults.parse("log@3") == ("log", 3) and faults.parse(None) is None


def _interrupt_at(monkeypatch, point, epoch):
    """Raise KeyboardInterrupt (what Ctrl-C raises) at a crash point instead of the kill."""

    def interrupt(p, e):
        if (p, e) == (point, epoch):
            raise KeyboardInterrupt

    for module in (loop, checkpoint):
        monkeypatch.setattr(module, "crash_point", interrupt)


def test_ctrl_c_saves_nothing_half_written_and_says_how_to_resume(tmp_path, reference, monkeypatch, capsys):
    """Ctrl-C inside the log write of epoch 2: the checkpoint of epoch 2 stays, the log of epoch 1,
    no temporary file; the printed command, run as printed, ends as the run never stopped."""
    out = str(tmp_path / "run")
    _interrupt_at(monkeypatch, "log", 2)
    with pytest.raises(SystemExit) as e:
        train.main([*ARGS, "--out", out])
    assert e.value.code == 130
    command = f"python -m bnnops.train --out {shlex.quote(out)} --resume"
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m bnnops.train: interrupted; the last finished epoch is in "
        f"{os.path.join(out, 'checkpoint.pt')}. Resume with: {command}"
    )
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.json"]
    assert checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt")).epoch == 2
    assert len(_read_json(os.path.join(out, "log.json"))["history"]) == 1
    monkeypatch.undo()
    train.main(shlex.split(command)[3:])  # it writes plots: the output switches are the command line's
    for plot in checkpoint.PLOTS:
        os.remove(os.path.join(out, plot))
    _assert_same_run(out, reference)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = str(tmp_path)
    checkpoint.write_log(out, {"epoch": 1}, 1)
    _interrupt_at(monkeypatch, "log", 2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_log(out, {"epoch": 2}, 2)
    assert os.listdir(out) == ["log.json"] and _read_json(os.path.join(out, "log.json")) == {"epoch": 1}


def test_ctrl_c_in_the_first_epoch_leaves_no_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs" / "new"
    _interrupt_at(monkeypatch, "step", 1)
    with pytest.raises(SystemExit) as e:
        train.main([*ARGS, "--out", str(out)])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "python -m bnnops.train: interrupted; no epoch had finished, nothing was saved."
    )
    assert os.listdir(tmp_path) == []


@pytest.fixture
def finished(tmp_path, reference):
    """A copy of the finished reference run (its directory) for one test to damage."""
    return shutil.copytree(reference, tmp_path / "run").as_posix()


def _moved(log, out):
    """``log`` as the run in ``out`` (a copy of the run it describes) writes it."""
    return dict(log, config=dict(log["config"], out=out))


def _resume(out):
    return train.main([*ARGS, "--out", out, "--resume"])


def test_a_stale_log_is_rewritten_from_the_checkpoint(finished):
    """Killed after the epoch-3 checkpoint and before its log: the resume has nothing to train and
    must still leave the log the checkpoint's."""
    path = os.path.join(finished, "log.json")
    log = _moved(_read_json(path), finished)
    stale = dict(log, history=log["history"][:2], final_test_acc=log["history"][1]["test_acc"])
    with open(path, "w") as f:
        json.dump(stale, f)
    assert _without_timings(_resume(finished)) == _without_timings(log)
    assert _read_json(path) == log


@pytest.mark.parametrize("damage", ["{not json", "{}", '{"config": {"epochs": "three"}}', ""])
def test_a_damaged_log_does_not_block_resume(finished, damage):
    path = os.path.join(finished, "log.json")
    log = _moved(_read_json(path), finished)
    with open(path, "w") as f:
        f.write(damage)
    _resume(finished)
    assert _read_json(path) == log


def _rewrite_checkpoint(out, change):
    """Load the checkpoint, apply ``change`` (it edits the state in place, or returns a
    replacement), save it back; its path."""
    path = os.path.join(out, "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    replacement = change(state)
    torch.save(state if replacement is None else replacement, path)
    return path


def _resume_error(out):
    """The one-line message with which resuming ``out`` fails."""
    with pytest.raises(SystemExit) as e:
        _resume(out)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    assert e.value.code.startswith("python -m bnnops.train: error: ")
    return e.value.code


def test_an_unknown_config_key_in_the_checkpoint_is_refused(finished):
    path = _rewrite_checkpoint(finished, lambda s: s["config"].update(momentum=0.9))
    message = _resume_error(finished)
    assert f"{path}: the configuration has unknown key(s) momentum" in message


def _set(*keys, value):
    """A change that sets ``state[k1][k2]... = value``."""

    def change(state):
        for k in keys[:-1]:
            state = state[k]
        state[keys[-1]] = value

    return change


def _delete(*keys):
    """A change that deletes ``state[k1][k2]...``."""

    def change(state):
        for k in keys[:-1]:
            state = state[k]
        del state[keys[-1]]

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: [1, 2, 3], "is not a bnnops.train checkpoint: expected the keys"),
        (_delete("generator"), "is not a bnnops.train checkpoint"),
        (_delete("config", "adam_eps"), "the configuration has no adam_eps"),
        (_set("config", "gamma", value=7.0), r"configuration is invalid: gamma must be in \[0, 1\]"),
        (_set("config", "model", value="resnet"), "configuration is invalid: unknown model 'resnet'"),
        (_set("config", "epochs", value="3"), "configuration is invalid: epochs must be int, got '3'"),
        (_set("config", value="digits"), "the configuration is a str, not a dict"),
        (_set("epoch", value=9), r"epoch must be an integer in \[0, 3\]"),
        (_set("epoch", value=2), "the history must be a list of 2 epochs"),
        (_delete("history", 1, "test_acc"), "history entry 2 is not epoch 2"),
        (_set("history", 0, "test_acc", value="high"), "history entry 1 holds a value that is not a number"),
        (_set("train_seconds", value=-1.0), "train_seconds must be a number >= 0"),
        (_set("generator", value=torch.zeros(3)), "generator must be a torch.Generator state"),
        (_set("generator", value=torch.zeros(3, dtype=torch.uint8)), "the optimizer or generator state does not fit"),
        (_delete("model", "fc1.weight"), "the model state does not fit binary_mlp: .*fc1.weight"),
        (_set("model", "fc1.weight", value=torch.zeros(3, 3)), "the model state does not fit binary_mlp"),
        (_delete("optimization", "scheduler"), "optimization must be a dict with optimizer and scheduler"),
        (_delete("optimization", "optimizer", "binary"), "the optimizer or generator state does not fit"),
        (_set("optimization", "scheduler", "last_epoch", value=1), "the rate schedule is at epoch 1"),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_it(finished, change, match):
    path = _rewrite_checkpoint(finished, change)
    before = Path(path).read_bytes()
    message = _resume_error(finished)
    assert path in message and re.search(match, message), message
    assert Path(path).read_bytes() == before  # refused, not repaired or overwritten


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory):
    """The checkpoint of a 1-epoch run (its path), made once for the truncation examples."""
    out = str(tmp_path_factory.mktemp("one_epoch") / "run")
    train.main([*ARGS, "--epochs", "1", "--out", out])
    return os.path.join(out, "checkpoint.pt")


@settings(max_examples=max(FUZZ, 5), deadline=None)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_a_truncated_checkpoint_is_refused(tmp_path_factory, one_epoch_checkpoint, fraction):
    """Any prefix of a checkpoint (a copy cut short outside bnnops: its own writes are atomic)."""
    out = str(tmp_path_factory.mktemp("truncated") / "run")
    os.makedirs(out)
    whole = Path(one_epoch_checkpoint).read_bytes()
    Path(out, "checkpoint.pt").write_bytes(whole[: int(fraction * len(whole))])
    message = _resume_error(out)
    assert f"{out}/checkpoint.pt is damaged or not a checkpoint" in message


def test_resume_refuses_fewer_epochs_than_the_checkpoint_holds(finished):
    with pytest.raises(SystemExit) as e:
        train.main([*ARGS, "--epochs", "2", "--out", finished, "--resume"])
    assert "holds 3 epochs, more than --epochs 2: resume with --epochs 3 or more" in e.value.code
