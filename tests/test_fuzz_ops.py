"""Property-based tests of ``bnnops.binary_linear`` and ``bnnops.binary_conv2d`` against a dense
reference built here: F.linear / F.conv2d in float64 on sign(x) (or x) and the dense +-1 weight
(the latent weight through its quantizer), then scale and bias.

Hypothesis draws the shapes (ragged, empty dimensions included: zero rows, features, channels or
images), the input's layout (contiguous, transposed, strided, broadcast, channels_last,
unbatched), the dtype, the input and weight quantizers (packed int32 sign words for the linear
layer), a packed or a latent weight, groups, stride, dilation, padding ("same" and "valid" too),
the pad value, and a scale (none, fixed, learnable; in fp32 or the input's dtype) and bias. Each
example runs on two paths: the ops' pure-PyTorch CPU references, and their CUDA implementations
(``CUDA_IMPLEMENTATIONS``: the Triton launchers; here run on CPU tensors by Triton's interpreter,
swapped in for the CPU kernels; on a GPU, the CUDA tensors themselves). On each path:

- the output is within the op's rounding of the reference (W1A1: exact sums, scale and bias in
  fp32, one rounding; W1A16: fp32 sums) and has x's dtype (fp32 for packed x);
- gradients of x, the weight, bias and a learnable scale match autograd through the reference;
- a learnable scale gives the fixed scale's output bit for bit;
- and W1A1 outputs are equal bit for bit on both paths.

The example counts are small so CI stays fast (about 30 s, most of it the interpreted conv
kernel); set BNNOPS_FUZZ_EXAMPLES (e.g. 500) for a longer run by hand: the linear test runs that
many examples, the conv test a third as many.
"""

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import random_signs_input
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnnops
import bnnops.ops.conv  # the ops register their CUDA_IMPLEMENTATIONS on import
import bnnops.ops.linear
from bnnops import BinaryTensor
from bnnops.conv import conv_padding
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.quantizers import get_quantizer, sign

EXAMPLES = int(os.environ.get("BNNOPS_FUZZ_EXAMPLES", 60))
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One rounding to a dtype: at most one ulp of the result (half an ulp, to nearest).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Half the spacing of each dtype's subnormals: the absolute error of one rounding near zero.
SUBNORMAL = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
INPUT_QUANTIZERS = (None, "ste_sign", "approx_sign", "swish_sign")
WEIGHT_QUANTIZERS = (None, "ste_sign", "approx_sign", "magnitude_aware_sign")  # None: a packed weight


@pytest.fixture(autouse=True, scope="module")
def fp32_convolutions():
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa products), which the conv
    backward uses: the gradients compared here must be true fp32, as the forward kernels are."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def path(name: str):
    """Where the ops run: "reference" (the CPU references) or "launchers" (the CUDA
    implementations: on CUDA tensors on a GPU, else registered as the ops' CPU kernels for the
    duration). Yields the device to put tensors on."""
    if name == "reference":
        yield "cpu"
    elif torch.cuda.is_available():
        yield "cuda"
    else:
        library = torch.library.Library("bnnops", "IMPL")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Warning only once for all operators")
                for op, implementation in CUDA_IMPLEMENTATIONS.items():
                    library.impl(op, implementation, "CPU")
            yield "cpu"
        finally:
            library._destroy()


@dataclass
class Example:
    """One call: the layer function's arguments, the leaves gradients reach, and the reference's."""

    dtype: torch.dtype
    iq: str | None
    wq: str | None
    packed_x: bool
    base: torch.Tensor  # the leaf x is a view of
    view: object  # base -> x
    dense_weight: torch.Tensor  # the float weight the parameter is built from
    bias: torch.Tensor | None
    scale: torch.Tensor | None
    learnable: bool
    conv: dict | None  # binary_conv2d's geometry keywords, None for linear


