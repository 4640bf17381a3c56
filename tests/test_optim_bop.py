"""bnnops.optim.Bop / Bop2ndOrder against a plain statement of the rule, on both paths.

``fused=True`` runs the Triton kernel (natively on CUDA, in the interpreter on CPU), ``fused=False``
the PyTorch reference; both must equal the plain rule below bit for bit: m, v, every sign, and the
flip counts.
"""

import collections
import copy
import io

import pytest
import torch
from helpers import FLOAT_DTYPES
from torch import nn

from bnnops import BinaryTensor
from bnnops.optim import Bop, Bop2ndOrder, ThresholdScheduler

# (shape, binary): BinaryTensor weights with ragged packed lengths (numel not a multiple of 32),
# conv weights and rank 1, and dense +-1 weights with and without a ragged tail.
SHAPES = [
    ((6, 40), True),
    ((3, 64), True),
    ((4, 35, 3, 3), True),
    ((7, 45), False),
    ((70,), True),
    ((5, 32, 1, 3), True),
    ((2, 64), False),
]


def plain_rule(signs, m, g, gamma, threshold, v=None, sigma=None):
    """The rule of docs/design.md on dense +-1 ``signs``, elementwise; returns (signs, m, v, flips).

    State is computed in fp32 and stored in its own dtype (bf16 rounds to nearest-even); an element
    with a non-finite gradient is left alone.
    """
    g = g.float()
    finite = torch.isfinite(g)
    m = torch.where(finite, m.float() + gamma * (g - m.float()), m.float()).to(m.dtype)
    m_hat = m.float()
    if v is not None:
        v = torch.where(finite, v.float() + sigma * (g * g - v.float()), v.float()).to(v.dtype)
        m_hat = m_hat / (v.float().sqrt() + 1e-10)
    flip = finite & (signs * m_hat > threshold)
    return torch.where(flip, -signs, signs), m, v, int(flip.sum())


