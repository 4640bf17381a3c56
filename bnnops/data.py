"""Classification data that needs no download: digits, CIFAR-10 from a local copy, and a
teacher-student task whose best accuracy is known.

Every loader returns an :class:`InMemoryDataset`: train and test tensors held whole in memory
(the largest, CIFAR-10, is 180 MB of uint8), batched by index so no DataLoader workers are
needed. Images come out as float32 in [-1, 1], NCHW, the scaling of the paper's code
(``x / 127.5 - 1`` for 8-bit images).

- :func:`digits`: scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes; the
  data ships inside scikit-learn), split by a seeded stratified permutation.
- :func:`cifar10`: the standard python-pickle batches (``data_batch_1`` ... ``data_batch_5``,
  ``test_batch``) read from a local directory, with the paper's augmentation for training
  (pad to 40x40, random 32x32 crop, random horizontal flip).
- :func:`teacher_student`: random real inputs labelled by a random binary network
  ``y = argmax(W2 sign(W1 x))``; a student of the same architecture can reach 100%.
- :func:`mnist1d`: MNIST-1D (Greydanus 2020), 1-D signals of length 40, 10 classes, generated
  offline by the ``mnist1d`` package (the ``train`` extra) and cached on disk.
"""

import functools
import importlib.metadata
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bnnops.cifar10_reader import read_cifar_batch

__all__ = [
    "CIFAR10_FILES",
    "DATASETS",
    "InMemoryDataset",
    "cifar10",
    "cifar10_augment",
    "digits",
    "load",
    "mnist1d",
    "teacher_logits",
    "teacher_student",
]

CIFAR10_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclass
class InMemoryDataset:
    """Train and test tensors of a classification task.

    Attributes:
        name: the dataset's name (as given to :func:`load`).
        x_train, x_test: inputs, first dimension the sample; float32, or uint8 images that
            :meth:`batches` scales to [-1, 1] float32 batch by batch.
        y_train, y_test: int64 labels in [0, num_classes).
        num_classes: number of classes.
        augment: for training batches only: a function ``(x, generator) -> x`` on a float
            batch (random crops and flips for CIFAR-10), or None.
        info: facts about the data worth logging (split seed, teacher sizes, best accuracy...).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. (1, 8, 8) or (3, 32, 32)."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> "InMemoryDataset":
        """Move the tensors to ``device`` (once, so batches are cut there)."""
        for name in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def subset(self, n_train: int, n_test: int | None = None) -> "InMemoryDataset":
        """The first ``n_train`` training and ``n_test`` test samples (for quick runs and tests)."""
        n_test = n_train if n_test is None else n_test
        return InMemoryDataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.num_classes,
            self.augment,
            dict(self.info),
        )

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` float32 / int64 batches of ``split`` ('train' or 'test').

        Training batches are shuffled with ``generator`` (a torch.Generator on the CPU; the
        permutation is moved to the data's device) and augmented; the last batch may be smaller.
        Test batches come in order, unaugmented.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        n = x.shape[0]
        order = torch.randperm(n, generator=generator) if split == "train" else torch.arange(n)
        order = order.to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = _to_float(x[idx])
            if split == "train" and self.augment is not None:
                xb = self.augment(xb, generator)
            yield xb, y[idx]


def _to_float(x: torch.Tensor) -> torch.Tensor:
    # 8-bit images -> [-1, 1], as the paper's preprocessing: x / (255 / 2) - 1.
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) taking ``test_fraction`` of each class into test, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    # Shuffle across classes so that subset() takes a mix of classes.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def digits(seed: int = 0, test_fraction: float = 0.2) -> InMemoryDataset:
    """scikit-learn's handwritten digits: 1797 grey 8x8 images (16 grey levels), 10 classes.

    Split stratified by class with ``seed`` (default 1438 train / 359 test at 0.2).
    Returns an :class:`InMemoryDataset` with x of shape (N, 1, 8, 8), float32 in [-1, 1].
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32)) / 8.0 - 1.0  # levels 0..16 -> [-1, 1]
    labels = torch.from_numpy(data.target.astype(np.int64))
    train, test = (torch.from_numpy(i) for i in _stratified_split(data.target, test_fraction, seed))
    return InMemoryDataset(
        "digits",
        images[train, None],
        labels[train],
        images[test, None],
        labels[test],
        10,
        info={"split_seed": seed, "test_fraction": test_fraction},
    )


