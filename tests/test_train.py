"""The training command and loop (``bnnops.train``): what a run writes, resuming, the presets,
the command line's handling of mistakes, and multi-process training under torchrun. Killed runs
and damaged files: tests/test_train_faults.py."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

from bnnops import BinaryTensor, data, models, train
from bnnops.train import TrainConfig
from bnnops.train.optimization import Optimization


def quick(tmp_path, **overrides):
    """The binary MLP on 100 digits, batch 50 (two steps an epoch), no plots."""
    settings = dict(
        model="binary_mlp",
        optimizer="bop",
        epochs=1,
        limit=100,
        out=str(tmp_path),
        progress=False,
        plots=False,
        device="cpu",
    )
    settings.update(overrides)
    return TrainConfig.from_preset("digits", **settings)


def _write_cifar(root, n):
    """Tiny CIFAR-10 python batches of ``n`` random images each."""
    rng = np.random.default_rng(0)
    for name in data.CIFAR10_FILES:
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": images, b"labels": rng.integers(0, 10, size=n).tolist()}, f, protocol=2)


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
def test_one_epoch_writes_checkpoint_log_and_plots(tmp_path, optimizer):
    result = train.train(quick(tmp_path, model="small_bnn", optimizer=optimizer, plots=True))
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


@pytest.mark.parametrize("optimizer", ["bop2", "latent-adam"])
def test_mnist1d_preset_trains_the_1d_cnn(tmp_path, optimizer):
    """--preset mnist1d: the binary 1-D CNN on MNIST-1D signals, a flip ratio per binary layer."""
    cfg = TrainConfig.from_preset(
        "mnist1d",
        optimizer=optimizer,
        epochs=1,
        limit=200,
        out=str(tmp_path),
        progress=False,
        plots=False,
        device="cpu",
    )
    assert (cfg.dataset, cfg.batch_size) == ("mnist1d", 100)
    log = train.train(cfg)
    (epoch,) = log["history"]
    assert set(epoch["flip_ratio"]) == {"conv2", "conv3", "conv4", "fc5"}
    assert log["train_samples"] == 200 and 0 <= epoch["test_acc"] <= 1 and np.isfinite(epoch["train_loss"])


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
    initial = models.build("binary_mlp", (1, 8, 8), 10, wq).state_dict()
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
    assert cfg.preset == "paper-cifar10"
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
    _write_cifar(data_dir, 8)
    out = str(tmp_path / "run")
    common = [
        "--model",
        "binary_mlp",
        "--dataset",
        "cifar10",
        "--out",
        out,
        "--no-progress",
        "--no-plots",
        "--device",
        "cpu",
    ]
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
    with pytest.raises(ValueError, match="model 'small_bnn' does not take dataset 'teacher-student'"):
        train.train(
            TrainConfig(
                model="small_bnn",
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


def test_module_entry_point_and_a_mistake_in_one_line(tmp_path):
    """``python -m bnnops.train`` runs the command line (bnnops/train/__main__.py); a mistake ends
    with one line on stderr, exit status 1, no traceback, and no directory created."""
    out = tmp_path / "runs" / "none"
    done = subprocess.run(
        [sys.executable, "-m", "bnnops.train", "--resume", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"python -m bnnops.train: error: --resume: no checkpoint at {out / 'checkpoint.pt'} (the directory does "
        "not exist); is --out the run's directory?"
    ]
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_presets_and_the_batch_meaning(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m bnnops.train" in text and "--resume" in text and "--overwrite" in text
    assert all(name in text for name in train.PRESETS)
    assert "torchrun --nproc_per_node" in text and "is the global batch" in text


def _one_line_error(e, capsys):
    """The message a SystemExit puts on stderr (its code when a string, else what argparse wrote)."""
    assert e.value.code != 0
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bnnops.train: error"), message
    return lines[0]


@pytest.mark.parametrize(
    "case, argv, match",
    [
        ("no CIFAR dir", ["--dataset", "cifar10"], "CIFAR-10 needs a local directory: pass --data-dir"),
        ("CIFAR missing", ["--dataset", "cifar10", "--data-dir", "{tmp}/nowhere"], "CIFAR-10 not found in"),
        ("no GPU", ["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "--device cuda"),
        ("bad device", ["--device", "gpu0"], "--device 'gpu0' is not a device torch knows"),
        ("no checkpoint", ["--resume"], "--resume: no checkpoint at .*checkpoint.pt"),
        ("unknown preset", ["--preset", "paper-mnist"], "argument --preset: invalid choice: 'paper-mnist'"),
        ("unknown model", ["--model", "small-bnn"], "argument --model: invalid choice: 'small-bnn'"),
        ("both", ["--resume", "--overwrite"], "not allowed with argument"),
        ("bad value", ["--epochs", "0"], "epochs must be an integer >= 1"),
    ],
)
def test_user_mistakes_end_with_one_line_and_leave_nothing(tmp_path, capsys, case, argv, match):
    out = tmp_path / "run"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--limit", "20", "--no-progress", *argv])
    assert re.search(match, _one_line_error(e, capsys)), case
    assert os.listdir(tmp_path) == []  # no directory left behind


def test_debug_shows_the_error_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(["--out", str(tmp_path / "run"), "--resume", "--debug"])


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--out",
        str(out),
        "--model",
        "binary_mlp",
        "--limit",
        "50",
        "--epochs",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    train.main(argv + ["--no-plots"])
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--seed", "1"])
    message = _one_line_error(e, capsys)
    assert f"--out {out} already holds checkpoint.pt, log.json" in message
    assert "--resume" in message and "--overwrite" in message
    assert (out / "checkpoint.pt").read_bytes() == before
    with pytest.raises(FileExistsError, match="already holds"):
        train.train(quick(out))
    # --overwrite replaces the run's files (a stale plot included) and keeps any other file.
    (out / "loss.png").write_bytes(b"an old plot")
    (out / "notes.txt").write_text("mine")
    result = train.main(argv + ["--seed", "1", "--no-plots", "--overwrite"])
    assert result["config"]["seed"] == 1 and sorted(os.listdir(out)) == ["checkpoint.pt", "log.json", "notes.txt"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["seed"] == 1
    # An empty directory is no run: a new run may use it.
    (tmp_path / "empty").mkdir()
    train.train(quick(tmp_path / "empty"))


def test_header_line_and_plot_titles_name_the_run(tmp_path, capsys, monkeypatch):
    from bnnops.train import plots

    titles = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (titles.append(fig.axes[0].get_title()), save(fig, path))[1])
    out = tmp_path / "run"
    train.main(["--out", str(out), "--model", "binary_mlp", "--limit", "50", "--epochs", "1", "--device", "cpu"])
    header, summary = capsys.readouterr().out.splitlines()
    assert header.startswith("bnnops.train: binary_mlp on digits (50 train / 50 test), bop (gamma 0.001, ")
    assert ", cpu, out " + str(out) + ", preset digits; epoch 1, batch 50" in header
    assert summary.startswith(f"{out}: final test accuracy")
    assert titles == [f"{name}: binary_mlp on digits, bop" for name in ("loss", "accuracy", "flip ratio")]


def test_models_have_one_name_everywhere():
    assert list(models.MODELS) == ["binarynet", "birealnet18", "small_bnn", "binary_mlp", "mnist1d_cnn", "mnist1d_mlp"]
    assert all(models.MODELS[name].__name__ == name for name in models.MODELS)
    assert {TrainConfig.from_preset(p).model for p in ("digits", "teacher-student")} == {"small_bnn", "binary_mlp"}
    assert TrainConfig.from_preset("mnist1d").model == "mnist1d_cnn"
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        TrainConfig(model="mlp")


def test_paper_presets_take_the_papers_settings():
    """hparams of plumerai/rethinking-bnn-optimization's binarynet.py: bop_sec52 (paper-cifar10),
    bop (paper-hparams), default (the latent-weight baseline of both); Keras Adam's epsilon."""
    for preset in ("paper-cifar10", "paper-hparams"):
        latent = TrainConfig.from_preset(preset, optimizer="latent-adam")
        assert (latent.epochs, latent.batch_size, latent.adam_lr, latent.decay, latent.decay_every) == (
            100,
            256,
            5e-3,
            1.0,
            0,
        )
        assert latent.adam_eps == TrainConfig.from_preset(preset).adam_eps == 1e-7
        assert "Departures from the paper's code" in train.PRESETS[preset].doc
    bop = TrainConfig.from_preset("paper-hparams")
    assert (bop.epochs, bop.batch_size, bop.gamma, bop.threshold, bop.adam_lr, bop.decay_every) == (
        100,
        100,
        1e-3,
        1e-6,
        1e-2,
        0,
    )
    assert TrainConfig.from_preset("digits").adam_eps == 1e-8
    # The optimizer takes the epsilon: Adam on the real parameters (bop), on every parameter (latent-adam).
    model = models.binary_mlp(3, (4,), hidden=(5,))
    cfg = TrainConfig.from_preset("paper-cifar10", model="binary_mlp")
    assert Optimization(model, cfg).optimizer.real.param_groups[0]["eps"] == 1e-7
    latent_model = models.binary_mlp(3, (4,), hidden=(5,), weight_quantizer="ste_sign")
    latent = TrainConfig.from_preset("paper-cifar10", model="binary_mlp", optimizer="latent-adam")
    assert Optimization(latent_model, latent).optimizer.param_groups[0]["eps"] == 1e-7


