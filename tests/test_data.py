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
    with pytest.raises(ValueError, match="digits, cifar10, teacher-student"):
        data.load("mnist")