def draw_common(draw, dtype_choices=FLOAT_DTYPES):
    dtype = draw(st.sampled_from(dtype_choices))
    iq = draw(st.sampled_from(INPUT_QUANTIZERS))
    wq = draw(st.sampled_from(WEIGHT_QUANTIZERS))
    scale_kind = draw(st.sampled_from([None, "fixed", "learnable"]))
    scale_dtype = draw(st.sampled_from([torch.float32, dtype]))
    with_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, iq, wq, scale_kind, scale_dtype, with_bias, torch.Generator().manual_seed(seed)


def values(shape, dtype, generator, binarized):
    """Random normals and the hard cases of a sign (+-0, tiny); +-inf only where x is binarized."""
    return random_signs_input(shape, dtype, "cpu", generator=generator, finite=not binarized)


def channel_vectors(n, dtype, scale_kind, scale_dtype, with_bias, g):
    scale = None if scale_kind is None else (torch.rand(n, generator=g) * 2 + 0.1).to(scale_dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return scale, bias


@st.composite
def linear_examples(draw):
    dtype, iq, wq, scale_kind, scale_dtype, with_bias, g = draw_common(draw)
    lead = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    K, N = draw(st.integers(0, 100)), draw(st.integers(1, 40))
    packed_x = iq is not None and draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "broadcast"]))
    binarized = iq is not None
    if layout == "transposed" and lead:
        base = values((K, *lead), dtype, g, binarized)
        view = lambda t: t.movedim(0, -1)
    elif layout == "strided":
        base = values((*lead, 2 * K), dtype, g, binarized)
        view = lambda t: t[..., ::2]
    elif layout == "broadcast" and lead:
        base = values((K,), dtype, g, binarized)
        view = lambda t: t.expand(*lead, K)
    else:
        base = values((*lead, K), dtype, g, binarized)
        view = lambda t: t
    scale, bias = channel_vectors(N, dtype, scale_kind, scale_dtype, with_bias, g)
    dense = torch.randn(N, K, generator=g).to(dtype)
    return Example(dtype, iq, wq, packed_x, base, view, dense, bias, scale, scale_kind == "learnable", None)


@st.composite
def conv_examples(draw):
    dtype, iq, wq, scale_kind, scale_dtype, with_bias, g = draw_common(draw)
    groups, Cg, Og = draw(st.integers(1, 3)), draw(st.integers(0, 9)), draw(st.integers(1, 4))
    C, O = groups * Cg, groups * Og
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = {
        "int": draw(st.integers(0, 2)),
        "pair": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        "valid": "valid",
        "same": "same",
    }[padding]
    pt, pb, pl, pr = conv_padding(padding, kernel, stride, dilation)
    # The smallest input the dilated kernel fits in once padded, plus up to 3.
    H = max(1, dilation[0] * (kernel[0] - 1) + 1 - pt - pb) + draw(st.integers(0, 3))
    W = max(1, dilation[1] * (kernel[1] - 1) + 1 - pl - pr) + draw(st.integers(0, 3))
    N = draw(st.sampled_from([1, 2, 0]))  # an empty batch now and then
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided", "transposed", "unbatched"]))
    binarized = iq is not None
    if layout == "channels_last":
        base = values((N, H, W, C), dtype, g, binarized)
        view = lambda t: t.permute(0, 3, 1, 2)
    elif layout == "strided":
        base = values((N, C, H, 2 * W), dtype, g, binarized)
        view = lambda t: t[..., ::2]
    elif layout == "transposed":
        base = values((N, C, W, H), dtype, g, binarized)
        view = lambda t: t.transpose(2, 3)
    elif layout == "unbatched":
        base = values((C, H, W), dtype, g, binarized)
        view = lambda t: t
    else:
        base = values((N, C, H, W), dtype, g, binarized)
        view = lambda t: t
    scale, bias = channel_vectors(O, dtype, scale_kind, scale_dtype, with_bias, g)
    dense = torch.randn(O, Cg, *kernel, generator=g).to(dtype)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, pad_value=0.0)
    geometry["pad_value"] = draw(st.sampled_from([0.0, 1.0, -1.0]))
    return Example(dtype, iq, wq, False, base, view, dense, bias, scale, scale_kind == "learnable", geometry)