# Run under torchrun by the test below, in each of 2 processes: a new run (train() joins torchrun's
# process group), then its --resume in a process group joined here (a second env:// group in one
# process is not possible); each process saves what it ended with (model, optimizer state), the
# run files it wrote and the samples its model trained on.
_DDP_WORKER = """
import os, sys
import torch
import torch.distributed as dist
import bnnops.train.loop as loop
from bnnops.train import main

ended, writes, samples = {}, [], []


class Recording(loop.Optimization):
    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        ended.update(model=model, optimization=self)
        samples.clear()
        model.register_forward_pre_hook(lambda m, args: samples.append(args[0].shape[0]) if m.training else None)


loop.Optimization = Recording
for name in ("save_checkpoint", "write_log", "plot_history"):
    real = getattr(loop, name)
    setattr(loop, name, lambda *a, _real=real, _name=name, **k: (writes.append(_name), _real(*a, **k))[1])
out, dump = sys.argv[1:]
argv = ["--preset", "teacher-student", "--limit", "300", "--no-progress", "--device", "cpu", "--out", out]
main(argv + ["--epochs", "1", "--no-plots"])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="file://" + os.path.join(dump, "group"), rank=rank, world_size=2)
main(argv + ["--epochs", "2", "--resume"])
dist.destroy_process_group()
state = {k: v.state_dict() for k, v in ended.items()}
torch.save(dict(state, writes=writes, samples=samples), os.path.join(dump, f"rank{rank}.pt"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes_train_one_model(tmp_path):
    """Under ``torchrun --nproc_per_node 2``, a run and its ``--resume``: each process trains on
    its half of every batch, both end with the same weights and optimizer state, and only rank 0
    prints and writes the run's files."""
    out, dump = tmp_path / "run", tmp_path / "ranks"
    dump.mkdir()
    (tmp_path / "worker.py").write_text(textwrap.dedent(_DDP_WORKER))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(tmp_path / "worker.py"), str(out), str(dump)],
        capture_output=True,
        text=True,
        # One thread a process, so two processes do not oversubscribe a 2-core CI machine (in a full
        # run on a loaded machine this run once took over 180 s; alone it takes about 17 s).
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()  # rank 0's header and summary of each run, nothing from rank 1
    assert len(lines) == 4 and all(f"{out}: final test accuracy" in line for line in lines[1::2])
    assert all("binary_mlp on teacher-student (300 train / 300 test)" in line for line in lines[::2])
    assert all(", cpu x 2 processes, " in line for line in lines[::2]) and "resuming, epoch 2" in lines[2]
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["writes"] == ["save_checkpoint", "write_log"] + ["write_log", "save_checkpoint", "write_log"] + [
        "plot_history"
    ]
    assert ranks[1]["writes"] == []
    # 300 samples in batches of 50, each split 25 / 25: the resumed epoch is 6 steps of 25 samples.
    assert ranks[0]["samples"] == ranks[1]["samples"] == [25] * 6
    for a, b in (
        (ranks[0]["model"], ranks[1]["model"]),
        (ranks[0]["optimization"], ranks[1]["optimization"]),
        (ranks[0]["model"], torch.load(out / "checkpoint.pt", weights_only=True)["model"]),
    ):
        flat_a, flat_b = (torch.utils._pytree.tree_flatten(x)[0] for x in (a, b))
        assert len(flat_a) == len(flat_b) > 0
        for x, y in zip(flat_a, flat_b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    m = [r["optimization"]["optimizer"]["binary"]["state"] for r in ranks]
    assert m[0] and all(torch.equal(m[0][k]["m"], m[1][k]["m"]) for k in m[0])  # Bop's steps were the same
    log = json.loads((out / "log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2] and log["train_samples"] == 300
