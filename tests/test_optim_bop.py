"""bnnops.optim.Bop / Bop2ndOrder against a plain statement of the rule, on both paths.

``fused=True`` runs the Triton kernel (natively on CUDA, in the interpreter on CPU), ``fused=False``
the PyTorch reference; both must equal the plain rule below bit for bit: m, v, every sign, and the
flip counts.
"""

import io

import pytest
import torch
from torch import nn

from bnnops import BinaryTensor
from bnnops.optim import Bop, Bop2ndOrder, ThresholdScheduler
from conftest import FLOAT_DTYPES

# (shape, binary): BinaryTensor weights with ragged packed lengths (numel not a multiple of 32),
# conv weights and rank 1, and dense +-1 weights with and without a ragged tail.
SHAPES = [((6, 40), True), ((3, 64), True), ((4, 35, 3, 3), True), ((7, 45), False), ((70,), True), ((5, 32, 1, 3), True), ((2, 64), False)]


def plain_rule(signs, m, g, gamma, threshold, v=None, sigma=None):
    """The rule of DESIGN.md on dense +-1 ``signs``, elementwise; returns (signs, m, v, flips).

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
            (BinaryTensor.from_float if binary else lambda w: w)(torch.where(torch.randn(s, generator=gen) < 0, -1.0, 1.0).to(device, dtype))
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
        p.grad = None if (step + i) % 3 == 0 and i == step % 6 else (torch.randn(p.shape, generator=gen) * 0.1).to(device, p.dtype)


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
                    s, m, v, flips = plain_rule(expect[i][0], expect[i][1], p.grad, gamma, threshold, expect[i][2], sigma)
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
        p.grad[mask] = torch.tensor([float("nan"), float("inf"), float("-inf")], device=device)[torch.arange(int(mask.sum()), device=device) % 3]
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
    assert [opt.state[p]["flips"].item() for p in stepped] == [c for p, c in zip(model.ws, changed) if p.grad is not None]
    assert all(opt.state[p]["flips"].dtype == torch.int64 and opt.state[p]["flips"].device.type == device for p in stepped)
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
    assert opt._fused(model.ws[0], opt.param_groups[0]) == (device == "cuda")
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
    _train(*resumed, gen, device, steps=4, start=4)

    (m0, o0, g0, t0), (m1, o1, g1, t1) = straight, resumed
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


def test_threshold_scheduler_checks(device):
    with pytest.raises(TypeError, match="Bop"):
        ThresholdScheduler(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1), lambda t: 1.0)
    opt = Bop(Model(torch.float32, device, binary_only=True).groups())
    with pytest.raises(ValueError, match="one per param group"):
        ThresholdScheduler(opt, [lambda t: 1.0])
    sched = ThresholdScheduler(opt, [lambda t: 0.5**t, lambda t: 1.0])
    sched.step()
    assert sched.get_last_threshold() == [0.5e-3, 0.0]
