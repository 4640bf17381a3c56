import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_data import _write_cifar

from bnnops import BinaryTensor, models, train
from bnnops.train import TrainConfig


def quick(tmp_path, **overrides):
    """The binary MLP on 100 digits, batch 50 (two steps an epoch), no plots."""
    settings = dict(
        model="mlp", optimizer="bop", epochs=1, limit=100, out=str(tmp_path), progress=False, plots=False, device="cpu"
    )
    settings.update(overrides)
    return TrainConfig.from_preset("digits", **settings)


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_one_epoch_writes_checkpoint_log_and_plots(tmp_path, optimizer):
    result = train.train(quick(tmp_path, model="small-bnn", optimizer=optimizer, plots=True))
    for name in ("checkpoint.pt", "log.json", "loss.png", "accuracy.png", "flip_ratio.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    with open(tmp_path / "log.json") as f:
        log = json.load(f)
    assert log["config"]["optimizer"] == optimizer and log["train_samples"] == 100
    (epoch,) = log["history"]
    assert all(torch.isfinite(torch.tensor(epoch[k])) for k in ("train_loss", "test_loss"))
    assert 0 <= epoch["test_acc"] <= 1 and result["final_test_acc"] == epoch["test_acc"]
    assert set(epoch["flip_ratio"]) == {"conv1", "conv2", "conv3", "fc4", "fc5"}
    assert all(0 <= r <= 1 for r in epoch["flip_ratio"].values())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert isinstance(ckpt["model"]["conv2.weight"], BinaryTensor) == (optimizer != "latent-adam")


@pytest.mark.parametrize("optimizer", ["bop", "latent-adam"])
def test_training_lowers_the_loss(tmp_path, optimizer):
    # 300 digits, 3 epochs: both optimizers fit the training set better than at the start.
    result = train.train(quick(tmp_path, optimizer=optimizer, limit=300, epochs=3))
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert result["final_test_acc"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("optimizer", ["bop", "latent-adam"])
def test_flip_ratio_counts_the_sign_changes(tmp_path, optimizer):
    # One step in the epoch (limit = batch size): the flips of that step are the signs that differ
    # between the initial model (same seed) and the trained one.
    cfg = quick(tmp_path, optimizer=optimizer, limit=50)
    result = train.train(cfg)
    torch.manual_seed(cfg.seed)
    wq = "ste_sign" if optimizer == "latent-adam" else None
    initial = models.build("mlp", (1, 8, 8), 10, wq).state_dict()
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    for layer, ratio in result["history"][0]["flip_ratio"].items():
        before, after = (sd[f"{layer}.weight"] for sd in (initial, final))
        changed = ((before.detach() < 0) != (after < 0)).sum().item()
        assert ratio * before.numel() == pytest.approx(changed), layer
    assert sum(result["history"][0]["flip_ratio"].values()) > 0


def test_resume_continues_exactly(tmp_path):
    straight = train.train(quick(tmp_path / "a", epochs=2))
    train.train(quick(tmp_path / "b", epochs=1))
    resumed = train.train(quick(tmp_path / "b", epochs=2), resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for a, b in zip(straight["history"], resumed["history"]):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    sa, sb = (torch.load(p / "checkpoint.pt", weights_only=True)["model"] for p in (tmp_path / "a", tmp_path / "b"))
    for key in sa:
        assert torch.equal(
            sa[key].dequantize() if isinstance(sa[key], BinaryTensor) else sa[key],
            sb[key].dequantize() if isinstance(sb[key], BinaryTensor) else sb[key],
        ), key
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train(quick(tmp_path / "c"), resume=True)


def test_cli_presets_and_overrides(tmp_path, capsys):
    cfg = TrainConfig.from_preset("paper-cifar10")
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size) == ("binarynet", "cifar10", 500, 50)
    assert (cfg.gamma, cfg.threshold, cfg.adam_lr, cfg.decay, cfg.decay_every) == (1e-4, 1e-8, 1e-2, 0.1, 100)
    assert TrainConfig.from_preset("paper-cifar10", optimizer="latent-adam").adam_lr == 5e-3
    assert TrainConfig.from_preset("paper-cifar10", gamma=3e-4, batch_size=None).gamma == 3e-4
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("paper-mnist")
    out = tmp_path / "cli"
    argv = ["--limit", "50", "--epochs", "1", "--out", str(out), "--no-progress", "--gamma", "2e-3", "--device", "cpu"]
    result = train.main(argv)
    assert result["config"]["gamma"] == 2e-3 and result["history"][-1]["rate"] == 2e-3
    # --resume without --epochs trains to the epochs the run started with: nothing left to do.
    resume = ["--out", str(out), "--no-progress", "--device", "cpu", "--resume"]
    assert len(train.main(resume)["history"]) == 1
    assert "final test accuracy" in capsys.readouterr().out
    # Repeating the run's own options is fine; changing one the checkpoint fixes is refused, not dropped.
    assert len(train.main(argv + ["--resume"])["history"]) == 1
    with pytest.raises(SystemExit, match="cannot change --gamma 0.005"):
        train.main(resume + ["--gamma", "5e-3"])
    os.remove(out / "log.json")  # the checkpoint alone still names the saved configuration
    with pytest.raises(SystemExit, match="cannot change --gamma 0.005"):
        train.main(resume + ["--gamma", "5e-3"])


def test_cifar10_run_and_resume_keep_the_data_dir(tmp_path):
    """A CIFAR-10 run (uint8 images, scaled by the loader) trains; --resume without --data-dir
    reads the directory the checkpoint names."""
    data_dir = tmp_path / "cifar"
    data_dir.mkdir()
    _write_cifar(data_dir, [8] * 6, np.random.default_rng(0))
    out = str(tmp_path / "run")
    common = ["--model", "mlp", "--dataset", "cifar10", "--out", out, "--no-progress", "--no-plots", "--device", "cpu"]
    first = train.main(common + ["--data-dir", str(data_dir), "--epochs", "1", "--batch-size", "4"])
    assert len(first["history"]) == 1
    assert (
        len(
            train.main(["--out", out, "--no-progress", "--no-plots", "--device", "cpu", "--resume", "--epochs", "2"])[
                "history"
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(batch_size=-5), "batch_size must be"),
        (dict(limit=0), "limit must be"),
        (dict(decay_every=-1), "decay_every must be"),
        (dict(decay=-1.0), "decay must be > 0"),
        (dict(gamma=2.5), r"gamma must be in \[0, 1\]"),
    ],
)
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_model_that_cannot_take_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="model 'small-bnn' does not take dataset 'teacher-student'"):
        train.train(
            TrainConfig(
                model="small-bnn",
                dataset="teacher-student",
                limit=20,
                epochs=1,
                device="cpu",
                out=str(tmp_path),
                progress=False,
                plots=False,
            )
        )


def test_gamma_decays_every_n_epochs(tmp_path):
    result = train.train(quick(tmp_path, limit=50, epochs=3, gamma=1e-3, decay=0.1, decay_every=2))
    rates = [h["rate"] for h in result["history"]]
    assert rates == pytest.approx([1e-3, 1e-3, 1e-4])


def test_module_entry_point():
    """``python -m bnnops.train`` runs the command line (bnnops/train/__main__.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "bnnops.train", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage: python -m bnnops.train" in done.stdout and "--resume" in done.stdout
