import os

import numpy as np
import pytest
import torch

from bnnops import data


def test_digits_split_is_reproducible_and_stratified():
    d = data.digits(seed=0)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.min() == -1.0 and d.x_train.max() == 1.0
    # every class in both splits, in about the test fraction
    counts = torch.bincount(d.y_test, minlength=10).float() / torch.bincount(torch.cat([d.y_train, d.y_test]))
    assert ((counts - 0.2).abs() < 0.01).all()
    again, other = data.digits(seed=0), data.digits(seed=1)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    assert not torch.equal(other.y_train, d.y_train)
    train, test = data._stratified_split(np.arange(100) % 7, 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))  # disjoint, complete


def test_batches_cover_the_split_once():
    d = data.digits(seed=0).subset(130, 70)
    g = torch.Generator().manual_seed(0)
    seen = [y for _, y in d.batches("train", 50, g)]
    assert [len(y) for y in seen] == [50, 50, 30]
    assert sorted(torch.cat(seen).tolist()) == sorted(d.y_train.tolist())
    xs, ys = zip(*d.batches("test", 50))
    assert torch.equal(torch.cat(xs), d.x_test) and torch.equal(torch.cat(ys), d.y_test)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        next(d.batches("val", 10))


def test_cifar10_augment_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    out = data.cifar10_augment(x, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-1.0)  # black in the loader's [-1, 1] scale
    flipped_any = False
    for i in range(16):
        crops = [
            (padded[i, :, dy : dy + 8, dx : dx + 8], flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
        ]
        match = [flip for c, flip in crops if torch.equal(out[i], c.flip(-1) if flip else c)]
        assert match, f"image {i} is not a crop of the padded image"
        flipped_any |= 1 in match
    assert flipped_any
    assert (out == -1.0).any()  # some crop reaches into the black border


def test_teacher_student_labels_are_the_teachers():
    d = data.teacher_student(seed=3, n_train=300, n_test=200, in_features=12, hidden=10, num_classes=5)
    w1, w2 = d.info["teacher"]["w1"], d.info["teacher"]["w2"]
    assert set(w1.unique().tolist()) == {-1.0, 1.0} and w2.shape == (5, 10)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        # the integer logits written out by hand: sum_j w2[c, j] * sign(sum_i w1[j, i] x[i])
        hidden = torch.where(x @ w1.T < 0, -1.0, 1.0)
        logits = torch.stack([(hidden * w2[c]).sum(1) for c in range(5)], 1)
        top2 = logits.topk(2, 1).values
        assert (top2[:, 0] > top2[:, 1]).all(), "a label with a tie"
        assert torch.equal(logits.argmax(1), y)
    assert torch.equal(
        data.teacher_student(seed=3, n_train=300, n_test=200, in_features=12, hidden=10, num_classes=5).x_test, d.x_test
    )
    assert not torch.equal(
        data.teacher_student(seed=4, n_train=300, n_test=200, in_features=12, hidden=10, num_classes=5).info["teacher"][
            "w1"
        ],
        w1,
    )
    assert d.info["majority_accuracy"] == torch.bincount(d.y_test).max().item() / 200
    wide = data.teacher_student(seed=3, n_train=100, n_test=100, in_features=12, hidden=10, num_classes=5, margin=4)
    top2 = data.teacher_logits(wide.x_train, wide.info["teacher"]["w1"], wide.info["teacher"]["w2"]).topk(2, 1).values
    assert (top2[:, 0] - top2[:, 1] >= 4).all()


def test_teacher_is_independent_of_torch_seed():
    # A student initialized after torch.manual_seed(seed) must not draw the teacher's numbers.
    torch.manual_seed(0)
    student_signs = torch.rand(32, 32) < 0.5
    w1 = data.teacher_student(seed=0, n_train=10, n_test=10).info["teacher"]["w1"]
    agree = ((w1 < 0) == student_signs).float().mean().item()
    assert 0.4 < agree < 0.6


def test_load_names():
    assert data.load("digits").name == "digits"
    with pytest.raises(ValueError, match="digits, cifar10, teacher-student, mnist1d"):
        data.load("mnist")


def test_mnist1d_is_the_published_split_and_holds_out_validation(tmp_path):
    """The standard split (4000 / 1000 signals of 40, 10 classes), (N, 1, 40) float32; generated
    once, then read from the cache; holdout n makes the last n training signals the test split."""
    d = data.mnist1d(cache_dir=tmp_path)
    assert data._mnist1d_file(str(tmp_path)).startswith(str(tmp_path / "mnist1d-"))
    assert os.path.isfile(data._mnist1d_file(str(tmp_path)))
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40) and d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64 and set(d.y_train.tolist()) == set(range(10)) and d.num_classes == 10
    assert 0.5 < d.x_train.std().item() < 2 and not torch.equal(d.x_train[:1000], d.x_test)
    data._mnist1d_arrays.cache_clear()  # read back from the file: the same tensors
    again = data.mnist1d(cache_dir=tmp_path)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    v = data.mnist1d(holdout=500, cache_dir=tmp_path)
    assert torch.equal(v.x_train, d.x_train[:3500]) and torch.equal(v.x_test, d.x_train[3500:])
    assert torch.equal(v.y_test, d.y_train[3500:]) and v.info["split"] == "validation"
    with pytest.raises(ValueError, match="holdout"):
        data.mnist1d(holdout=4000, cache_dir=tmp_path)


