"""The CIFAR-10 reader (``bnnops.data.cifar10``) on valid batches, and on untrusted ones: a batch
must be exactly what CIFAR-10 holds, every error names the file and what was wrong, and a crafted
pickle cannot make numpy read the file's bytes as object pointers (that test runs the reader in a
subprocess, so a crash is a failure rather than the end of pytest)."""

import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bnnops import data


def _write_cifar(root, sizes, rng, protocol=2):
    """Tiny CIFAR-10 python batches: pickled dicts of b'data' (N, 3072) uint8 and b'labels'."""
    written = {}
    for name, n in zip(data.CIFAR10_FILES, sizes):
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(
                {b"batch_label": name.encode(), b"data": images, b"labels": labels, b"filenames": [b"x.png"] * n},
                f,
                protocol=protocol,
            )
        written[name] = (images, labels)
    return written


def _python2_pickle(images, labels):
    """A batch as the published files hold it: written by Python 2's cPickle at protocol 2 with
    numpy 1 (str, read back as bytes, for the keys, the dtype and the raw image bytes)."""

    def string(s):
        return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<i", len(s)) + s

    n = images.shape[0]
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        b"(K\x01" + b"M" + struct.pack("<H", n) + b"M\x00\x0c\x86"  # version 1, shape (n, 3072)
        b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
        b"\x89" + string(images.tobytes()) + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([y]) for y in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reader_on_tiny_batches(tmp_path, protocol):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    written = _write_cifar(root, [3, 2, 4, 1, 2, 5], rng, protocol)
    for where in (root, tmp_path):  # the batches' folder, or its parent
        d = data.cifar10(where)
        assert d.x_train.shape == (12, 3, 32, 32) and d.x_train.dtype == torch.uint8
        assert d.x_test.shape == (5, 3, 32, 32)
        images = np.concatenate([written[f][0] for f in data.CIFAR10_FILES[:5]])
        labels = [label for f in data.CIFAR10_FILES[:5] for label in written[f][1]]
        # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32
        assert np.array_equal(d.x_train.numpy(), images.reshape(12, 3, 32, 32))
        assert d.y_train.tolist() == labels and d.y_test.tolist() == written["test_batch"][1]
    x, _ = next(d.batches("test", 5))
    assert x.dtype == torch.float32
    assert torch.equal(x, d.x_test.float() / 127.5 - 1)  # 0 -> -1, 255 -> 1


def test_cifar10_reader_on_a_python2_batch(tmp_path):
    rng = np.random.default_rng(1)
    _write_cifar(tmp_path, [1] * 6, rng)
    images = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    (tmp_path / "test_batch").write_bytes(_python2_pickle(images, [7, 0, 9]))
    d = data.cifar10(tmp_path)
    assert np.array_equal(d.x_test.numpy(), images.reshape(3, 3, 32, 32)) and d.y_test.tolist() == [7, 0, 9]