class Model(nn.Module):
    """The weights of SHAPES (binary ones only with ``binary_only``), in two param groups below."""

    def __init__(self, dtype, device, seed=0, binary_only=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        ws = [
            (BinaryTensor.from_float if binary else lambda w: w)(
                torch.where(torch.randn(s, generator=gen) < 0, -1.0, 1.0).to(device, dtype)
            )
            for s, binary in SHAPES
            if binary or not binary_only
        ]
        self.ws = nn.ParameterList([nn.Parameter(w) for w in ws])

    def groups(self, **second):
        return [
            {"params": list(self.ws[:4]), "lr": 0.2, "threshold": 1e-3, **second},
            {"params": list(self.ws[4:]), "lr": 0.05, "threshold": 0.0},
        ]


def signs(p):
    return (p.dequantize() if isinstance(p, BinaryTensor) else p).detach().float().clone()


def random_grads(model, gen, step, device):
    for i, p in enumerate(model.ws):
        # Every third step one parameter has no gradient and must be skipped.
        p.grad = (
            None
            if (step + i) % 3 == 0 and i == step % 6
            else (torch.randn(p.shape, generator=gen) * 0.1).to(device, p.dtype)
        )


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bop_matches_plain_rule(device, dtype, state_dtype, fused):
    model = Model(dtype, device)
    opt = Bop(model.groups(), state_dtype=state_dtype, fused=fused)
    hyper = [(g["lr"], g["threshold"]) for g in opt.param_groups for _ in g["params"]]
    expect = [(signs(p), torch.zeros(p.shape, dtype=state_dtype, device=device)) for p in model.ws]
    gen = torch.Generator().manual_seed(2)
    flipped = 0
    for step in range(6):
        random_grads(model, gen, step, device)
        opt.step()
        for i, p in enumerate(model.ws):
            if p.grad is not None:
                s, m, _, flips = plain_rule(*expect[i], p.grad, *hyper[i])
                expect[i] = (s, m)
                assert opt.state[p]["flips"].item() == flips
                flipped += flips
            assert torch.equal(signs(p), expect[i][0]), (step, i)
            if opt.state[p]:
                m = opt.state[p]["m"]
                assert m.dtype == state_dtype and torch.equal(m, expect[i][1]), (step, i)
    assert flipped > 50


@pytest.mark.parametrize("fused", [False, True])
def test_bop2ndorder_matches_plain_rule(device, fused):
    for dtype, state_dtype in ((torch.float32, torch.float32), (torch.float16, torch.bfloat16)):
        model = Model(dtype, device)
        opt = Bop2ndOrder(model.groups(sigma=0.3), state_dtype=state_dtype, fused=fused)
        assert opt.param_groups[1]["sigma"] == 1e-2  # the default
        hyper = [(g["lr"], g["threshold"], g["sigma"]) for g in opt.param_groups for _ in g["params"]]
        zeros = [torch.zeros(p.shape, dtype=state_dtype, device=device) for p in model.ws]
        expect = [(signs(p), z, z) for p, z in zip(model.ws, zeros)]
        gen = torch.Generator().manual_seed(3)
        for step in range(5):
            random_grads(model, gen, step, device)
            opt.step()
            for i, p in enumerate(model.ws):
                if p.grad is not None:
                    gamma, threshold, sigma = hyper[i]
                    s, m, v, flips = plain_rule(
                        expect[i][0], expect[i][1], p.grad, gamma, threshold, expect[i][2], sigma
                    )
                    expect[i] = (s, m, v)
                    assert opt.state[p]["flips"].item() == flips
                assert torch.equal(signs(p), expect[i][0]), (step, i)
                if opt.state[p]:
                    assert torch.equal(opt.state[p]["m"], expect[i][1]) and torch.equal(opt.state[p]["v"], expect[i][2])


@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_gradients_touch_only_their_elements(device, fused):
    model = Model(torch.float32, device)
    opt = Bop(model.groups(), fused=fused)
    gen = torch.Generator().manual_seed(4)
    random_grads(model, gen, 1, device)
    opt.step()
    before = [(signs(p), opt.state[p]["m"].clone()) for p in model.ws]
    random_grads(model, gen, 1, device)
    bad = []
    for p in model.ws:
        mask = torch.rand(p.shape, generator=gen).to(device) < 0.2
        p.grad[mask] = torch.tensor([float("nan"), float("inf"), float("-inf")], device=device)[
            torch.arange(int(mask.sum()), device=device) % 3
        ]
        bad.append(mask)
    opt.step()
    for p, (s0, m0), mask in zip(model.ws, before, bad):
        m = opt.state[p]["m"]
        assert torch.isfinite(m).all()
        assert torch.equal(m[mask], m0[mask]) and torch.equal(signs(p)[mask], s0[mask])
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        s, m_expect, _, _ = plain_rule(s0, m0, torch.where(mask, 0.0, p.grad), group["lr"], group["threshold"])
        finite = ~mask
        assert torch.equal(m[finite], m_expect[finite]) and torch.equal(signs(p)[finite], s[finite])


@pytest.mark.parametrize("fused", [False, True])
def test_flip_statistics(device, fused):
    model = Model(torch.bfloat16, device)
    opt = Bop(model.groups(), fused=fused)
    assert opt.flip_ratio() is None
    gen = torch.Generator().manual_seed(5)
    random_grads(model, gen, 1, device)
    before = [signs(p) for p in model.ws]
    opt.step()
    changed = [int((signs(p) != s).sum()) for p, s in zip(model.ws, before)]
    stepped = [p for p in model.ws if p.grad is not None]
    assert [opt.state[p]["flips"].item() for p in stepped] == [
        c for p, c in zip(model.ws, changed) if p.grad is not None
    ]
    assert all(
        opt.state[p]["flips"].dtype == torch.int64 and opt.state[p]["flips"].device.type == device for p in stepped
    )
    total = sum(changed)
    assert total > 0
    assert opt.flip_ratio().item() == pytest.approx(total / sum(p.numel() for p in stepped))
    layer = stepped[0]
    assert opt.flip_ratio([layer]).item() == pytest.approx(opt.state[layer]["flips"].item() / layer.numel())


def test_fused_default_and_refusals(device, monkeypatch):
    model = Model(torch.float32, device, binary_only=True)
    for p in model.ws:
        p.grad = torch.randn(p.shape, device=device)
    opt = Bop(model.parameters())
    assert opt._fused(model.ws[0], model.ws[0].grad, opt.param_groups[0]) == (device == "cuda")
    with pytest.raises(ValueError, match="differentiable"):
        Bop(model.parameters(), differentiable=True)
    with pytest.raises(TypeError, match="state_dtype"):
        Bop(model.parameters(), state_dtype=torch.float16)
    with pytest.raises(ValueError, match="lr"):
        Bop(model.parameters(), lr=2.0)
    with pytest.raises(ValueError, match="threshold"):
        Bop(model.parameters(), threshold=-1.0)
    with pytest.raises(TypeError, match="BinaryTensor parameters and dense float"):
        Bop([nn.Parameter(torch.ones(3, dtype=torch.int64, device=device), requires_grad=False)])
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="fused=True.*CUDA"):
            Bop(model.parameters(), fused=True)
        monkeypatch.undo()
    dense = nn.Parameter(torch.tensor([1.0, -1.0, 0.5], device=device))
    dense.grad = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="only \\+1 and -1"):
        Bop([dense]).step()
    sparse = nn.Parameter(torch.ones(4, device=device))
    sparse.grad = torch.ones(4, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Bop([sparse]).step()


def _train(model, opt, scheduler, threshold_scheduler, gen, device, steps, start=0):
    for step in range(start, start + steps):
        random_grads(model, gen, step, device)
        opt.step()
        scheduler.step()
        threshold_scheduler.step()


@pytest.mark.parametrize("fused", [False, True])
def test_resume_equals_uninterrupted_run(device, fused):
    """Save at step k (model, optimizer, both schedulers), load into fresh objects, continue."""

    def build(seed):
        model = Model(torch.bfloat16, device, seed=seed)
        groups = model.groups()
        groups[1]["state_dtype"] = torch.bfloat16
        opt = Bop2ndOrder(groups, fused=fused)  # fp32 m, v for a bf16 parameter: not cast
        gamma = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        tau = ThresholdScheduler(opt, lambda t: 0.9**t)
        return model, opt, gamma, tau

    straight = build(0)
    _train(*straight, torch.Generator().manual_seed(6), device, steps=8)

    first = build(0)
    gen = torch.Generator().manual_seed(6)
    _train(*first, gen, device, steps=4)
    buf = io.BytesIO()
    torch.save([obj.state_dict() for obj in first], buf)
    buf.seek(0)
    resumed = build(1)  # other weights: everything must come from the checkpoint
    for obj, sd in zip(resumed, torch.load(buf, weights_only=True)):
        obj.load_state_dict(sd)
    assert all(s["flips"].dtype == torch.int64 for s in resumed[1].state.values())  # not the bf16 of the weights
    _train(*resumed, gen, device, steps=4, start=4)

    (m0, o0, _, _), (m1, o1, _, _) = straight, resumed
    assert o1.state[m1.ws[0]]["m"].dtype == torch.float32 and o1.state[m1.ws[4]]["m"].dtype == torch.bfloat16
    assert o0.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == 0.2 * 0.5**4
    assert o0.param_groups[1]["threshold"] == o1.param_groups[1]["threshold"] == 0.0
    assert o0.param_groups[0]["threshold"] == o1.param_groups[0]["threshold"] == pytest.approx(1e-3 * 0.9**8)
    for p0, p1 in zip(m0.ws, m1.ws):
        assert torch.equal(signs(p0), signs(p1))
        for key in ("m", "v", "flips"):
            assert torch.equal(o0.state[p0][key], o1.state[p1][key])
            assert o1.state[p1][key].data_ptr() != o0.state[p0][key].data_ptr()
    assert o1.state[m1.ws[2]]["m"].movedim(1, -1).is_contiguous()  # the kernel's layout after loading


def _move_nothing(model, opt):
    pass


def _reallocate_gradients(model, opt):
    opt.zero_grad(set_to_none=True)  # the next gradients are new tensors (at new addresses: see keep)


def _drop_gradients(model, opt):
    # One of the first group's, and all of the second group's: its hyperparameter row is unused.
    dropped = (1, 4, 5, 6)
    for i in dropped:
        model.ws[i].grad = None
    return dropped


def _channels_last_gradients(model, opt):
    for p in model.ws:
        if p.dim() == 4 and p.grad is not None:
            p.grad = p.grad.to(memory_format=torch.channels_last)


def _kernel_transposed_gradients(model, opt):
    # Strides the kernel cannot merge into one row stride: the step reads a contiguous copy.
    for p in model.ws:
        if p.dim() == 4 and p.grad is not None:
            p.grad = p.grad.transpose(2, 3).contiguous().transpose(2, 3)


def _save(checkpoints):
    def save(model, opt):
        checkpoints[id(opt)] = copy.deepcopy((model.state_dict(), opt.state_dict()))

    return save


def _resume(checkpoints):
    def load(model, opt):
        model_state, opt_state = checkpoints[id(opt)]
        model.load_state_dict(model_state)  # copies into the parameters
        opt.load_state_dict(opt_state)  # new m tensors

    return load


def _binary_to_bfloat16(model, opt):
    # The binary weights (ws[:3]) keep their words; only their gradients' dtype changes.
    opt.zero_grad()
    model.ws[:3].to(torch.bfloat16)


def _swap_storage(model, opt):
    binary, dense = model.ws[0], model.ws[3]
    with torch.no_grad():
        torch.utils.swap_tensors(binary, nn.Parameter(BinaryTensor(binary.words.clone(), binary.shape, binary.dtype)))
    dense.data = dense.data.clone()


def test_fused_tables_follow_moved_tensors(device):
    """The fused step keeps its launch tables between steps; every way a weight, state or gradient
    can move must reach the kernel, and a step where nothing moved must reuse the tables.

    A twin model on the reference path gets the same gradients and the same changes: both must stay
    equal bit for bit. Replaced storage is kept alive, so a stale table would update it silently
    instead of the parameter (and fail the comparison) rather than write freed memory.
    """
    fused_model = Model(torch.float32, device)
    models = (fused_model, copy.deepcopy(fused_model))
    opts = [Bop(m.groups(), fused=fused) for m, fused in zip(models, (True, False))]
    gamma = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.97**t) for opt in opts]  # new gamma every step
    gen = torch.Generator().manual_seed(7)
    keep = []
    checkpoints = {}
    steps = [
        (_move_nothing, True),  # the first step builds the tables
        (_move_nothing, False),  # gradients updated in place
        (_reallocate_gradients, False),  # only gradient addresses change: uploaded, tables kept
        (_drop_gradients, True),
        (_channels_last_gradients, True),
        (_kernel_transposed_gradients, True),
        (_move_nothing, False),  # a new copy of those gradients each step: a new address
        (_reallocate_gradients, True),  # back to contiguous gradients
        (_save(checkpoints), False),
        (_move_nothing, False),
        (_resume(checkpoints), True),
        (_binary_to_bfloat16, True),
        (_swap_storage, False),  # moved weights keep their layouts: only the address table changes
        (_move_nothing, False),
    ]
    for step, (change, rebuilt) in enumerate(steps):
        keep += [p.grad for p in fused_model.ws] + [p.detach() for p in fused_model.ws]
        changes = [change(model, opt) or () for model, opt in zip(models, opts)]  # both models alike
        dropped = changes[0]
        grads = [torch.randn(p.shape, generator=gen) * 0.1 for p in fused_model.ws]
        for model in models:
            for i, (p, g) in enumerate(zip(model.ws, grads)):
                if p.grad is None and i not in dropped:
                    p.grad = g.to(device, p.dtype)
                elif p.grad is not None:
                    p.grad.copy_(g)  # in place, keeping the gradient's layout
        for opt, scheduler in zip(opts, gamma):
            opt.step()
            scheduler.step()
        assert opts[0]._steppers[fused_model.ws[0].device].rebuilt == rebuilt, step
        for i, (p_fused, p_ref) in enumerate(zip(*(m.ws for m in models))):
            assert torch.equal(signs(p_fused), signs(p_ref)), (step, i)
            for key in ("m", "flips"):
                assert torch.equal(opts[0].state[p_fused][key], opts[1].state[p_ref][key]), (step, i, key)
        if change is _swap_storage:  # the swapped weights stepped where the parameters now are
            assert all(opts[0].state[models[0].ws[i]]["flips"].item() > 0 for i in (0, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
def test_fused_step_does_not_sync(device):
    model = Model(torch.float32, device)
    opt = Bop(model.groups())
    gen = torch.Generator().manual_seed(8)
    random_grads(model, gen, 1, device)
    opt.step()  # creating the state checks the dense weights' values, which syncs
    grads = []  # made first: copying them to the GPU syncs
    for step in range(2, 5):  # table rebuilds, new gradient addresses and hyperparameters
        random_grads(model, gen, step, device)
        grads.append([p.grad for p in model.ws])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:
            for p, g in zip(model.ws, step_grads):
                p.grad = g
            opt.param_groups[0]["lr"] *= 0.5
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.flip_ratio().item() > 0


def test_threshold_scheduler_checks(device):
    with pytest.raises(TypeError, match="Bop"):
        ThresholdScheduler(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), lambda t: 1.0)
    opt = Bop(Model(torch.float32, device, binary_only=True).groups())
    with pytest.raises(ValueError, match="one per param group"):
        ThresholdScheduler(opt, [lambda t: 1.0])
    sched = ThresholdScheduler(opt, [lambda t: 0.5**t, lambda t: 1.0])
    sched.step()
    assert sched.get_last_threshold() == [0.5e-3, 0.0]
    # A factor that would make the threshold negative is refused, not applied.
    with pytest.raises(ValueError, match="must stay >= 0"):
        ThresholdScheduler(Bop(Model(torch.float32, device, binary_only=True).groups()), lambda t: -1.0)
    # Loading an optimizer checkpoint saved before any threshold scheduler existed keeps working.
    fresh = Bop(Model(torch.float32, device, binary_only=True).groups())
    saved = fresh.state_dict()
    sched = ThresholdScheduler(fresh, lambda t: 0.5**t)
    fresh.load_state_dict(saved)
    sched.step()
    assert sched.get_last_threshold()[0] == 0.5e-3


def test_hyperparameters_checked_when_stepping_and_loading(device):
    model = Model(torch.float32, device, binary_only=True)
    for p in model.ws:
        p.grad = torch.randn(p.shape, device=device)
    opt = Bop(model.parameters(), lr=0.5, threshold=1e-3)
    words = [p.words.clone() for p in model.ws]
    opt.param_groups[0]["threshold"] = -1e-3  # as a buggy schedule would write it
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        opt.step()
    opt.param_groups[0].update(threshold=1e-3, lr=2.5)
    with pytest.raises(ValueError, match=r"lr \(gamma\) must be in \[0, 1\]"):
        opt.step()
    assert all(torch.equal(p.words, w) for p, w in zip(model.ws, words))  # nothing stepped
    # fused is how this optimizer runs, not part of the checkpoint; the other hyperparameters load.
    opt.param_groups[0]["lr"] = 0.5
    fused = Bop(model.parameters(), lr=0.1, fused=True)
    fused.step()
    plain = Bop(model.parameters(), fused=False)
    plain.load_state_dict(fused.state_dict())
    assert plain.param_groups[0]["fused"] is False and plain.param_groups[0]["lr"] == 0.1
    # First- and second-order state do not mix.
    with pytest.raises(ValueError, match="Bop2ndOrder cannot load a Bop state_dict"):
        Bop2ndOrder(model.parameters()).load_state_dict(fused.state_dict())
    second = Bop2ndOrder(model.parameters())
    second.step()
    with pytest.raises(ValueError, match="Bop cannot load a Bop2ndOrder state_dict"):
        Bop(model.parameters()).load_state_dict(second.state_dict())


def test_threshold_scheduler_resumes_from_an_older_checkpoint(device):
    """A scheduler state without base thresholds (an older checkpoint) takes the base the loaded
    optimizer groups carry, in either load order."""

    def make(threshold):
        opt = Bop(Model(torch.float32, device, binary_only=True).ws, threshold=threshold)
        return opt, ThresholdScheduler(opt, lambda t: 0.1**t)

    opt, sched = make(1e-6)
    sched.step()
    saved = opt.state_dict(), {"last_epoch": 1}
    for scheduler_first in (False, True):
        opt, sched = make(1.0)
        if scheduler_first:
            sched.load_state_dict(saved[1])
            opt.load_state_dict(saved[0])
        else:
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
        assert sched.get_last_threshold()[0] == pytest.approx(1e-7)
        sched.step()
        assert sched.get_last_threshold()[0] == pytest.approx(1e-8)


def _stepped(cls, device, **second):
    model = Model(torch.float32, device)
    opt = cls(model.groups(**second))
    random_grads(model, torch.Generator().manual_seed(9), 1, device)  # step 1: every weight has a gradient
    opt.step()
    return model, opt


def _set(key, value):
    return lambda entry: entry.__setitem__(key, value(entry))


_BAD_ENTRIES = [
    # (change to the entry of param_groups[0]['params'][0], a (6, 40) BinaryTensor; error)
    (_set("m", lambda e: e["m"][:1]), r"state 'm' of .* must have the parameter's shape \(6, 40\), got \(1, 40\)"),
    (_set("m", lambda e: torch.tensor(0.5)), r"state 'm' of .* must have the parameter's shape \(6, 40\), got \(\)"),
    (
        _set("m", lambda e: e["m"].to(torch.int32)),
        r"state 'm' of .* must be a floating-point tensor, got a torch.int32",
    ),
    (_set("m", lambda e: e["m"].index_fill(1, torch.tensor([3]), float("nan"))), "state 'm' of .* non-finite"),
    (lambda e: e.pop("m"), r"has no 'm'"),
    (_set("step", lambda e: torch.tensor(3.0)), r"holds \['step'\], which Bop.* does not keep"),
    (_set("flips", lambda e: torch.tensor(2.0)), r"state 'flips' of .* must be one integer"),
]
_BAD_SECOND_ORDER_ENTRIES = [
    (lambda e: e.pop("v"), r"has no 'v'"),
    (_set("v", lambda e: -e["v"] - 1), r"state 'v' of .* holds negative values"),
]


@pytest.mark.parametrize("cls", [Bop, Bop2ndOrder])
def test_load_state_dict_checks_every_state_entry(device, cls):
    """A state entry that breaks a rule of bnnops.optim.bop_state is refused, naming the parameter
    and the entry, before anything loads (no broadcasting of a (1, 40) or 0-dim m into (6, 40))."""
    second = {"sigma": 0.3} if cls is Bop2ndOrder else {}
    model, opt = _stepped(cls, device, **second)
    saved = opt.state_dict()
    bad_entries = _BAD_ENTRIES + (_BAD_SECOND_ORDER_ENTRIES if second else [])
    for change, error in bad_entries:
        state_dict = copy.deepcopy(saved)
        change(state_dict["state"][0])
        fresh = cls(model.groups(**second))
        fresh.param_groups[0]["lr"] = 0.01
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(state_dict id 0\)"):
            fresh.load_state_dict(state_dict)
        with pytest.raises(ValueError, match=error):
            fresh.load_state_dict(state_dict)
        assert not fresh.state and fresh.param_groups[0]["lr"] == 0.01  # nothing loaded
    adam = torch.optim.Adam([nn.Parameter(torch.ones(2, device=device))])
    with pytest.raises(
        ValueError, match=r"cannot load this state_dict: its param_groups\[0\] lacks \['state_dtype', 'threshold'\]"
    ):
        cls([model.ws[0]]).load_state_dict(adam.state_dict())
    fresh = cls(model.groups(**second))
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state[p]["m"], opt.state[p]["m"]) for p in model.ws)