def test_mnist1d_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install 'bnnops\[train\]'"):
        data.mnist1d(cache_dir=tmp_path / "empty")


def _fake_mnist1d(monkeypatch):
    """Replaces the package's generator by a fast one of the standard shapes; returns the call list."""
    import mnist1d.data

    calls = []
    rng = np.random.default_rng(0)

    def make_dataset(args):
        calls.append(args)
        return {
            "x": rng.standard_normal((4000, 40)),
            "y": rng.integers(0, 10, 4000),
            "x_test": rng.standard_normal((1000, 40)),
            "y_test": rng.integers(0, 10, 1000),
        }

    monkeypatch.setattr(mnist1d.data, "make_dataset", make_dataset)
    return calls


@pytest.mark.parametrize(
    "content",
    ["garbage", "wrong_shape", "labels_out_of_range", "pickled_object", "missing_key", "nan"],
)
def test_mnist1d_cache_file_that_is_not_the_standard_split_is_regenerated(tmp_path, monkeypatch, content):
    """A cache file that is corrupt or holds other arrays is never trusted: the data is made anew
    and the file replaced; a valid file is then read without generating."""
    calls = _fake_mnist1d(monkeypatch)
    path = data._mnist1d_file(str(tmp_path))
    rng = np.random.default_rng(1)
    good = {
        "x": rng.standard_normal((4000, 40)),
        "y": rng.integers(0, 10, 4000),
        "x_test": rng.standard_normal((1000, 40)),
        "y_test": rng.integers(0, 10, 1000),
        "args": np.array("{}"),
    }
    if content == "garbage":
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 not a zip")
    else:
        bad = dict(good)
        if content == "wrong_shape":
            bad["x"] = bad["x"][:, :39]
        elif content == "labels_out_of_range":
            bad["y_test"] = bad["y_test"] + 1
        elif content == "pickled_object":
            bad["args"] = np.array([{"a": 1}], dtype=object)
        elif content == "missing_key":
            del bad["args"]
        else:
            bad["x_test"] = bad["x_test"].copy()
            bad["x_test"][3, 7] = np.nan
        np.savez(path, **bad)
    data._mnist1d_arrays.cache_clear()
    d = data.mnist1d(cache_dir=tmp_path)
    assert len(calls) == 1 and d.x_train.shape == (4000, 1, 40)
    data._mnist1d_arrays.cache_clear()
    again = data.mnist1d(cache_dir=tmp_path)  # the regenerated file is valid: read, not made
    assert len(calls) == 1 and torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    np.savez(path, **good)  # a valid file made elsewhere is used as is
    data._mnist1d_arrays.cache_clear()
    assert torch.equal(data.mnist1d(cache_dir=tmp_path).y_train, torch.from_numpy(good["y"]))
    assert len(calls) == 1
    data._mnist1d_arrays.cache_clear()