def cifar10_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's CIFAR-10 training augmentation on a float batch (N, C, H, W).

    Pad by 4 black pixels on each side (``resize_with_crop_or_pad`` to 40x40 on the uint8 images
    in the paper's code: value 0, which is -1 in this loader's [-1, 1] scale), take a random HxW
    crop per image, flip each image left-right with probability 1/2.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-1.0)
    dy = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def cifar10(root: str | os.PathLike | None) -> InMemoryDataset:
    """CIFAR-10 from ``root``, a directory holding the standard python-pickle batches.

    Those are the files of ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html),
    unpacked: ``data_batch_1`` ... ``data_batch_5`` (50000 training images) and ``test_batch``
    (10000). ``root`` may also be the parent of the unpacked ``cifar-10-batches-py`` folder.
    Nothing is downloaded.

    Returns an :class:`InMemoryDataset` with uint8 x of shape (N, 3, 32, 32) (batches scale it
    to [-1, 1]) and the paper's training augmentation.

    The files are untrusted input: they are read by an unpickler that builds only what a batch
    holds (no numpy dtype state from the file reaches numpy; see ``_CifarUnpickler``), and each
    batch must be exactly what CIFAR-10 holds: b'data' a uint8 array (N, 3072), b'labels' a list
    of N ints in 0..9.

    Raises:
        FileNotFoundError naming the directory and the missing files.
        ValueError naming the batch file and what was wrong with it.
    """
    if root is None:
        raise FileNotFoundError(
            "CIFAR-10 needs a local directory: pass --data-dir (the unpacked cifar-10-batches-py "
            "folder with data_batch_1..5 and test_batch; nothing is downloaded)"
        )
    root = os.fspath(root)
    if not os.path.exists(os.path.join(root, CIFAR10_FILES[0])):
        nested = os.path.join(root, "cifar-10-batches-py")
        root = nested if os.path.isdir(nested) else root
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root!r}: missing {', '.join(missing)}. Expected the python "
            "version's batches (data_batch_1..5, test_batch), unpacked from cifar-10-python.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html); bnnops downloads nothing."
        )
    train = [read_cifar_batch(os.path.join(root, f)) for f in CIFAR10_FILES[:5]]
    x_test, y_test = read_cifar_batch(os.path.join(root, CIFAR10_FILES[5]))
    return InMemoryDataset(
        "cifar10",
        torch.cat([x for x, _ in train]),
        torch.cat([y for _, y in train]),
        x_test,
        y_test,
        10,
        augment=cifar10_augment,
        info={"root": root},
    )