@pytest.mark.parametrize("interruption", [torch.OutOfMemoryError("simulated"), KeyboardInterrupt()])
@pytest.mark.parametrize("fused", [False, True])
def test_interrupted_first_step_leaves_no_partial_state(device, fused, interruption, monkeypatch):
    """An exception while Bop2ndOrder's first step allocates the state (here at v of the first
    parameter) leaves no parameter with m but without v: the next step trains every parameter
    by the second-order rule, as an uninterrupted first step does."""
    model = Model(torch.float32, device)
    twin = copy.deepcopy(model)
    opt, twin_opt = (Bop2ndOrder(m.groups(sigma=0.3), fused=fused) for m in (model, twin))
    for m in (model, twin):
        random_grads(m, torch.Generator().manual_seed(10), 1, device)
    zeros, calls = torch.zeros, []

    def zeros_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the first parameter's m was allocated; its v is next
            raise interruption
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros_then_fail)
    with pytest.raises(type(interruption)):
        opt.step()
    monkeypatch.undo()
    assert len(calls) == 2 and not any(opt.state[p] for p in model.ws)
    opt.step()
    twin_opt.step()
    for p, q in zip(model.ws, twin.ws):
        assert torch.equal(signs(p), signs(q))
        for key in ("m", "v", "flips"):
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key]), key


