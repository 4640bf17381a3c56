import pytest
import torch
from helpers import FLOAT_DTYPES

import bnnops
from bnnops import quantizers
from bnnops.quantizers import ApproxSign, MagnitudeAwareSign, SteSign, SwishSign, get_quantizer

# The edge cases of each surrogate: 0, -0, the clip boundaries, inside and outside them.
POINTS = [-3.0, -1.0, -0.999, -0.5, -1e-7, -0.0, 0.0, 1e-7, 0.25, 0.999, 1.0, 1.001, 2.5]


def points(dtype=torch.float32):
    return torch.tensor(POINTS, dtype=dtype, requires_grad=True)


def input_grad(q, x, upstream=None):
    upstream = upstream if upstream is not None else torch.linspace(0.5, 2.0, x.numel(), dtype=x.dtype).view_as(x)
    q(x).backward(upstream)
    return x.grad, upstream


@pytest.mark.parametrize("name", ["ste_sign", "approx_sign", "swish_sign"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_is_sign_with_sign_zero_plus_one(device, name, dtype):
    x = torch.tensor(POINTS + [float("inf"), float("-inf")], dtype=dtype, device=device)
    y = get_quantizer(name)(x)
    assert y.dtype == dtype
    expected = [-1.0 if v < 0 else 1.0 for v in POINTS] + [1.0, -1.0]
    assert y.tolist() == expected  # both zeros -> +1
    assert get_quantizer(name)(torch.tensor([float("nan")], dtype=dtype)).item() == 1.0  # like the packing


def test_ste_sign_gradient():
    x = points()
    grad, up = input_grad(quantizers.ste_sign, x)
    inside = torch.tensor([abs(v) <= 1 for v in POINTS])  # |x| <= 1, boundary included (larq)
    assert torch.equal(grad, torch.where(inside, up, 0.0))
    x = points()
    grad, up = input_grad(SteSign(clip_value=2.0), x)
    assert torch.equal(grad, torch.where(torch.tensor([abs(v) <= 2 for v in POINTS]), up, 0.0))
    # grad (a select) and derivative (the 0/1 surrogate) state the same rule ...
    assert torch.equal(grad, up * SteSign(clip_value=2.0).derivative(x.detach()))

    # ... and a subclass with its own surrogate gets it.
    class HalfSte(SteSign):
        def derivative(self, x):
            return 0.5 * super().derivative(x)

    grad, up = input_grad(HalfSte(), points())
    assert torch.equal(grad, torch.where(inside, up / 2, 0.0))


def test_gradient_dtype_follows_input():
    for dtype in (torch.bfloat16, torch.float16):
        x = points(dtype)
        for q in (quantizers.swish_sign, quantizers.ste_sign):
            grad, _ = input_grad(q, x)
            assert grad.dtype == dtype and torch.isfinite(grad).all()


def test_approx_sign_gradient():
    x = points()
    grad, up = input_grad(quantizers.approx_sign, x)
    v = torch.tensor(POINTS)
    assert torch.allclose(grad, torch.where(v.abs() <= 1, 2 - 2 * v.abs(), 0.0) * up)
    assert grad[POINTS.index(0.0)] == 2 * up[POINTS.index(0.0)]  # the peak at 0


@pytest.mark.parametrize("beta", [5.0, 2.0])
def test_swish_sign_gradient_is_derivative_of_signswish(beta):
    # SignSwish (BNN+): 2 sigmoid(b x) (1 + b x (1 - sigmoid(b x))) - 1; its autograd derivative
    # must equal the closed form the quantizer uses.
    x = torch.linspace(-3, 3, 101, dtype=torch.float64, requires_grad=True)
    s = torch.sigmoid(beta * x)
    (2 * s * (1 + beta * x * (1 - s)) - 1).sum().backward()
    xq = x.detach().clone().requires_grad_(True)
    q = SwishSign(beta=beta) if beta != 5.0 else quantizers.swish_sign
    q(xq).sum().backward()
    assert torch.allclose(xq.grad, x.grad, rtol=1e-6, atol=1e-9)
    assert xq.grad[50] == 2 * beta / 2  # peak at 0: beta * 2 / 2


@pytest.mark.parametrize("name", ["ste_sign", "approx_sign", "swish_sign"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_surrogate_is_zero_far_from_zero_and_at_infinity(name, dtype):
    """Far outside the clip range every surrogate derivative is 0, at +-inf too (a binarized
    input may be infinite: its sign is defined), never NaN."""
    huge = torch.finfo(dtype).max
    x = torch.tensor([float("inf"), float("-inf"), huge, -huge, 1e4, -1e4], dtype=dtype)
    d = get_quantizer(name).derivative(x)
    assert d.dtype == dtype and torch.equal(d.abs(), torch.zeros(6, dtype=dtype))
    grad = get_quantizer(name).grad(x, torch.ones(6, dtype=dtype))
    assert torch.equal(grad.abs(), torch.zeros(6, dtype=dtype))


def test_magnitude_aware_sign():
    w = torch.randn(4, 6, 3, 3) * 2
    w[0, 0, 0, 0] = 0.0
    wq = w.clone().requires_grad_(True)
    y = quantizers.magnitude_aware_sign(wq)
    alpha = w.abs().mean(dim=(1, 2, 3))  # per output channel: every dim but 0
    assert torch.allclose(y, alpha.view(4, 1, 1, 1) * torch.where(w < 0, -1.0, 1.0))
    assert y[0, 0, 0, 0] == alpha[0]  # sign(0) = +1
    up = torch.randn_like(w)
    y.backward(up)
    # alpha is under stop-gradient; the sign is straight-through with clip 1.
    assert torch.allclose(wq.grad, alpha.view(4, 1, 1, 1) * up * (w.abs() <= 1))
    assert torch.allclose(MagnitudeAwareSign().scale(w[:, :, 0, 0]), w[:, :, 0, 0].abs().mean(1))
    # A channel with no weights: alpha 0 (its output is an empty sum), not the NaN of an empty mean.
    assert torch.equal(MagnitudeAwareSign().scale(torch.randn(4, 0, 3, 3)), torch.zeros(4))
    empty = bnnops.binary_linear(torch.randn(2, 0), torch.randn(3, 0), weight_quantizer="magnitude_aware_sign")
    assert torch.equal(empty, torch.zeros(2, 3))


def test_lookup_equality_and_docs():
    assert get_quantizer("ste_sign") is quantizers.ste_sign
    assert get_quantizer(None) is None
    q = SwishSign(beta=3)
    assert get_quantizer(q) is q
    assert SwishSign(beta=3) == q and hash(SwishSign(beta=3)) == hash(q) and SwishSign() != q
    assert SteSign() != ApproxSign() and repr(q) == "SwishSign(beta=3.0)"
    with pytest.raises(ValueError, match="unknown quantizer 'sign'"):
        get_quantizer("sign")
    for cls in (SteSign, ApproxSign, SwishSign, MagnitudeAwareSign):
        assert "Source: larq" in cls.__doc__ and "arXiv" in cls.__doc__


def test_compile_fullgraph(device):
    # On torch 2.11 this caught a compiled gradient of all zeros (see quantizers.sign).
    x = torch.randn(5, 7, device=device, requires_grad=True)

    def f(x):
        return (quantizers.approx_sign(x) * torch.arange(7, device=x.device)).sum()

    f(x).backward()
    eager = x.grad.clone()
    x.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).backward()
    assert torch.equal(x.grad, eager)


def test_ste_sign_without_clipping():
    """larq's ``ste_sign(clip_value=None)``: no clipping, the gradient passes at every magnitude."""
    x = torch.tensor([-1e6, -2.0, -0.5, 0.0, 0.5, 2.0, 1e6], requires_grad=True)
    SteSign(clip_value=None)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_int32_input_of_the_wrong_width_says_it_is_taken_as_words():
    layer = bnnops.nn.BinaryLinear(40, 4)
    with pytest.raises(bnnops.ShapeError, match="taken as packed sign words"):
        layer(torch.randint(0, 2, (3, 40), dtype=torch.int32))
