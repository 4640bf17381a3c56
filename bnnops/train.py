"""Train a reference BNN: ``python -m bnnops.train``.

Examples::

    python -m bnnops.train                                   # small-bnn on digits with Bop, CPU-sized
    python -m bnnops.train --optimizer latent-adam --seed 1  # the latent-weight baseline
    python -m bnnops.train --preset paper-cifar10 --data-dir ~/data/cifar-10-batches-py
    python -m bnnops.train --out runs/digits --resume        # continue from runs/digits/checkpoint.pt

Optimizers (the model is the same; only how its binary weights are stored and trained differs):

- ``bop``: binary weights are packed :class:`bnnops.BinaryTensor` parameters trained by
  :class:`bnnops.optim.Bop` (gamma = ``--gamma``, tau = ``--threshold``); every real parameter
  (batch-norm shifts and scales, real layers) by Adam(``--adam-lr``), as in the paper.
- ``bop2``: the same with :class:`bnnops.optim.Bop2ndOrder` (``--sigma``).
- ``latent-adam``: the usual baseline: float latent weights binarized by ``ste_sign`` in every
  forward, trained with every other parameter by Adam(``--adam-lr``); after each step the latent
  weights are clipped to [-1, 1] (larq's ``weight_clip``, as in the paper's baseline).

``--decay F --decay-every E`` multiplies the binary weights' rate (Bop's gamma, or latent-adam's
Adam lr) by F every E epochs; the paper decays gamma x0.1 every 100 epochs on CIFAR-10.

Each epoch: a progress bar, then per-epoch train and test loss and accuracy and each binary
layer's flip ratio (weights flipped per step / weights, averaged over the epoch's steps: larq's
FlipRatio, the quantity the paper reads training through) go to ``<out>/log.json``, and
``<out>/checkpoint.pt`` is rewritten (model, optimizer, scheduler and random-generator states,
history), so ``--resume`` continues exactly where it stopped. At the end ``loss.png``,
``accuracy.png`` and ``flip_ratio.png`` are written to ``<out>``.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from bnnops import data, models
from bnnops.optim import BinaryAndReal, Bop, Bop2ndOrder, split_parameters
from bnnops.summary import is_binary_weight

__all__ = ["OPTIMIZERS", "PRESETS", "RESUME_OVERRIDES", "TrainConfig", "main", "train"]

OPTIMIZERS = ("bop", "bop2", "latent-adam")

# Hyperparameters by preset; explicit command-line values override them. "by_optimizer" holds
# the settings that differ between optimizers.
_PAPER = dict(model="binarynet", dataset="cifar10", adam_lr=1e-2, by_optimizer={"latent-adam": dict(adam_lr=5e-3)})
# CPU-sized runs: the paper's section 5.1 values (gamma 1e-3, tau 1e-6) for Bop, Adam(1e-2) for the
# latent weights, both decayed x0.1 after 20 of 30 epochs; bench/train_evidence.py --sweep shows
# the values tried around them.
_CPU = dict(epochs=30, batch_size=50, gamma=1e-3, threshold=1e-6, adam_lr=1e-2, decay=0.1, decay_every=20)
PRESETS = {
    # The paper's CIFAR-10 run (section 5.2, 91.3% top-1): bnn_optimization/models/binarynet.py,
    # hparams "bop_sec52". The latent baseline takes that file's default optimizer, Adam(5e-3), but
    # keeps bop_sec52's network and batch (the file's "default" hparams use 64 filters, 4096 dense
    # units and batch 256): one network for both, so the optimizers are what differs.
    "paper-cifar10": dict(_PAPER, epochs=500, batch_size=50, gamma=1e-4, threshold=1e-8, decay=0.1, decay_every=100),
    # The paper's hyperparameter study (section 5.1, hparams "bop"): gamma 1e-3, tau 1e-6, batch 100.
    "paper-hparams": dict(_PAPER, epochs=100, batch_size=100, gamma=1e-3, threshold=1e-6, decay=1.0, decay_every=0),
    "digits": dict(_CPU, model="small-bnn", dataset="digits"),
    "teacher-student": dict(_CPU, model="mlp", dataset="teacher-student"),
}
DEFAULT_PRESET = "digits"
# What a resumed run may change; everything else comes from its checkpoint.
RESUME_OVERRIDES = ("epochs", "device", "data_dir", "progress", "plots", "out")


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in the checkpoint and the log).

    gamma / threshold / sigma are Bop's (gamma is the param-group "lr" of the Bop optimizer);
    adam_lr is Adam's rate for the real parameters (bop, bop2) or for all of them (latent-adam).
    ``limit`` keeps only the first ``limit`` training and test samples (quick runs, tests).
    """

    model: str = "small-bnn"
    dataset: str = "digits"
    optimizer: str = "bop"
    epochs: int = 30
    batch_size: int = 50
    gamma: float = 1e-3
    threshold: float = 1e-6
    sigma: float = 1e-2
    adam_lr: float = 1e-2
    decay: float = 1.0
    decay_every: int = 0
    seed: int = 0
    data_seed: int = 0
    data_dir: str | None = None
    limit: int | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "runs/train"
    progress: bool = True
    plots: bool = True

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("decay_every", 0), ("limit", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.decay > 0:
            raise ValueError(f"decay must be > 0 (a factor on the rate), got {self.decay}")
        for name in ("gamma", "sigma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.threshold >= 0 and self.adam_lr >= 0):
            raise ValueError(f"threshold and adam_lr must be >= 0, got {self.threshold} and {self.adam_lr}")

    @classmethod
    def from_preset(cls, preset, **overrides):
        """The preset's settings for ``overrides['optimizer']`` (default bop), then ``overrides``."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        settings = dict(PRESETS[preset])
        by_optimizer = settings.pop("by_optimizer", {})
        settings.update(by_optimizer.get(overrides.get("optimizer", "bop"), {}))
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)


def _binary_weights(model):
    """(name, parameter) of every binary weight (packed, or latent with a weight quantizer)."""
    return [
        (f"{name}.{pname}" if name else pname, p)
        for name, module in model.named_modules()
        for pname, p in module.named_parameters(recurse=False)
        if is_binary_weight(module, pname, p)
    ]


class _Optimization:
    """The optimizer of a run, its rate schedule, and per-layer flip counting."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.weights = _binary_weights(model)
        if cfg.optimizer in ("bop", "bop2"):
            binary, real = split_parameters(model)
            if not binary:
                raise ValueError(f"{cfg.model} has no BinaryTensor weights for Bop to train")
            bop = (
                Bop(binary, lr=cfg.gamma, threshold=cfg.threshold)
                if cfg.optimizer == "bop"
                else Bop2ndOrder(binary, lr=cfg.gamma, threshold=cfg.threshold, sigma=cfg.sigma)
            )
            self.optimizer = BinaryAndReal(bop, torch.optim.Adam(real, lr=cfg.adam_lr))
            decayed = bop
        elif cfg.optimizer == "latent-adam":
            self.optimizer = decayed = torch.optim.Adam(
                [p for p in model.parameters() if p.requires_grad], lr=cfg.adam_lr
            )
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        step = cfg.decay_every if cfg.decay_every > 0 else 1 << 30
        self.scheduler = torch.optim.lr_scheduler.StepLR(decayed, step, cfg.decay)
        self.flips = {name: torch.zeros((), dtype=torch.int64, device=p.device) for name, p in self.weights}
        self.steps = 0

    @property
    def rate(self):
        """The binary weights' current rate: Bop's gamma or latent-adam's lr."""
        return self.scheduler.get_last_lr()[0]

    def step(self):
        latent = self.cfg.optimizer == "latent-adam"
        if latent:
            before = [p.detach() < 0 for _, p in self.weights]
        self.optimizer.step()
        with torch.no_grad():
            for i, (name, p) in enumerate(self.weights):
                if latent:
                    p.clamp_(-1.0, 1.0)  # larq's weight_clip on latent weights
                    self.flips[name] += ((p < 0) != before[i]).sum()
                else:
                    self.flips[name] += self.optimizer.binary.state[p]["flips"]
        self.steps += 1

    def end_epoch(self):
        """Per layer flip ratio over the epoch (flips / weights / steps), then reset; step the schedule."""
        ratios = {
            name.removesuffix(".weight"): self.flips[name].item() / (p.numel() * max(self.steps, 1))
            for name, p in self.weights
        }
        for t in self.flips.values():
            t.zero_()
        self.steps = 0
        self.scheduler.step()
        return ratios

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@torch.no_grad()
def evaluate(model, dataset, batch_size, split="test"):
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over ``split``."""
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


def _train_epoch(model, dataset, opt, cfg, generator, epoch):
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


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def plot_history(history, out):
    """Write loss.png, accuracy.png and flip_ratio.png (log scale, one line per layer) to ``out``."""
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


def train(cfg, resume=False):
    """Run ``cfg`` (a :class:`TrainConfig`); with ``resume``, continue from ``<out>/checkpoint.pt``.

    A resumed run keeps the checkpoint's configuration except ``RESUME_OVERRIDES``: ``epochs``
    (which may be raised to train longer), ``device``, ``data_dir``, ``progress``, ``plots`` and
    ``out``. Returns the log: a dict with ``config``,
    ``history`` (one dict per epoch), ``best_test_acc``, ``final_test_acc``, ``train_seconds``.
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
    opt = _Optimization(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, start, seconds = [], 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimization"])
        generator.set_state(ckpt["generator"])
        history, start, seconds = ckpt["history"], ckpt["epoch"], ckpt["train_seconds"]

    def log():
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


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m bnnops.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=sorted(PRESETS),
        help=f"hyperparameters to start from (default {DEFAULT_PRESET}); the options below override them",
    )
    p.add_argument("--model", choices=sorted(models.MODELS))
    p.add_argument("--dataset", choices=data.DATASETS)
    p.add_argument("--data-dir", help="CIFAR-10's directory (the unpacked cifar-10-batches-py)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default bop")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--gamma", type=float, help="Bop's adaptivity rate (its param-group lr)")
    p.add_argument("--threshold", type=float, help="Bop's threshold tau")
    p.add_argument("--sigma", type=float, help="Bop2ndOrder's second-moment rate")
    p.add_argument("--adam-lr", type=float, help="Adam's lr: real parameters (bop), all parameters (latent-adam)")
    p.add_argument("--decay", type=float, help="multiply gamma (bop) or Adam's lr (latent-adam) by this ...")
    p.add_argument("--decay-every", type=int, help="... every this many epochs (0: never)")
    p.add_argument("--seed", type=int, help="model initialization and batch order (default 0)")
    p.add_argument("--data-seed", type=int, help="digits split / teacher network (default 0)")
    p.add_argument("--limit", type=int, help="use only the first N training and test samples")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--out", help="directory for checkpoint, log and plots (default runs/<preset>-<optimizer>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or epoch lines")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots at the end")
    return p


def main(argv=None):
    args = vars(_parser().parse_args(argv))
    preset, resume = args.pop("preset"), args.pop("resume")
    if args["out"] is None:
        args["out"] = os.path.join("runs", f"{preset}-{args['optimizer'] or 'bop'}")
    saved = None  # the configuration a resumed run was started with: its log's, or its checkpoint's
    log_path, ckpt_path = os.path.join(args["out"], "log.json"), os.path.join(args["out"], "checkpoint.pt")
    if resume and os.path.isfile(log_path):
        with open(log_path) as f:
            saved = json.load(f)["config"]
    elif resume and os.path.isfile(ckpt_path):
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)["config"]
    if saved is not None:
        if args["epochs"] is None:
            # Without --epochs a resumed run trains to the epoch count it was started with.
            args["epochs"] = saved["epochs"]
        # --preset only picks defaults, which a resumed run takes from its checkpoint; an option
        # equal to the saved value changes nothing. Refuse the others rather than drop them.
        changed = [
            f"--{k.replace('_', '-')} {v}"
            for k, v in args.items()
            if v is not None and k not in RESUME_OVERRIDES and saved.get(k) != v
        ]
        if changed:
            raise SystemExit(
                f"--resume continues {args['out']} with its saved configuration; it cannot change "
                f"{', '.join(changed)} (only --epochs, --device, --data-dir, --out and the output "
                "switches). Start a new run with a new --out instead."
            )
    cfg = TrainConfig.from_preset(preset, **args)
    result = train(cfg, resume=resume)
    print(
        f"{cfg.out}: final test accuracy {result['final_test_acc']:.4f}, best {result['best_test_acc']:.4f}, "
        f"{result['train_seconds']:.1f} s training"
    )
    return result


if __name__ == "__main__":
    main()