def test_flip_ratio_of_zero_size_parameters(device):
    """No weights, no flips: the ratio is 0.0, not 0/0."""
    params = [
        nn.Parameter(BinaryTensor.from_float(torch.ones(4, 0, device=device))),
        nn.Parameter(torch.ones(0, 3, device=device)),
    ]
    for p in params:
        p.grad = torch.zeros(p.shape, device=device)
    opt = Bop(params)
    opt.step()
    assert opt.flip_ratio().item() == 0.0


def test_float64_parameters_take_the_reference(device):
    """The kernel reads fp32/bf16/fp16: a dense float64 weight steps by the reference even with
    fused=True, with the same result as fused=False."""
    runs = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(11)
        dense = nn.Parameter(torch.where(torch.randn(7, 45, generator=gen) < 0, -1.0, 1.0).double().to(device))
        dense.grad = torch.randn(7, 45, generator=gen, dtype=torch.float64).to(device)
        opt = Bop([dense], lr=0.5, threshold=0.05, fused=fused)
        opt.step()
        runs.append((signs(dense), opt.state[dense]["m"], opt.state[dense]["flips"]))
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and runs[0][2].item() > 0


# The cached step (bnnops.optim.bop_step_plan.StepPlan and the launch plans of FusedBop) against a twin that
# plans everything anew at every step: the same bits and the same errors, whatever changes between
# steps.


