"""The MNIST-1D evidence driver (bench/mnist1d_evidence.py) and its report, wired end to end on
one-epoch runs of tiny models: what a run records, resuming, the studies' runs, and the report's
tables and plots. Accuracies are not checked here: bench/results/mnist1d holds them."""

import functools
import json
import os

import pytest

from bench import mnist1d_evidence as ev
from bench.mnist1d_report import report
from bnnops import data


def test_study_runs_and_keys():
    """Every study lists distinct runs (one file each): seed 0 of the main arms first, then the
    grid, then seed by seed, the binary CNNs wider than the main one last; optimizers that cannot
    train a model are refused."""
    runs = ev.evidence_runs(ev.STUDIES, seeds=2, epochs=3)
    assert len({r.key for r in runs}) == len(runs)
    assert runs[0] == ev.Run("cnn", ev.CNN_WIDTH, "bop", 0, 3)
    costly = [r.model == "cnn" and r.width > ev.CNN_WIDTH for r in runs]
    assert any(costly) and costly == sorted(costly)
    grid = len(ev.GRID_GAMMAS) * len(ev.GRID_THRESHOLDS)
    assert all(r.seed == 0 and r.split == "test" for r in runs[:8])  # 6 binary arms, 2 float
    assert all(r.split == "validation" for r in runs[8 : 8 + grid])
    rest = [r.seed for r, c in zip(runs[8 + grid :], costly[8 + grid :]) if not c]
    assert rest == sorted(rest) and set(rest) == {0, 1}
    grid = ev.study_runs("grid")
    assert len(grid) == len(ev.GRID_GAMMAS) * len(ev.GRID_THRESHOLDS) >= 16
    assert all(r.split == "validation" and not r.decay for r in grid)
    assert {r.optimizer for r in ev.study_runs("optimizers", seeds=1)} == {"bop", "bop2", "latent-adam"}
    long = ev.study_runs("long", seeds=2, epochs=3)  # its budget is its own: --epochs does not apply
    assert len(long) == 8 and all(r.epochs == ev.LONG_EPOCHS and not r.decay and r.split == "test" for r in long)
    assert {(r.model, r.width, r.optimizer) for r in long} == {
        ("cnn", ev.LONG_WIDTH, "bop"),
        ("cnn", ev.LONG_WIDTH, "bop2"),
        ("cnn", ev.LONG_WIDTH, "latent-adam"),
        ("float_cnn", ev.FLOAT_CNN_WIDTH, "adam"),
    }
    with pytest.raises(ValueError, match="does not train"):
        ev.Run("float_cnn", 4, "bop", 0)
    with pytest.raises(ValueError, match="does not train"):
        ev.Run("cnn", 4, "adam", 0)
    with pytest.raises(ValueError, match="unknown study"):
        ev.study_runs("everything")