def test_cifar10_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch.*downloads nothing"):
        data.cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.load("cifar10")
    _write_cifar(tmp_path, [1] * 6, np.random.default_rng(0))
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="missing data_batch_3$|missing data_batch_3\\."):
        data.cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        data.cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        f.write(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:  # a pickle that would run code when loaded
        pickle.dump(_RunsCode(), f)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        data.cifar10(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return print, ("a pickle ran this",)


# Run in a subprocess: before the reader refused dtype state from the file, this was a SIGSEGV.
CRAFTED_DTYPE = textwrap.dedent(
    """
    import os, pickle, sys
    import numpy as np
    from bnnops import data

    root = sys.argv[1]
    for name in data.CIFAR10_FILES:
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    # A dtype whose state says it holds no Python objects, with an object field: numpy would read
    # the array's bytes as object pointers.
    lying = np.dtype("V8")
    lying.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))
    array = np.frombuffer(b"\\x41" * 8 * 2 * 3072, dtype=lying).reshape(2, 3072)
    crafted = pickle.dumps({b"data": array, b"labels": [0, 1]}, protocol=2)
    spec = b"X\\x02\\x00\\x00\\x00V8"
    assert crafted.count(spec) == 1
    # The same state on a dtype named uint8.
    for blob in (crafted, crafted.replace(spec, b"X\\x02\\x00\\x00\\x00u1")):
        with open(os.path.join(root, "data_batch_2"), "wb") as f:
            f.write(blob)
        try:
            data.cifar10(root)
        except ValueError as e:
            print("refused:", e)
        else:
            print("loaded")
    """
)


def test_crafted_dtype_is_refused_without_touching_the_data(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CRAFTED_DTYPE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"the reader crashed (return code {result.returncode}): {result.stderr[-2000:]}"
    lines = result.stdout.splitlines()
    batch = os.path.join(str(tmp_path), "data_batch_2")
    assert len(lines) == 2 and all(
        line.startswith(f"refused: {batch} is not a CIFAR-10 python batch") for line in lines
    )
    assert "refusing numpy dtype 'V8'" in lines[0]
    assert "refusing numpy dtype 'O8'" in lines[1]  # the object field's dtype, before the state


def _pickle_of(batch):
    return pickle.dumps(batch, protocol=2)


IMAGES = np.zeros((2, 3072), np.uint8)
INVALID = {
    # contents of the right structure, wrong values (each once read as a wrapped or truncated value)
    "label 10": (
        _pickle_of({b"data": IMAGES, b"labels": [0, 10]}),
        "b'labels' must be ints in 0..9, got 10 at index 1",
    ),
    "label -1": (_pickle_of({b"data": IMAGES, b"labels": [-1, 0]}), "got -1 at index 0"),
    "label 255": (_pickle_of({b"data": IMAGES, b"labels": [0, 255]}), "got 255 at index 1"),
    "float label": (_pickle_of({b"data": IMAGES, b"labels": [1.0, 0]}), "got 1.0 at index 0"),
    "bool label": (_pickle_of({b"data": IMAGES, b"labels": [True, 0]}), "got True at index 0"),
    "int64 data": (
        _pickle_of({b"data": np.full((2, 3072), 300, np.int64), b"labels": [0, 1]}),
        "refusing numpy dtype '<i8'|refusing numpy dtype 'i8'",
    ),
    "negative data": (_pickle_of({b"data": np.full((2, 3072), -1, np.int16), b"labels": [0, 1]}), "dtype 'i2'"),
    "float data": (_pickle_of({b"data": np.full((2, 3072), 0.5), b"labels": [0, 1]}), "dtype 'f8'"),
    "uint8 with a byte order": (
        _pickle_of({b"data": IMAGES, b"labels": [0, 1]}).replace(b"X\x01\x00\x00\x00|", b"X\x01\x00\x00\x00<"),
        "refusing a uint8 dtype with the state",
    ),
    "object array": (_pickle_of({b"data": np.array([[b"x"] * 3072] * 2, object), b"labels": [0, 1]}), "dtype 'O8'"),
    "uint8 with fields": (
        _pickle_of({b"data": np.zeros((2, 3072), [("a", "u1")]), b"labels": [0, 1]}).replace(
            b"X\x02\x00\x00\x00V1", b"X\x02\x00\x00\x00u1"
        ),
        "refusing a uint8 dtype with the state .*'a'.*not a plain uint8",
    ),
    "numpy scalar label": (_pickle_of({b"data": IMAGES, b"labels": [np.int64(0), 1]}), "refusing to load numpy"),
    # malformed batches
    "labels an int": (_pickle_of({b"data": IMAGES, b"labels": 3}), "b'labels' must be a list of 2 ints .*got int"),
    "too few labels": (_pickle_of({b"data": IMAGES, b"labels": [0]}), "list of 2 ints .*got 1 labels"),
    "data None": (
        _pickle_of({b"data": None, b"labels": [0, 1]}),
        "b'data' must be a uint8 array of shape \\(N, 3072\\), got NoneType",
    ),
    "data a string": (_pickle_of({b"data": "pixels", b"labels": [0, 1]}), "got str"),
    "data a list": (_pickle_of({b"data": [[0] * 3072] * 2, b"labels": [0, 1]}), "got list"),
    "data 1-D": (
        _pickle_of({b"data": np.zeros(3072, np.uint8), b"labels": [0]}),
        "got uint8 array of shape \\(3072,\\)",
    ),
    "a list": (_pickle_of([IMAGES, [0, 1]]), "not a CIFAR-10 python batch .*got list"),
    "no labels": (_pickle_of({b"data": IMAGES}), "not a CIFAR-10 python batch .*got \\[\"b'data'\"\\]"),
    "str keys": (_pickle_of({"data": IMAGES, "labels": [0, 1]}), "got \\[\"'data'\", \"'labels'\"\\]"),
    "truncated": (_pickle_of({b"data": IMAGES, b"labels": [0, 1]})[:-40], "not a CIFAR-10 python batch"),
    "short raw data": (
        _pickle_of({b"data": IMAGES, b"labels": [0, 1]}).replace(b"M\x00\x0c", b"M\x01\x0c"),
        "shape \\(2, 3073\\) \\(uint8: 6146 bytes\\) made of 6144 bytes",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_batches_are_refused_naming_the_file(tmp_path, case):
    blob, error = INVALID[case]
    _write_cifar(tmp_path, [1] * 6, np.random.default_rng(0))
    (tmp_path / "data_batch_4").write_bytes(blob)
    with pytest.raises(ValueError, match=error) as raised:
        data.cifar10(tmp_path)
    assert str(raised.value).startswith(str(tmp_path / "data_batch_4"))