def _plan_anew(opt):
    """Drop the optimizer's step plan and launch plans: its next step plans everything anew."""
    opt._step_plan = None
    opt._steppers.clear()


def _same_state(pair):
    (model_a, opt_a), (model_b, opt_b) = pair
    params_a = [p for group in opt_a.param_groups for p in group["params"]] + list(model_a.ws)
    params_b = [p for group in opt_b.param_groups for p in group["params"]] + list(model_b.ws)
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert a.shape == b.shape and torch.equal(signs(a), signs(b)), i
        state_a, state_b = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert state_a.keys() == state_b.keys(), i
        for key in state_a:
            assert state_a[key].dtype == state_b[key].dtype and torch.equal(state_a[key], state_b[key]), (i, key)


def _stepped_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _binary_param(shape, seed, device):
    w = torch.where(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) < 0, -1.0, 1.0)
    return nn.Parameter(BinaryTensor.from_float(w.to(device)))


_CACHED_STEPS = [
    # (what changes before the step, how the gradients come: "reuse" writes the existing ones in
    # place, "replace" assigns new tensors, whether the cached step keeps its plan)
    ("nothing", "replace", False),
    ("nothing", "reuse", True),
    ("nothing", "replace", True),  # new gradient tensors: addresses only
    ("lr of group 1", "replace", True),
    ("tensor lr, filled in place", "reuse", True),
    ("add a parameter (a new group)", "replace", False),
    ("drop a parameter (group 0 replaced by a new dict without it)", "replace", False),
    ("another shape (a parameter of group 1 replaced in its list)", "replace", False),
    ("channels-last gradients", "replace", False),
    ("a dense weight in bfloat16 (its gradient too)", "replace", False),
    ("state_dtype of group 1, then a parameter appended to it", "replace", False),
    ("no gradient for two parameters", "replace", False),
    ("gradients again", "replace", False),
    ("m replaced from outside", "reuse", True),
    ("state deleted from outside", "reuse", False),
    ("weights moved (.data, swap_tensors)", "reuse", True),
    ("nothing", "replace", True),
]