def test_runs_resume_and_report(tmp_path, monkeypatch, capsys):
    """One-epoch runs of tiny models on 200 signals write one JSON each with the history, flip
    ratios and stored bytes; a second call skips them; the report writes its tables and plots.
    The data is generated into tmp_path (``$BNNOPS_CACHE``), not the user's cache."""
    monkeypatch.setenv(data.MNIST1D_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_mnist1d_arrays", functools.cache(data._mnist1d_arrays.__wrapped__))
    monkeypatch.setattr(ev, "LIMIT", 200)
    monkeypatch.setattr(ev, "CNN_WIDTH", 3)
    monkeypatch.setattr(ev, "MLP_WIDTH", 5)
    runs = [
        ev.Run("cnn", 3, "bop", 0, 1),
        ev.Run("cnn", 3, "latent-adam", 0, 1),
        ev.Run("mlp", 5, "bop2", 0, 1),
        ev.Run("float_cnn", 25, "adam", 0, 1),
        ev.Run("cnn", 3, "bop", 0, 1, "validation", 1e-2, 1e-7, decay=False),
    ]
    out = str(tmp_path)
    ev.execute(runs, out)
    records = {}
    for r in runs:
        with open(ev.run_path(out, r)) as f:
            records[r.key] = json.load(f)
    cnn = records[runs[0].key]
    assert cnn["run"]["optimizer"] == "bop" and len(cnn["history"]) == 1
    assert set(cnn["history"][0]["flip_ratio"]) == {"conv2", "conv3", "conv4", "fc5"}
    assert 0 <= cnn["final_acc"] <= 1 and cnn["median_abs_m"] >= 0 and cnn["binary_params"] > 0
    assert records[runs[3].key]["binary_params"] == 0 and records[runs[3].key]["history"][0]["flip_ratio"] == {}
    mtimes = [os.path.getmtime(ev.run_path(out, r)) for r in runs]
    ev.execute(runs, out)  # all done: nothing reruns
    assert mtimes == [os.path.getmtime(ev.run_path(out, r)) for r in runs]
    text = report(out, runs)
    assert "binary CNN | 3 | Bop | 1 |" in text and "float CNN (paper) | 25 | Adam (float) | 1 |" in text
    assert "| 0.01 | 1e-07 |" in text
    for name in ("summary.md", "summary.json", "grid.png", "flip_ratio.png", "bytes.png", "accuracy.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert cnn["settings"] == {"limit": 200, "batch": ev.BATCH, "holdout": ev.HOLDOUT}
    # Other settings: the report leaves the runs out (naming them), execute makes them again.
    monkeypatch.setattr(ev, "LIMIT", 100)
    assert "binary CNN | 3 | Bop | 1 |" not in report(out, runs)
    assert "5 run(s) left out, made with settings other than" in capsys.readouterr().err
    assert ev.execute(runs[:1], out) == 1
    with open(ev.run_path(out, runs[0])) as f:
        assert json.load(f)["settings"]["limit"] == 100


def test_report_uses_planned_runs_with_current_settings(tmp_path, capsys):
    """Records outside the plan or made with other settings are left out (named on stderr); a
    record without settings counts as made with LEGACY_SETTINGS, the current constants."""
    from bench.mnist1d_report import planned_runs

    assert ev.settings() == ev.LEGACY_SETTINGS  # the published runs, recorded without settings
    planned, unplanned = ev.Run("cnn", 3, "bop", 0, 1), ev.Run("cnn", 3, "bop", 1, 1)
    records = [
        {"key": planned.key},
        {"key": planned.key, "settings": ev.settings()},
        {"key": planned.key, "settings": dict(ev.settings(), batch=ev.BATCH + 1)},
        {"key": unplanned.key, "settings": ev.settings()},
    ]
    assert planned_runs(records, [planned]) == records[:2]
    err = capsys.readouterr().err
    assert f"1 run(s) left out, not in the study plan: {unplanned.key}" in err
    assert f"1 run(s) left out, made with settings other than {ev.settings()}: {planned.key}" in err


def test_machine_keeps_one_entry_per_invocation(tmp_path):
    """machine.json: an invocation's start entry is completed in place; a later invocation (one
    study run alone) adds its own; the report sums their wall times."""
    out = str(tmp_path)
    first = dict(date="d1", jobs=2, studies=["optimizers"], evidence_wall_seconds=None)
    ev._write_machine(out, first)
    ev._write_machine(out, dict(first, evidence_wall_seconds=600.0, runs_done=3))
    ev._write_machine(out, dict(date="d2", jobs=2, studies=["schedule"], evidence_wall_seconds=300.0, runs_done=1))
    with open(tmp_path / "machine.json") as f:
        machine = json.load(f)
    assert [(i["date"], i["evidence_wall_seconds"]) for i in machine["invocations"]] == [("d1", 600.0), ("d2", 300.0)]
    assert "evidence wall time 15.0 min (2 invocation(s): 10.0, 5.0 min)" in report(out)
