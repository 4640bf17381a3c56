"""Property test: Bop and Bop2ndOrder against an independent statement of their rule in NumPy.

Drawn at random: the optimizer, its path (``fused=True``: the Triton launcher, under the
interpreter on CPU, natively on a GPU; ``fused=False``: the PyTorch reference), one or two param groups with their
own hyperparameters (0 and 1 included; Python numbers or 1-element tensors) and state dtype, the
parameters (BinaryTensor and dense +-1; float32, bfloat16, float16; ragged, 0-dim and zero-size
shapes), gradients with NaN/inf elements and missing gradients, a few steps, and a resume in the
middle: the state_dict goes through ``torch.save`` / ``torch.load(weights_only=True)`` into a new
optimizer over copies of the parameters, which takes the remaining steps.

The rule below is NumPy float32 arithmetic under the rounding contract of ``bnnops.kernels.bop``
(each operation rounds to fp32, bf16 state rounds to nearest-even, a non-finite gradient element
leaves its element alone), written without ``bnnops.optim.bop_reference_``. Every sign, m, v and
flip count must match it exactly.

Examples per run: ``BNNOPS_FUZZ_EXAMPLES`` (default 20, 5 to 15 s on a 2-core CPU); for a long
run by hand, e.g. ``BNNOPS_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_bop.py``.
"""

import io
import os

import numpy as np
import torch
from helpers import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnnops import BinaryTensor
from bnnops.optim import Bop, Bop2ndOrder