def _change(what, model, opt, device):
    groups = opt.param_groups
    if what == "lr of group 1":
        groups[1]["lr"] = 0.02
    elif what == "tensor lr, filled in place":
        groups[0]["lr"] = torch.tensor(0.3)
    elif what == "add a parameter (a new group)":
        groups[0]["lr"].fill_(0.1)
        opt.add_param_group({"params": [_binary_param((5, 70), 20, device)], "lr": 0.3, "state_dtype": torch.bfloat16})
    elif what.startswith("drop a parameter"):
        groups[0] = {**groups[0], "params": groups[0]["params"][1:]}
    elif what.startswith("another shape"):
        groups[1]["params"][0] = _binary_param((9, 33), 21, device)
    elif what == "channels-last gradients":
        for p in _stepped_params(opt):
            if p.dim() == 4:
                p.grad = p.grad.to(memory_format=torch.channels_last)
    elif what.startswith("a dense weight in bfloat16"):
        dense = model.ws[3]
        dense.grad = None
        dense.data = dense.data.to(torch.bfloat16)
    elif what.startswith("state_dtype of group 1"):
        groups[1]["state_dtype"] = torch.bfloat16
        groups[1]["params"].append(_binary_param((3, 5, 2, 3), 22, device))
    elif what == "no gradient for two parameters":
        for p in _stepped_params(opt)[1:3]:
            p.grad = None
    elif what == "m replaced from outside":
        p = _stepped_params(opt)[1]
        opt.state[p]["m"] = opt.state[p]["m"].clone().fill_(0.05)  # the packed layout, kept by clone
    elif what == "state deleted from outside":
        del opt.state[_stepped_params(opt)[0]]
    elif what.startswith("weights moved"):
        binary = next(p for p in _stepped_params(opt) if isinstance(p, BinaryTensor))
        torch.utils.swap_tensors(binary, nn.Parameter(BinaryTensor(binary.words.clone(), binary.shape, binary.dtype)))
        model.ws[3].data = model.ws[3].data.clone()


@pytest.mark.parametrize("cls", [Bop, Bop2ndOrder])
def test_cached_step_equals_planning_every_step(device, cls):
    """Across changes of lr, parameter lists, shapes, strides, dtypes, state dtypes, missing
    gradients, state and weights changed from outside, and gradients reused or replaced, the
    cached fused step gives the bits of a twin that plans every step anew (on the reference path,
    whose bits the kernel equals), and keeps its plan exactly where nothing but addresses or
    hyperparameter values changed."""
    second = {"sigma": 0.3} if cls is Bop2ndOrder else {}
    model = Model(torch.float32, device)
    pair = [(m, cls(m.groups(**second), fused=fused)) for m, fused in ((model, True), (copy.deepcopy(model), False))]
    gen = torch.Generator().manual_seed(12)
    channels_last = False
    for step, (what, gradients, kept) in enumerate(_CACHED_STEPS):
        plan = pair[0][1]._step_plan
        for m, opt in pair:
            _change(what, m, opt, device)
        channels_last |= what == "channels-last gradients"
        values = [torch.randn(p.shape, generator=gen) * 0.1 for p in _stepped_params(pair[0][1])]
        for _, opt in pair:
            for p, g in zip(_stepped_params(opt), values):
                if what == "no gradient for two parameters" and p.grad is None:
                    continue  # the two dropped just now
                if gradients == "reuse" and p.grad is not None:
                    p.grad.copy_(g)  # keeps the gradient's layout
                else:
                    g = g.to(device, p.dtype)
                    p.grad = g.to(memory_format=torch.channels_last) if p.dim() == 4 and channels_last else g
        _plan_anew(pair[1][1])
        for _, opt in pair:
            opt.step()
        assert (pair[0][1]._step_plan is plan) == kept, (step, what)
        _same_state(pair)
    assert pair[0][1].flip_ratio().item() > 0