def teacher_logits(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Integer logits of the binary teacher, ``sign(x @ w1.T) @ w2.T`` (sign(0) = +1); the label is their argmax."""
    hidden = torch.where(x @ w1.T < 0, -1.0, 1.0)
    return hidden @ w2.T


def teacher_student(
    seed: int = 0,
    n_train: int = 8192,
    n_test: int = 2048,
    in_features: int = 32,
    hidden: int = 32,
    num_classes: int = 4,
    margin: float = 1,
) -> InMemoryDataset:
    """A task whose best accuracy is known: labels made by a random binary network.

    The teacher has +-1 weights ``w1`` (hidden, in_features) and ``w2`` (num_classes, hidden)
    drawn with ``seed``; inputs are standard normal (N, in_features) and the label is
    ``argmax(w2 @ sign(w1 @ x))``. The logits are integers; inputs whose top two logits differ by
    less than ``margin`` are redrawn (the default 1 only redraws ties), so every label is
    unambiguous. A student with the teacher's architecture
    (``bnnops.models.binary_mlp(num_classes, (in_features,), hidden=(hidden,))``: real input,
    binary weights, binary hidden activations; at the defaults, the ``mlp`` model of
    ``python -m bnnops.train``) represents the teacher exactly, so 100% test accuracy is
    reachable; ``info['majority_accuracy']`` is the accuracy of always guessing the most common
    class, the floor to beat. The teacher's weights are in ``info['teacher']``.

    Returns an :class:`InMemoryDataset` with float32 x of shape (N, in_features).
    """
    # numpy's PCG64, not torch's generator: a student initialized after torch.manual_seed(seed)
    # would otherwise draw the very numbers the teacher was made of and start at the answer.
    rng = np.random.default_rng(seed)
    w1 = torch.from_numpy(rng.choice([-1.0, 1.0], size=(hidden, in_features)).astype(np.float32))
    w2 = torch.from_numpy(rng.choice([-1.0, 1.0], size=(num_classes, hidden)).astype(np.float32))
    xs, ys, n = [], [], n_train + n_test
    while n > 0:
        x = torch.from_numpy(rng.standard_normal((2 * n, in_features), dtype=np.float32))
        top2 = teacher_logits(x, w1, w2).topk(2, dim=1)
        keep = top2.values[:, 0] - top2.values[:, 1] >= margin
        xs.append(x[keep][:n])
        ys.append(top2.indices[keep, 0][:n])
        n -= xs[-1].shape[0]
    x, y = torch.cat(xs), torch.cat(ys)
    counts = torch.bincount(y[n_train:], minlength=num_classes)
    info = {
        "seed": seed,
        "in_features": in_features,
        "hidden": hidden,
        "majority_accuracy": counts.max().item() / n_test,
        "best_accuracy": 1.0,
        "teacher": {"w1": w1, "w2": w2},
    }
    return InMemoryDataset(
        "teacher-student", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, info=info
    )


MNIST1D_CACHE_ENV = "BNNOPS_CACHE"


def _mnist1d_cache_dir() -> str:
    return os.environ.get(MNIST1D_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "bnnops")


MNIST1D_SHAPES = {"x": (4000, 40), "y": (4000,), "x_test": (1000, 40), "y_test": (1000,)}


def _mnist1d_missing() -> ImportError:
    return ImportError("MNIST-1D needs the mnist1d package: pip install 'bnnops[train]' (or pip install mnist1d)")


def _mnist1d_file(cache_dir: str) -> str:
    """The cache file of the installed ``mnist1d`` package's data, named by its version: the
    package's default arguments (which make the data) belong to its version. Reads the version
    from the package metadata (no import of the package, which takes seconds)."""
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise _mnist1d_missing() from None
    return os.path.join(cache_dir, f"mnist1d-{version}.npz")


def _mnist1d_valid(arrays: dict[str, np.ndarray]) -> bool:
    """Whether ``arrays`` are the standard split: float x of MNIST1D_SHAPES, integer labels in
    [0, 10) of the matching lengths, and the generating arguments (``args``, JSON) recorded."""
    if set(arrays) != {*MNIST1D_SHAPES, "args"} or arrays["args"].dtype.kind != "U" or arrays["args"].ndim != 0:
        return False
    for key, shape in MNIST1D_SHAPES.items():
        a = arrays[key]
        if a.shape != shape or a.dtype.kind not in ("f" if key.startswith("x") else "iu"):
            return False
        if key.startswith("x") and not np.isfinite(a).all():
            return False
        if key.startswith("y") and (a.min() < 0 or a.max() >= 10):
            return False
    return True


def _mnist1d_read(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of the cache file ``path`` if it holds a valid standard split, else None
    (missing, unreadable, holding pickled objects or other arrays)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return arrays if _mnist1d_valid(arrays) else None


@functools.cache
def _mnist1d_arrays(cache_dir: str) -> dict[str, np.ndarray]:
    """The standard MNIST-1D arrays (x, y, x_test, y_test, and ``args``: the package's dataset
    arguments as JSON), generated once per cache directory and process: read from
    ``cache_dir``/mnist1d-<package version>.npz when that holds valid arrays (:func:`_mnist1d_valid`),
    else made by the ``mnist1d`` package (about 6 s) and written there, replacing an invalid file."""
    path = _mnist1d_file(cache_dir)
    arrays = _mnist1d_read(path)
    if arrays is not None:
        return arrays
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise _mnist1d_missing() from None
    args = get_dataset_args()
    made = make_dataset(args)
    arrays = {k: np.asarray(made[k]) for k in MNIST1D_SHAPES}
    arrays["args"] = np.array(json.dumps(vars(args), sort_keys=True, default=str))
    if not _mnist1d_valid(arrays):
        raise ValueError(f"the mnist1d package made data other than the standard split; not cached at {path}")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # whole or not at all, also with several processes at once
    return arrays


def mnist1d(holdout: int = 0, cache_dir: str | os.PathLike | None = None) -> InMemoryDataset:
    """MNIST-1D (Greydanus, "Scaling down deep learning", 2020): the standard split of 4000
    training and 1000 test signals of length 40, 10 classes, as the ``mnist1d`` package makes it
    with its default arguments (``make_dataset(get_dataset_args())``, its own fixed seed).

    Args:
        holdout: 0 (default): train and test as published. n > 0: a validation task for model
            choices: the last n training signals become the test split and the first 4000 - n the
            training split; the published test set is not loaded (never tune on it).
        cache_dir: where the generated arrays are kept (``mnist1d-<package version>.npz``; a
            file there that does not hold the standard split is regenerated); default
            ``$BNNOPS_CACHE`` or ``~/.cache/bnnops``.

    Returns an :class:`InMemoryDataset` with float32 x of shape (N, 1, 40) (one channel, for a
    1-D convolution; the package's scaling: about zero mean and unit variance).

    Raises:
        ImportError: the ``mnist1d`` package is missing (install the ``train`` extra).
        ValueError: holdout outside [0, 4000).
    """
    arrays = _mnist1d_arrays(os.fspath(cache_dir) if cache_dir is not None else _mnist1d_cache_dir())
    x = torch.from_numpy(arrays["x"].astype(np.float32))[:, None]
    y = torch.from_numpy(arrays["y"].astype(np.int64))
    n = x.shape[0]
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in [0, {n}), got {holdout}")
    info = {"holdout": holdout, "split": "validation" if holdout else "test"}
    if holdout:
        return InMemoryDataset(
            "mnist1d", x[: n - holdout], y[: n - holdout], x[n - holdout :], y[n - holdout :], 10, info=info
        )
    x_test = torch.from_numpy(arrays["x_test"].astype(np.float32))[:, None]
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    return InMemoryDataset("mnist1d", x, y, x_test, y_test, 10, info=info)


DATASETS: tuple[str, ...] = ("digits", "cifar10", "teacher-student", "mnist1d")


def load(name: str, seed: int = 0, data_dir: str | os.PathLike | None = None) -> InMemoryDataset:
    """The dataset called ``name`` (one of :data:`DATASETS`); ``seed`` picks the digits split or
    the teacher (MNIST-1D is the published split whatever the seed), ``data_dir`` is CIFAR-10's
    directory."""
    if name == "digits":
        return digits(seed)
    if name == "cifar10":
        return cifar10(data_dir)
    if name == "teacher-student":
        return teacher_student(seed)
    if name == "mnist1d":
        return mnist1d()
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