EXAMPLES = int(os.environ.get("BNNOPS_FUZZ_EXAMPLES", 20))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bf16(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded to the nearest bfloat16, ties to even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def rule(signs, m, v, g, gamma, threshold, sigma, state_bf16):
    """One step on dense float32 arrays; returns (signs, m, v, flips)."""
    finite = np.isfinite(g)
    g = np.where(finite, g, np.float32(0))
    store = bf16 if state_bf16 else (lambda x: x)
    m = store(np.where(finite, m + (g - m) * np.float32(gamma), m))
    m_hat = m
    if v is not None:
        v = store(np.where(finite, v + (g * g - v) * np.float32(sigma), v))
        m_hat = m / (np.sqrt(v) + np.float32(1e-10))
    flip = finite & (signs * m_hat > np.float32(threshold))
    return np.where(flip, -signs, signs), m, v, int(flip.sum())


def shapes(binary: bool) -> st.SearchStrategy:
    """(O, C, *kernel) with C (packed for a BinaryTensor) ragged around 32, zero-size dims
    included; at most a few thousand elements, so that an example stays fast."""
    channels = st.one_of(st.integers(0, 3), st.integers(1, 40))
    rows = st.one_of(st.integers(0, 3), st.integers(1, 12))
    kernel = st.integers(0, 3)
    by_rank = [st.tuples(), st.tuples(channels), st.tuples(rows, channels)]
    by_rank += [st.tuples(rows, channels, kernel), st.tuples(rows, channels, kernel, kernel)]
    return st.sampled_from(range(1, 5) if binary else range(4)).flatmap(lambda r: by_rank[r])


def hyperparameter(low: float, high: float) -> st.SearchStrategy:
    number = st.one_of(st.sampled_from([low, high]), st.floats(low, high))
    return st.tuples(number, st.booleans())  # (value, as a tensor)


@st.composite
def cases(draw):
    second_order = draw(st.booleans())
    params = draw(
        st.lists(
            st.booleans().flatmap(lambda b: st.tuples(st.just(b), shapes(b), st.sampled_from(DTYPES))),
            min_size=1,
            max_size=4,
        )
    )
    n_groups = draw(st.integers(1, min(2, len(params))))
    groups = [
        dict(
            lr=draw(hyperparameter(0.0, 1.0)),
            threshold=draw(st.one_of(st.just((0.0, False)), hyperparameter(0.0, 0.3))),
            sigma=draw(hyperparameter(0.0, 1.0)) if second_order else None,
            state_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        )
        for _ in range(n_groups)
    ]
    steps = draw(st.integers(1, 4))
    return dict(
        second_order=second_order,
        fused=draw(st.booleans()),
        params=params,
        groups=groups,
        steps=steps,
        resume_at=draw(st.integers(0, steps)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_param(binary, shape, dtype, gen):
    signs = torch.where(torch.randn(shape, generator=gen) < 0, -1.0, 1.0).to(DEVICE)
    return nn.Parameter(BinaryTensor.from_float(signs, dtype=dtype) if binary else signs.to(dtype))


def value(p):
    return (p.dequantize() if isinstance(p, BinaryTensor) else p).detach().float().cpu().numpy().copy()


def hyper(x):
    number, as_tensor = x
    return torch.tensor(number, dtype=torch.float64) if as_tensor else number


def param_groups(case, params, hyperparameters=True):
    """Parameter i in group i % n_groups; with its drawn hyperparameters, or the defaults."""
    specs = case["groups"]
    groups = []
    for j, spec in enumerate(specs):
        group = {"params": params[j :: len(specs)]}
        if hyperparameters:
            group.update({k: hyper(spec[k]) for k in ("lr", "threshold", "sigma") if spec[k] is not None})
            group["state_dtype"] = spec["state_dtype"]
        groups.append(group)
    return groups


def gradient(shape, dtype, gen):
    g = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-3, 2, (), generator=gen).item()
    flat = g.view(-1)
    bad = torch.rand(flat.shape, generator=gen) < 0.1
    flat[bad] = torch.tensor([float("nan"), float("inf"), float("-inf")])[torch.arange(int(bad.sum())) % 3]
    return g.to(DEVICE, dtype)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_bop_equals_the_rule_across_a_resume(case):
    gen = torch.Generator().manual_seed(case["seed"])
    cls = Bop2ndOrder if case["second_order"] else Bop
    params = [make_param(*spec, gen) for spec in case["params"]]
    group_of = [case["groups"][i % len(case["groups"])] for i in range(len(params))]
    opt = cls(param_groups(case, params), fused=case["fused"])
    # The rule's view: signs, m, v (None until the first step with a gradient), last flips.
    expect = [[value(p), None, None, None] for p in params]
    for step in range(case["steps"]):
        if step == case["resume_at"] and step > 0:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            params = [nn.Parameter(p.detach().clone()) for p in params]
            # Default hyperparameters: they, the state dtypes and the state come from the checkpoint.
            opt = cls(param_groups(case, params, hyperparameters=False), fused=case["fused"])
            opt.load_state_dict(torch.load(buf, weights_only=True))
        for p, (_, shape, dtype) in zip(params, case["params"]):
            p.grad = None if torch.rand((), generator=gen) < 0.2 else gradient(shape, dtype, gen)
        opt.step()
        for p, e, group in zip(params, expect, group_of):
            if p.grad is None:
                continue
            zeros = np.zeros(p.shape, np.float32)
            m = zeros if e[1] is None else e[1]
            v = (zeros if e[2] is None else e[2]) if case["second_order"] else None
            sigma = group["sigma"][0] if case["second_order"] else None
            e[:] = rule(
                e[0],
                m,
                v,
                p.grad.float().cpu().numpy(),
                group["lr"][0],
                group["threshold"][0],
                sigma,
                group["state_dtype"] == torch.bfloat16,
            )
    for i, (p, (signs, m, v, flips)) in enumerate(zip(params, expect)):
        assert np.array_equal(value(p), signs), i
        state = opt.state[p]
        if m is None:
            assert not state, i
            continue
        assert state["m"].dtype == group_of[i]["state_dtype"] and state["m"].shape == p.shape
        assert np.array_equal(state["m"].float().cpu().numpy(), m), i
        if v is not None:
            assert np.array_equal(state["v"].float().cpu().numpy(), v), i
        assert state["flips"].item() == flips, i