def _replace_state(index, make):
    def change(opt):
        p = _stepped_params(opt)[index]
        opt.state[p]["m"] = make(p)

    return change


def _add_dense_group(values):
    def change(opt):
        p = nn.Parameter(torch.tensor(values, device=_stepped_params(opt)[0].device))
        p.grad = torch.ones_like(p)
        opt.add_param_group({"params": [p]})

    return change


_BAD_CHANGES = [
    # a change that makes the next step fail, and the error it raises
    pytest.param(lambda opt: opt.param_groups[0].update(lr=1.5), ValueError, id="lr out of range"),
    pytest.param(lambda opt: opt.param_groups[1].update(state_dtype=torch.float16), TypeError, id="fp16 state_dtype"),
    pytest.param(
        lambda opt: setattr(_stepped_params(opt)[3], "grad", _stepped_params(opt)[3].grad.to_sparse()),
        RuntimeError,
        id="sparse gradient",
    ),
    pytest.param(_replace_state(0, lambda p: torch.zeros(1, 40, device=p.device)), ValueError, id="m of another shape"),
    pytest.param(_replace_state(2, lambda p: torch.zeros(p.shape, device=p.device)), ValueError, id="m not packed"),
    pytest.param(lambda opt: _stepped_params(opt)[0].grad.resize_(3, 40), ValueError, id="gradient resized in place"),
    pytest.param(_add_dense_group([1.0, 0.5]), ValueError, id="dense values other than +-1"),
]


@pytest.mark.parametrize("change, error", _BAD_CHANGES)
def test_cached_step_raises_what_planning_anew_raises(device, change, error):
    """A bad input after the step was planned and cached gets the error (type and message) it gets
    from an optimizer that plans anew, and nothing steps."""
    model = Model(torch.float32, device)
    pair = [(m, Bop(m.groups(), fused=True)) for m in (model, copy.deepcopy(model))]
    random_grads(model, torch.Generator().manual_seed(13), 1, device)
    for p, q in zip(pair[0][0].ws, pair[1][0].ws):
        q.grad = None if p.grad is None else p.grad.clone()
    for _, opt in pair:
        opt.step()
    pair[0][1].step()  # through the cached plan
    errors = []
    for _, opt in pair:
        change(opt)
        before = [(signs(p), {k: v.clone() for k, v in opt.state[p].items()}) for p in _stepped_params(opt)]
        _plan_anew(pair[1][1])
        with pytest.raises(error) as raised:
            opt.step()
        errors.append(str(raised.value))
        for p, (s, state) in zip(_stepped_params(opt), before):
            assert torch.equal(signs(p), s) and all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    assert errors[0] == errors[1]


def test_step_hooks_and_profiler_range(device):
    """Bop.step runs torch's step hooks itself (not under torch's wrapper): a pre-hook may replace
    the arguments (here the closure), post-hooks see them, and under a profiler the step is
    recorded as Optimizer.step#Bop.step, as torch records its own optimizers."""
    model = Model(torch.float32, device, binary_only=True)
    opt = Bop(model.ws, lr=0.5, threshold=1e-3)
    assert not hasattr(Bop.step, "__wrapped__")  # torch did not wrap it
    random_grads(model, torch.Generator().manual_seed(14), 1, device)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: ((o, lambda: 7.0), kwargs))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(args[1]()))
    assert opt.step() == 7.0 and seen == [7.0]
    pre.remove()
    post.remove()
    with torch.profiler.profile() as prof:
        opt.step()
    assert "Optimizer.step#Bop.step" in {event.name for event in prof.events()}
    assert opt.step() is None and seen == [7.0]


def test_scheduler_driving_a_cpu_tensor_lr_out_of_range_fails_loudly():
    """A scheduler writes a tensor lr in place; a CPU tensor's value is checked at every step."""
    w = torch.nn.Parameter(BinaryTensor.from_float(torch.randn(4, 40)))
    opt = Bop([w], lr=torch.tensor(0.5))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 10.0)  # lr becomes 5.0
    w.grad = torch.randn(4, 40)
    before = w.words.clone()
    with pytest.raises(ValueError, match=r"lr \(gamma\) must be in \[0, 1\], got 5.0"):
        opt.step()
    assert torch.equal(w.words, before)