def call_layer(ex: Example, device: str, scale_requires_grad: bool):
    """(y, {name: leaf}) of the layer function on ``device``, leaves requiring grad where they can."""
    # Copies: each call owns its leaves (.to on their device would return the example's tensors).
    base = ex.base.to(device, copy=True).requires_grad_(not ex.packed_x)
    x = ex.view(base)
    if ex.packed_x:
        x = bnnops.pack_signs(x)
    dense = ex.dense_weight.to(device)
    weight = nn.Parameter(BinaryTensor.from_float(dense) if ex.wq is None else dense.clone())
    bias = None if ex.bias is None else ex.bias.to(device, copy=True).requires_grad_()
    scale = None if ex.scale is None else ex.scale.to(device, copy=True).requires_grad_(scale_requires_grad)
    kwargs = dict(input_quantizer=ex.iq, scale=scale, weight_quantizer=ex.wq)
    if ex.conv is None:
        y = bnnops.binary_linear(x, weight, bias, **kwargs)
    else:
        geometry = dict(ex.conv)
        pad_value = geometry.pop("pad_value")
        y = bnnops.binary_conv2d(x, weight, bias, **geometry, pad_value=pad_value, **kwargs)
    leaves = dict(x=None if ex.packed_x else base, weight=weight, bias=bias, scale=scale)
    return y, {k: v for k, v in leaves.items() if v is not None and v.requires_grad}


def dense_conv(a, w, ex: Example, pad_value: float):
    geometry = ex.conv
    pt, pb, pl, pr = conv_padding(geometry["padding"], w.shape[2:], geometry["stride"], geometry["dilation"])
    a = F.pad(a, (pl, pr, pt, pb), value=pad_value)
    if a.shape[1] == 0:
        # Empty sums: 0 (F.conv2d on the CPU returns no output channels for no input channels),
        # still a function of a and w (their gradients: empty).
        (sh, sw), (dh, dw) = geometry["stride"], geometry["dilation"]
        OH = (a.shape[2] - dh * (w.shape[2] - 1) - 1) // sh + 1
        OW = (a.shape[3] - dw * (w.shape[3] - 1) - 1) // sw + 1
        return a.new_zeros(a.shape[0], w.shape[0], OH, OW) + (a.sum() + w.sum())
    return F.conv2d(a, w, None, geometry["stride"], 0, geometry["dilation"], geometry["groups"])


def reference(ex: Example, magnitude: bool = False):
    """(y, {name: leaf}) in float64 from torch ops: the quantizers' surrogates give the gradients.
    With ``magnitude`` the same sums over absolute values, the scale of the rounding errors."""
    base = ex.base.double().requires_grad_(not ex.packed_x)
    x = ex.view(base)
    iq, wq = get_quantizer(ex.iq), get_quantizer(ex.wq)
    a = sign(x.detach()) if ex.packed_x else (iq(x) if iq is not None else x)
    if ex.wq is None:
        w_leaf = torch.where(ex.dense_weight < 0, -1.0, 1.0).double().requires_grad_()
        w = w_leaf
    else:
        w_leaf = ex.dense_weight.double().requires_grad_()
        w = wq(w_leaf)
    scale = None if ex.scale is None else ex.scale.double().requires_grad_(ex.learnable)
    bias = None if ex.bias is None else ex.bias.double().requires_grad_()
    if magnitude:
        a, w = a.abs(), w.abs()
    if ex.conv is None:
        y = F.linear(a, w)
        shape = (-1,)
    else:
        unbatched = a.dim() == 3
        pad_value = abs(ex.conv["pad_value"]) if magnitude else ex.conv["pad_value"]
        y = dense_conv(a[None] if unbatched else a, w, ex, pad_value)
        y = y[0] if unbatched else y
        shape = (-1, 1, 1)
    if scale is not None:
        y = y * (scale.abs() if magnitude else scale).view(shape)
    if bias is not None:
        y = y + (bias.abs() if magnitude else bias).view(shape)
    leaves = dict(x=None if ex.packed_x else base, weight=w_leaf, bias=bias, scale=scale)
    return y, {k: v for k, v in leaves.items() if v is not None and v.requires_grad}


