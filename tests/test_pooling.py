"""bnnops.nn.MaxPool2d against torch.nn.MaxPool2d: output and input gradient bit for bit (values,
dtype, shape, strides), and one uint8 kept per output for backward where windows do not overlap.

Inputs are integer-valued floats in [-2, 2] (W1A1 conv outputs are integers: ties in most
windows) with +-inf and +-0.0 placed at random, and NaN in their own test. The fuzz test draws
shapes, kernels, strides, padding, ceil mode, dtypes and memory formats, fallback configurations
and invalid ones included; ``BNNOPS_FUZZ_EXAMPLES`` raises its example count (default 40).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, FLOAT_DTYPES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnnops.memory import saved_bytes
from bnnops.nn import MaxPool2d
from bnnops.pooling import _NonOverlappingMaxPool

FUZZ_EXAMPLES = int(os.environ.get("BNNOPS_FUZZ_EXAMPLES", 40))
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def tied_input(shape, dtype, generator, fmt=torch.contiguous_format, nans=0):
    """Integer values in [-2, 2] with +-inf and +-0.0 (and ``nans`` NaNs) at random places."""
    x = torch.randint(-2, 3, shape, generator=generator).to(dtype)
    flat = x.view(-1)
    specials = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, -0.0] * 4 + [float("nan")] * nans)
    n = min(flat.numel(), specials.numel())
    flat[torch.randperm(flat.numel(), generator=generator)[:n]] = specials[:n].to(dtype)
    return x.to(DEVICE).contiguous(memory_format=fmt) if len(shape) == 4 else x.to(DEVICE)


def assert_same(actual, expected):
    """Same dtype, shape, strides and bits (the sign of zero included), NaN where the other has
    NaN (torch's NaN payloads differ by device and kernel: not compared)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan())
    as_int = INT_OF_SIZE[actual.element_size()]
    assert torch.equal(actual.view(as_int)[~nan], expected.view(as_int)[~nan])


def run_both(x, grad_seed, *args, **kwargs):
    """Output and input gradient of bnnops' and torch's MaxPool2d on copies of x; the upstream
    gradient is integer-valued with -0.0 in it. Returns (ours, torch's) pairs (out, grad)."""
    results = []
    for module in (MaxPool2d(*args, **kwargs), nn.MaxPool2d(*args, **kwargs)):
        xg = x.clone().requires_grad_()
        out = module(xg)
        generator = torch.Generator().manual_seed(grad_seed)
        grad = torch.randint(-2, 3, out.shape, generator=generator).to(x.dtype)
        grad.view(-1)[::3] = -0.0
        # autograd.grad, not backward: .grad of a leaf is restrided to the leaf's layout.
        results.append((out, *torch.autograd.grad(out, xg, grad.to(x.device))))
    return results


def is_ours(out):
    """out came from the uint8 path (an unbatched one through a squeeze)."""
    node = out.grad_fn
    if type(node).__name__ == "SqueezeBackward1":
        node = node.next_functions[0][0]
    return type(node).__name__ == "_NonOverlappingMaxPoolBackward"


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [2, 3, (2, 3)], ids=str)
def test_matches_torch_bit_for_bit(kernel, dtype, fmt):
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 5, 8, 6), (3, 4, 11, 7), (1, 3, 3, 13)]:  # even, ragged, one window high
        x = tied_input(shape, dtype, generator, FORMATS[fmt])
        (out, grad), (ref_out, ref_grad) = run_both(x, 1, kernel)
        assert is_ours(out)
        assert_same(out, ref_out)
        assert_same(grad, ref_grad)
        with torch.no_grad():
            assert_same(MaxPool2d(kernel)(x), ref_out.detach())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_takes_the_last_nan_of_its_window(dtype):
    """torch's kernels take a NaN over the maximum so far, so the last NaN of a window is the
    output and gets the gradient."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 1.0, inf, 2.0], [3.0, nan, nan, -inf]], dtype=dtype, device=DEVICE)
    xg = x[None, None].clone().requires_grad_()
    out = MaxPool2d(2)(xg)
    out.backward(torch.tensor([[[[5.0, 7.0]]]], dtype=dtype, device=DEVICE))
    assert out.isnan().all()
    expected_grad = torch.tensor([[0, 0, 0, 0], [0, 5, 7, 0]], dtype=dtype, device=DEVICE)
    assert torch.equal(xg.grad[0, 0], expected_grad)
    generator = torch.Generator().manual_seed(2)
    for fmt in FORMATS.values():
        x = tied_input((2, 3, 9, 8), dtype, generator, fmt, nans=30)
        (out, grad), (ref_out, ref_grad) = run_both(x, 3, 2)
        assert out.isnan().any()
        assert_same(out, ref_out)
        assert_same(grad, ref_grad)


def test_unbatched_input():
    generator = torch.Generator().manual_seed(4)
    x = tied_input((4, 9, 10), torch.float32, generator)
    hwc = tied_input((9, 10, 4), torch.float32, generator).permute(2, 0, 1)  # (C, H, W) with C fastest
    for sample in (x, hwc):
        (out, grad), (ref_out, ref_grad) = run_both(sample, 5, 2)
        assert is_ours(out) and out.shape == (4, 4, 5)
        assert_same(out, ref_out)
        assert_same(grad, ref_grad)


def test_double_backward_matches_torch():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: MaxPool2d(2)(t), (x,))
    grads = []
    g = torch.randn(2, 3, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for module in (MaxPool2d(2), nn.MaxPool2d(2)):
        (gx,) = torch.autograd.grad(module(x), x, g, create_graph=True)
        grads.append(torch.autograd.grad((gx * gx.detach()).sum(), g))
    assert torch.equal(grads[0][0], grads[1][0])


def _count(fn):
    return sum(saved_bytes(nn.Module(), fn).values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keeps_one_byte_per_output(dtype):
    x = torch.randn(3, 8, 13, 10, dtype=dtype, device=DEVICE, requires_grad=True)
    outputs = 3 * 8 * 4 * 3
    assert _count(lambda: MaxPool2d(3)(x)) == outputs
    assert _count(lambda: MaxPool2d((3, 3), stride=3)(x.contiguous(memory_format=torch.channels_last))) == outputs
    assert _count(lambda: MaxPool2d(2)(x[0])) == 8 * 6 * 5
    # torch keeps the input and int64 indices: what the fallback keeps for overlapping windows.
    torch_keeps = x.numel() * x.element_size() + 8 * 3 * 8 * 7 * 5  # int64 per (7, 5) output
    assert _count(lambda: nn.MaxPool2d(3, stride=2, padding=1)(x)) == torch_keeps
    assert _count(lambda: MaxPool2d(3, stride=2, padding=1)(x)) == torch_keeps
    assert _count(lambda: MaxPool2d(2)(x.detach())) == 0


def test_nothing_to_differentiate_runs_torchs_pool(monkeypatch):
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    tracked = MaxPool2d(2)(x.clone().requires_grad_())

    def forbidden(*args):
        raise AssertionError("the autograd function ran with nothing to differentiate")

    monkeypatch.setattr(_NonOverlappingMaxPool, "apply", forbidden)
    with torch.no_grad():
        untracked = MaxPool2d(2)(x.clone().requires_grad_())
    frozen = MaxPool2d(2)(x)
    assert untracked.grad_fn is None and frozen.grad_fn is None
    assert torch.equal(untracked, tracked.detach()) and torch.equal(frozen, untracked)


def test_module_is_a_drop_in():
    pool = MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    torch_pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    assert isinstance(pool, nn.MaxPool2d) and repr(pool) == repr(torch_pool)
    assert pool.state_dict() == {} and list(pool.parameters()) == []
    with pytest.raises(ValueError, match="return_indices=True"):
        MaxPool2d(2, return_indices=True)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    unbatched=st.booleans(),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.sampled_from(["kernel", None, 1, 2, (2, 3)]),
    padding=st.sampled_from([0, 0, 1]),
    ceil_mode=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    fmt=st.sampled_from(list(FORMATS.values())),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_torch(shape, unbatched, kernel, stride, padding, ceil_mode, dtype, fmt, seed):
    """Any configuration: the same output and gradient as torch, or the same error type."""
    x = tied_input(shape, dtype, torch.Generator().manual_seed(seed), fmt, nans=seed % 3)
    x = x[0] if unbatched else x
    kwargs = dict(stride=kernel if stride == "kernel" else stride, padding=padding, ceil_mode=ceil_mode)
    try:
        F.max_pool2d(x, kernel, **kwargs)
    except RuntimeError as error:
        with pytest.raises(type(error)):
            MaxPool2d(kernel, **kwargs)(x.clone().requires_grad_())
        return
    (out, grad), (ref_out, ref_grad) = run_both(x, seed, kernel, **kwargs)
    assert_same(out, ref_out)
    assert_same(grad, ref_grad)


def test_torch_func_transforms_and_forward_ad_get_torch_s_pool():
    """vmap / grad and forward-mode AD need more than a backward: those calls run torch's max pool,
    with torch's results."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ours, theirs = MaxPool2d(2), torch.nn.MaxPool2d(2)
    for transform in (torch.func.grad, lambda f: torch.func.vmap(torch.func.grad(f))):
        got = transform(lambda v: ours(v).sum())(x)
        want = transform(lambda v: theirs(v).sum())(x)
        assert torch.equal(got, want)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.clone().requires_grad_(), tangent)
        got = torch.autograd.forward_ad.unpack_dual(ours(dual)).tangent
        want = torch.autograd.forward_ad.unpack_dual(theirs(dual)).tangent
    assert got is not None and torch.equal(got, want)