def test_cached_step_sees_a_weight_restrided_in_place():
    """A dense weight transposed in place (same tensor, same address, other strides) changes its
    layout: the cached step must plan anew, as a fresh optimizer would (found by review)."""
    torch.manual_seed(0)
    w0 = torch.where(torch.randn(8, 8) < 0, -1.0, 1.0)
    g0, g1 = torch.randn(8, 8), torch.randn(8, 8)
    results = []
    for cached in (True, False):
        p = torch.nn.Parameter(w0.clone())
        opt = Bop([p], lr=0.5, threshold=0.0, fused=True)
        p.grad = g0.clone()
        opt.step()
        p.data = p.data.t()
        p.grad = g1.clone()
        if not cached:
            opt._step_plan = None
            opt._steppers.clear()
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("cls", [Bop, Bop2ndOrder])
def test_unpickled_state_without_capturable_steps(cls):
    """An optimizer pickled before the ``capturable`` key existed: ``__setstate__`` fills it with
    False (defaults and every group) and the step equals one of an optimizer that never lost it."""
    torch.manual_seed(0)
    w0 = torch.where(torch.randn(6, 37) < 0, -1.0, 1.0)
    g0, g1 = torch.randn(6, 37), torch.randn(6, 37)
    results = []
    for legacy in (True, False):
        p = torch.nn.Parameter(BinaryTensor.from_float(w0.clone()))
        opt = cls([p], lr=0.5, threshold=1e-3)
        p.grad = g0.clone()
        opt.step()
        if legacy:
            state = opt.__getstate__()
            del state["defaults"]["capturable"]
            for group in state["param_groups"]:
                del group["capturable"]
            opt = cls.__new__(cls)
            opt.__setstate__(state)
            assert opt.defaults["capturable"] is False and opt.param_groups[0]["capturable"] is False
        p.grad = g1.clone()
        opt.step()
        results.append((p.words.clone(), opt.state[p]["m"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _m_resized(opt, p):
    opt.state[p]["m"].resize_(p.shape[0] // 2, *p.shape[1:])  # same tensor, address and strides


def _m_viewed_as_int32(opt, p):
    m = opt.state[p]["m"]
    m.data = m.data.view(torch.int32)  # same tensor, address, shape and strides; another dtype


def _weight_shrunk(opt, p):
    p.data = p.data[: p.shape[0] // 2]  # same tensor, address and strides; another shape


def _words_viewed_as_float(opt, p):
    p.words.data = p.words.data.view(torch.float32)


def _zero_size_m_on_meta(opt, p):
    m = opt.state[p]["m"]
    opt.state[p]["m"] = torch.empty(m.shape, dtype=m.dtype, device="meta")  # zero-size: address 0, as before


_IN_PLACE_CHANGES = [
    # (change, the parameter's shape, binary): each keeps the changed tensor's address and strides
    # (and, but for the last, its identity)
    pytest.param(_m_resized, (8, 32), False, id="m resized in place"),
    pytest.param(_m_viewed_as_int32, (8, 32), True, id="m given int32 data"),
    pytest.param(_weight_shrunk, (8, 32), False, id="dense weight shrunk by .data"),
    pytest.param(_words_viewed_as_float, (8, 64), True, id="words given float32 data"),
    pytest.param(_zero_size_m_on_meta, (0, 32), True, id="zero-size m moved to meta"),
]


@pytest.mark.parametrize("change, shape, binary", _IN_PLACE_CHANGES)
def test_cached_step_sees_in_place_changes_of_dtype_shape_and_device(device, change, shape, binary):
    """A weight or state changed in place so that only its dtype, shape or device differs (address
    and strides kept) gets the error a fresh optimizer raises, and nothing steps."""
    errors = []
    for cached in (True, False):
        w = torch.where(torch.randn(shape, generator=torch.Generator().manual_seed(1)) < 0, -1.0, 1.0).to(device)
        p = nn.Parameter(BinaryTensor.from_float(w) if binary else w)
        opt = Bop([p], lr=0.5, threshold=0.0, fused=True)
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
        opt.step()
        opt.step()  # through the cached plan
        change(opt, p)
        before = signs(p) if p.numel() and not (binary and p.words.dtype != torch.int32) else None
        if not cached:
            _plan_anew(opt)
        with pytest.raises(ValueError) as raised:
            opt.step()
        errors.append(str(raised.value))
        if before is not None:
            assert torch.equal(signs(p), before)
    assert errors[0] == errors[1]


def _state_dict_copied(opt):
    p = _stepped_params(opt)[1]
    opt.state[p] = {key: value.clone() for key, value in opt.state[p].items()}  # same key, same place


def _state_mapping_copied(opt):
    opt.state = collections.defaultdict(dict, {p: dict(state) for p, state in opt.state.items()})


def _state_entry_moved_last(opt):
    p = _stepped_params(opt)[0]
    opt.state[p] = opt.state.pop(p)


@pytest.mark.parametrize("change", [_state_dict_copied, _state_mapping_copied, _state_entry_moved_last])
def test_cached_step_follows_state_dicts_replaced_from_outside(device, change):
    """The cached step finds each parameter's state dict without looking it up: a state dict or the
    whole ``opt.state`` replaced from outside must be the one stepped (m moves, flips are written)."""
    model = Model(torch.float32, device)
    pair = [(m, Bop(m.groups(), fused=True)) for m in (model, copy.deepcopy(model))]
    gen = torch.Generator().manual_seed(15)
    for step in range(3):
        if step == 2:
            for _, opt in pair:
                change(opt)
            _plan_anew(pair[1][1])
        values = [torch.randn(p.shape, generator=gen) * 0.1 for p in _stepped_params(pair[0][1])]
        for _, opt in pair:
            for p, g in zip(_stepped_params(opt), values):
                p.grad = g.to(device, p.dtype)
            opt.step()
        _same_state(pair)