def check_forward(ex: Example, y: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor) -> None:
    """y within the op's rounding of the float64 reference.

    W1A1: exact sums, then scale and bias in fp32 (2^-24 each). W1A16: fp32 sums of exact
    (16-bit x) or 3xTF32 (fp32 x on a GPU) products, (K + 2) * 2^-20 of the magnitude. Then one
    rounding to y's dtype (relative, or half a subnormal step near zero); a magnitude-aware weight's
    alpha also meets the scale in the scale's dtype (alpha and their product rounded to it).
    """
    assert y.shape == expected.shape and y.dtype == (torch.float32 if ex.packed_x else ex.dtype)
    K = math.prod(ex.dense_weight.shape[1:])
    binarized = ex.iq is not None or ex.packed_x
    bound = (2.0**-22 if binarized else (K + 2) * 2.0**-20) * magnitude + ULP[y.dtype] * expected.abs()
    bound = bound + SUBNORMAL[y.dtype]
    if ex.wq == "magnitude_aware_sign" and ex.scale is not None:
        bound = bound + 2 * ULP[ex.scale.dtype] * magnitude
    error = (y.detach().cpu().double() - expected.detach()).abs()
    assert bool((error <= bound).all()), f"error exceeds the bound by {(error - bound).max().item()}"


def check_gradients(ex: Example, y, leaves, expected, expected_leaves) -> None:
    """Gradients against autograd through the reference: fp32 within fp32 sums; 16-bit within a
    few of their roundings (2^-6) of the largest gradient, and of the dtype of what they belong to."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), g.to(y.device))
    expected_grads = torch.autograd.grad(expected, list(expected_leaves.values()), g.double(), retain_graph=True)
    assert list(leaves) == list(expected_leaves)
    tol = 1e-4 if ex.dtype == torch.float32 and not ex.packed_x else 2.0**-6
    for name, got, want in zip(leaves, grads, expected_grads):
        assert type(got) is torch.Tensor and got.shape == leaves[name].shape and got.dtype == leaves[name].dtype, name
        scale = 1 + want.abs().max().item() if want.numel() else 1
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol * scale, msg=name)


def check_example(ex: Example) -> None:
    expected, expected_leaves = reference(ex)
    with torch.no_grad():
        magnitude, _ = reference(ex, magnitude=True)
    outputs = {}
    for name in ("reference", "launchers"):
        with path(name) as device:
            y, leaves = call_layer(ex, device, scale_requires_grad=ex.learnable)
            check_forward(ex, y, expected, magnitude)
            if ex.scale is not None:
                # The scale's requires_grad never changes the output.
                other, _ = call_layer(ex, device, scale_requires_grad=not ex.learnable)
                assert torch.equal(other.detach(), y.detach()), name
            check_gradients(ex, y, leaves, expected, expected_leaves)
            outputs[name] = y.detach().cpu()
    if ex.iq is not None or ex.packed_x:
        assert torch.equal(outputs["launchers"], outputs["reference"])


@settings(max_examples=EXAMPLES, deadline=None)
@given(linear_examples())
def test_binary_linear_matches_dense_reference(ex):
    check_example(ex)


@settings(max_examples=max(1, EXAMPLES // 3), deadline=None)
@given(conv_examples())
def test_binary_conv2d_matches_dense_reference(ex):
    check_example(ex)
