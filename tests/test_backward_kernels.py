"""The backward launchers of a binary layer that saves its input packed (sign words and the
straight-through pass mask): :mod:`bnnops.kernels.saved_activations`,
:mod:`bnnops.kernels.linear_backward`, :mod:`bnnops.kernels.conv2d_backward`, against the
references of :mod:`bnnops.ops.backward_reference` (interpreter on CPU, native on CUDA), and the
references against the layers' own autograd (``binary_linear`` / ``binary_conv2d``).

Exactness: grad_out holding multiples of 1/8 (:func:`dyadic`) makes every sum exact in fp32, so a
kernel and its reference round the same exact value once and agree bit for bit in every dtype.
Random grad_out is held to :func:`assert_close_sum`'s bound. Outputs start poisoned (NaN), so an
element a kernel skips fails the comparison. Shapes are ragged (channels not multiples of 32,
several tiles, partial tiles) and small: the interpreter is slow.

The hypothesis test draws conv geometries; its example count is small for CI: set
``BNNOPS_FUZZ_EXAMPLES`` (e.g. 100) for a longer run by hand.
"""

import os
import subprocess
import sys

import pytest
import torch
import triton
from helpers import DEVICE, FLOAT_DTYPES, poisoned, random_signs_input
from hypothesis import given, settings
from hypothesis import strategies as st

import bnnops
from bnnops import BinaryTensor, kernels
from bnnops.ops import backward_reference as ref
from bnnops.packing import pack_bits, pack_weight
from bnnops.quantizers import SteSign

saved = kernels.load("saved_activations")
linear_backward = kernels.load("linear_backward")
conv2d_backward = kernels.load("conv2d_backward")
gemm_configs = kernels.load("gemm_configs")

EXAMPLES = int(os.environ.get("BNNOPS_FUZZ_EXAMPLES", 5))
# Half an ulp of a dtype (relative) and its smallest subnormal.
ROUND = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def dyadic(shape, dtype, generator=None):
    """Multiples of 1/8 in [-3, 3]: exact in every float dtype, and their sums exact in fp32."""
    return (torch.randint(-24, 25, shape, generator=generator) / 8).to(dtype).to(DEVICE)


def assert_close_sum(y, expected, abs_sum, terms, fp32_grad):
    """y (a kernel's) against ``expected`` (the reference's), both in y's dtype: the sum of
    ``terms`` products g * (+-1 or 0) per element, rounded once; ``abs_sum`` the sum of |g| over them.

    Each side sums in fp32 in its own order, within terms * 2^-24 * abs_sum of the exact sum (the
    sequential bound); fp32 g enters the tensor cores as two TF32 products, each exact to
    2^-20 |g|: together delta = (2 terms 2^-24 + 2^-20) abs_sum. Each side then rounds once to
    y's dtype (half an ulp): |y - expected| <= ulp(expected) + delta, with slack for the rounding
    of ``expected`` itself and two subnormal spacings.
    """
    dtype = y.dtype
    y, expected, abs_sum = y.float().cpu(), expected.float().cpu(), abs_sum.float().cpu()
    delta = (2 * terms * 2.0**-24 + (2.0**-20 if fp32_grad else 0.0)) * abs_sum
    bound = 2.1 * ROUND[dtype] * expected.abs() + 1.1 * delta + 2 * SUBNORMAL[dtype]
    err = (y - expected).abs()
    assert torch.isfinite(y).all()
    worst = err.argmax()
    assert (err <= bound).all(), f"error {err.flatten()[worst]} > bound {bound.flatten()[worst]}"


def cpu(t):
    return t.cpu() if t is not None else None


def abs_sum_linear(g, K, transpose):
    """Per output element, the sum of |g| over its terms: |g| @ ones (or |g|^T @ ones)."""
    a = g.float().abs().cpu()
    return (a.T if transpose else a).sum(1, keepdim=True).expand(-1, K)


# ---- the saved input: sign and mask words ----------------------------------------------------

# Values at and around the clip of 1.005 rounded to each dtype (bf16: 1.0078125, fp16:
# 1.0048828125): the mask must compare in x's dtype as SteSign does.
EDGES = [1.0, 1.0078125, -1.0078125, 1.0048828125, 1.005, 1.01, -0.0, float("nan")]
CLIP = 1.005


def with_edges(x):
    flat = x.view(-1)
    n = min(flat.numel(), len(EDGES))
    flat[:n] = torch.tensor(EDGES[:n]).to(x.dtype)
    return x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,strided", [((5, 70), False), ((3, 2, 33), True), ((1, 32), False), ((4, 0), False)])
def test_pack_sign_and_mask(device, dtype, shape, strided):
    x = with_edges(random_signs_input((*shape[:-1], 2 * shape[-1]), dtype, "cpu") * 1.5)
    x = x[..., ::2] if strided else x[..., : shape[-1]]
    words_shape = (*shape[:-1], -(-shape[-1] // 32))
    out = (poisoned(words_shape, torch.int32, device), poisoned(words_shape, torch.int32, device))
    sign_words, mask_words = saved.pack_sign_and_mask(x.to(device), CLIP, out=out)
    assert sign_words is out[0] and mask_words is out[1]
    expected_sign, expected_mask = ref.pack_sign_and_mask_reference(x, CLIP)
    assert torch.equal(sign_words.cpu(), expected_sign) and torch.equal(mask_words.cpu(), expected_mask)
    # The reference is the quantizer's own rule: the pass bit is 1 exactly where ste_sign's
    # surrogate derivative is 1, and the sign bit where its forward gives -1.
    assert torch.equal(expected_mask, pack_bits(SteSign(CLIP).derivative(x) != 0))
    assert torch.equal(expected_sign, pack_bits(SteSign(CLIP)(x) < 0))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "N,C,H,W,groups,dtype",
    [
        (2, 40, 3, 5, 1, torch.bfloat16),
        (2, 70, 3, 2, 2, torch.float16),
        (1, 6, 4, 3, 3, torch.float32),
        (2, 96, 2, 2, 3, torch.bfloat16),  # Cg = 32: whole words
    ],
)
def test_pack_sign_and_mask_conv(device, N, C, H, W, groups, dtype, channels_last):
    x = with_edges(random_signs_input((N, C, H, W), dtype, "cpu") * 1.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    words_shape = (N, H, W, groups * -(-(C // groups) // 32))
    out = (poisoned(words_shape, torch.int32, device), poisoned(words_shape, torch.int32, device))
    sign_words, mask_words = saved.pack_sign_and_mask_conv(x.to(device), CLIP, groups, out=out)
    expected_sign, expected_mask = ref.pack_sign_and_mask_conv_reference(x, CLIP, groups)
    assert torch.equal(sign_words.cpu(), expected_sign) and torch.equal(mask_words.cpu(), expected_mask)
    # Word layout: unpacking gives back the quantizer's signs and pass mask in (N, C, H, W).
    assert torch.equal(ref.unpack_conv_words(expected_sign, C, groups, torch.float32), SteSign(CLIP)(x.float()))
    passes = ref.unpack_conv_words(expected_mask, C, groups, torch.float32) < 0
    assert torch.equal(passes, SteSign(CLIP).derivative(x) != 0)


# ---- linear ------------------------------------------------------------------------------------

# (M batch, N out_features, K in_features): M = 1, and sizes not multiples of any block or of 32;
# N = 10 runs grad_weight (N rows of output) on the GEMM's small-batch layout.
LINEAR_SHAPES = [(1, 33, 70), (37, 45, 100), (20, 70, 33), (24, 10, 50)]
# grad_weight reads grad_out transposed (strides (1, N)) in the GEMM: (config, dtype) pairs, the
# interpreter's small configs tiling it in every dimension, swapped (the small-batch layout) and
# split over K.
if DEVICE == "cuda":
    GEMM_CONFIGS = [(None, dtype) for dtype in FLOAT_DTYPES]
else:
    GEMM_CONFIGS = list(zip([None, *gemm_configs.INTERPRETER_CONFIGS.values()], [*FLOAT_DTYPES, torch.float32]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES)
def test_linear_grad_weight_exact(device, M, N, K, dtype):
    x = random_signs_input((M, K), dtype, device)
    sign_words, _ = saved.pack_sign_and_mask(x, 1.0)
    g = dyadic((M, N), dtype)
    for out_dtype in (dtype, torch.float32):
        out = poisoned((N, K), out_dtype, device)
        y = linear_backward.grad_weight(g, sign_words, K, out=out)
        assert y is out
        assert torch.equal(y.cpu(), ref.linear_grad_weight_reference(g.cpu(), sign_words.cpu(), K, out_dtype))
    assert linear_backward.grad_weight(g, sign_words, K, out_dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("config,dtype", GEMM_CONFIGS)
def test_linear_grad_weight_random(device, config, dtype):
    M, N, K = LINEAR_SHAPES[1]
    sign_words, _ = saved.pack_sign_and_mask(random_signs_input((M, K), dtype, device), 1.0)
    g = random_signs_input((M, N), dtype, device, finite=True)
    y = linear_backward.grad_weight(g, sign_words, K, out=poisoned((N, K), dtype, device), config=config)
    expected = ref.linear_grad_weight_reference(g.cpu(), sign_words.cpu(), K)
    assert_close_sum(y, expected, abs_sum_linear(g, K, transpose=True), M, dtype == torch.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES)
def test_linear_grad_input_exact(device, M, N, K, dtype):
    _, mask_words = saved.pack_sign_and_mask(random_signs_input((M, K), dtype, device) * 1.5, 1.0)
    words = pack_weight(torch.randn(N, K)).to(device)
    g = dyadic((M, N), dtype)
    for mask in (mask_words, None):
        out = poisoned((M, K), dtype, device)
        assert linear_backward.grad_input(g, words, mask, K, out=out) is out
        assert torch.equal(out.cpu(), ref.linear_grad_input_reference(g.cpu(), words.cpu(), cpu(mask), K))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_grad_input_random(device, dtype):
    M, N, K = LINEAR_SHAPES[1]
    _, mask_words = saved.pack_sign_and_mask(random_signs_input((M, K), dtype, device) * 1.5, 1.0)
    words = pack_weight(torch.randn(N, K)).to(device)
    g = random_signs_input((M, N), dtype, device, finite=True).t().contiguous().t()  # column-major
    y = linear_backward.grad_input(g, words, mask_words, K)
    expected = ref.linear_grad_input_reference(g.cpu(), words.cpu(), mask_words.cpu(), K)
    assert_close_sum(y, expected, abs_sum_linear(g, K, transpose=False), N, dtype == torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf in the interpreter's matmul
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_mask_blocks_inf_and_nan(device, dtype):
    """A blocked position is 0 even where grad_out @ W is inf or NaN (a select, as SteSign.grad)."""
    M, N, K = 3, 5, 40
    g = dyadic((M, N), dtype)
    g[1, 2] = float("inf")
    g[2, 0], g[2, 1] = float("inf"), float("-inf")
    x = torch.full((M, K), -0.5, dtype=dtype)
    x[1:, ::3] = 7.0  # blocked
    _, mask_words = saved.pack_sign_and_mask(x.to(device), 1.0)
    words = pack_weight(torch.randn(N, K)).to(device)
    words[:2] = 0  # rows 0 and 1 all +1: row 2 of the product is inf - inf
    y = linear_backward.grad_input(g, words, mask_words, K).cpu()
    expected = ref.linear_grad_input_reference(g.cpu(), words.cpu(), mask_words.cpu(), K)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert (y[1:, ::3] == 0).all() and y[1, 1:3].isinf().all() and y[2, 1:3].isnan().all()


# ---- conv2d ------------------------------------------------------------------------------------


def conv_case(N, C, H, W, O, kernel, stride, padding, dilation, groups, pad_value, dtype, layout, config=None):
    return dict(
        N=N,
        C=C,
        H=H,
        W=W,
        O=O,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
        dtype=dtype,
        layout=layout,
        config=config,
    )


# layout: grad_out's ("nchw", "channels_last", "strided": a view of every other channel) and the
# gradients' (channels_last for "channels_last"). config: None (the interpreter's), "split" (its
# tile, grad_weight's pixels in 2 shares), "small" (one-word tiles, grad_weight split 2 ways).
CONV_CASES = [
    conv_case(2, 40, 5, 6, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.0, torch.bfloat16, "nchw", "split"),
    conv_case(2, 70, 7, 6, 18, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2, -1.0, torch.float16, "channels_last"),
    conv_case(2, 70, 7, 6, 40, (1, 1), (2, 2), (0, 1, 0, 1), (1, 1), 1, 1.0, torch.float32, "strided", "small"),
    conv_case(2, 6, 6, 5, 6, (3, 3), (1, 2), (2, 2, 1, 1), (2, 1), 3, 1.0, torch.bfloat16, "channels_last"),
]
CONFIGS = {
    "small": {
        "grad_weight": triton.Config(dict(BLOCK_O=16, BLOCK_C=32, BLOCK_M=16, SPLIT_K=2), num_warps=4, num_stages=1),
        "grad_input": triton.Config(dict(BLOCK_M=16, BLOCK_C=32, BLOCK_O=16), num_warps=4, num_stages=1),
    },
    "split": {
        "grad_weight": triton.Config(dict(BLOCK_O=32, BLOCK_C=64, BLOCK_M=32, SPLIT_K=2), num_warps=4, num_stages=1),
        "grad_input": None,
    },
}


def _case_id(c):
    return f"{c['C']}x{c['H']}x{c['W']}-O{c['O']}-k{c['kernel']}-s{c['stride']}-g{c['groups']}-{c['layout']}"


def output_hw(c):
    pt, pb, pl, pr = c["padding"]
    (kh, kw), (sh, sw), (dh, dw) = c["kernel"], c["stride"], c["dilation"]
    return (c["H"] + pt + pb - dh * (kh - 1) - 1) // sh + 1, (c["W"] + pl + pr - dw * (kw - 1) - 1) // sw + 1


def conv_inputs(c, grad_values):
    """(grad_out on the device in the case's layout, sign words, mask words, weight words)."""
    N, C, O, dtype = c["N"], c["C"], c["O"], c["dtype"]
    x = random_signs_input((N, C, c["H"], c["W"]), dtype, DEVICE) * 1.5
    sign_words, mask_words = saved.pack_sign_and_mask_conv(x, 1.0, c["groups"])
    OH, OW = output_hw(c)
    g = grad_values((N, 2 * O if c["layout"] == "strided" else O, OH, OW), dtype)
    if c["layout"] == "strided":
        g = g[:, ::2]
    elif c["layout"] == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    words = pack_weight(torch.randn(O, C // c["groups"], *c["kernel"])).to(DEVICE)
    return g, sign_words, mask_words, words


def geometry(c):
    return dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])


def run_grad_weight(c, g, sign_words, out_dtype=None):
    shape = (c["O"], c["C"] // c["groups"], *c["kernel"])
    channels_last = c["layout"] == "channels_last"
    out = poisoned(shape, out_dtype or g.dtype, DEVICE)
    out = out.contiguous(memory_format=torch.channels_last) if channels_last else out
    config = CONFIGS[c["config"]]["grad_weight"] if c["config"] else None
    y = conv2d_backward.grad_weight(
        g, sign_words, shape, pad_value=c["pad_value"], out=out, config=config, **geometry(c)
    )
    assert y is out
    expected = ref.conv2d_grad_weight_reference(
        g.cpu(), sign_words.cpu(), shape, pad_value=c["pad_value"], out_dtype=out_dtype, **geometry(c)
    )
    return y, expected


def run_grad_input(c, g, words, mask_words):
    shape = (c["N"], c["C"], c["H"], c["W"])
    out = poisoned(shape, g.dtype, DEVICE)
    out = out.contiguous(memory_format=torch.channels_last) if c["layout"] == "channels_last" else out
    config = CONFIGS[c["config"]]["grad_input"] if c["config"] else None
    y = conv2d_backward.grad_input(g, words, mask_words, shape, out=out, config=config, **geometry(c))
    assert y is out
    return y, ref.conv2d_grad_input_reference(g.cpu(), words.cpu(), cpu(mask_words), shape, **geometry(c))


@pytest.mark.parametrize("c", CONV_CASES, ids=_case_id)
def test_conv2d_grad_weight_exact(c):
    g, sign_words, _, _ = conv_inputs(c, dyadic)
    y, expected = run_grad_weight(c, g, sign_words)
    assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("c", CONV_CASES, ids=_case_id)
def test_conv2d_grad_input_exact(c):
    g, _, mask_words, words = conv_inputs(c, dyadic)
    y, expected = run_grad_input(c, g, words, mask_words)
    assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv2d_random_grad_out(dtype):
    """Random grad_out: fp32 sums in another order than the reference's, and for fp32 grad_out the
    TF32 split, within :func:`assert_close_sum`'s bound; grad_weight into an fp32 gradient."""
    c = dict(CONV_CASES[0], dtype=dtype, pad_value=-1.0, H=4, W=4)
    g, sign_words, mask_words, words = conv_inputs(
        c, lambda shape, dt: random_signs_input(shape, dt, DEVICE, finite=True)
    )
    fp32_grad = dtype == torch.float32
    y, expected = run_grad_weight(c, g, sign_words, out_dtype=torch.float32)
    ones = torch.zeros_like(sign_words.cpu())  # all +1: the sum of |g| over the terms
    shape = (c["O"], c["C"], *c["kernel"])
    abs_sum = ref.conv2d_grad_weight_reference(g.cpu().abs(), ones, shape, pad_value=1.0, **geometry(c))
    assert_close_sum(y, expected, abs_sum, c["N"] * g.shape[2] * g.shape[3], fp32_grad)
    y, expected = run_grad_input(c, g, words, mask_words)
    abs_sum = ref.conv2d_grad_input_reference(
        g.cpu().abs(), torch.zeros_like(words.cpu()), None, y.shape, **geometry(c)
    )
    assert_close_sum(y, expected, abs_sum, c["O"] * c["kernel"][0] * c["kernel"][1], fp32_grad)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    data=st.data(),
    groups=st.integers(1, 3),
    Cg=st.integers(1, 40),
    Og=st.integers(1, 12),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(*[st.integers(0, 2)] * 4),
    pad_value=st.sampled_from([0.0, 1.0, -1.0]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(["nchw", "channels_last", "strided"]),
)
def test_conv2d_geometries(data, groups, Cg, Og, kernel, stride, dilation, padding, pad_value, dtype, layout):
    """Drawn geometries (strides that leave input pixels no output reads, dilations, asymmetric
    padding, groups with ragged channels): both gradients exact, on dyadic grad_out."""
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    H = data.draw(st.integers(max(1, reach[0] - padding[0] - padding[1]), 7), label="H")
    W = data.draw(st.integers(max(1, reach[1] - padding[2] - padding[3]), 7), label="W")
    c = conv_case(
        2, groups * Cg, H, W, groups * Og, kernel, stride, padding, dilation, groups, pad_value, dtype, layout
    )
    g, sign_words, mask_words, words = conv_inputs(c, dyadic)
    y, expected = run_grad_weight(c, g, sign_words)
    assert torch.equal(y.cpu(), expected)
    y, expected = run_grad_input(c, g, words, mask_words)
    assert torch.equal(y.cpu(), expected)


def test_empty_batches(device):
    g = torch.zeros(0, 4, 3, 3, device=device)
    words = torch.zeros(0, 3, 3, 1, dtype=torch.int32, device=device)
    y = conv2d_backward.grad_weight(g, words, (4, 5, 1, 1))
    assert torch.equal(y.cpu(), torch.zeros(4, 5, 1, 1))
    assert conv2d_backward.grad_input(
        g, pack_weight(torch.randn(4, 5, 1, 1)).to(device), words, (0, 5, 3, 3)
    ).shape == (0, 5, 3, 3)
    sign_words = torch.zeros(0, 2, dtype=torch.int32, device=device)
    assert torch.equal(
        linear_backward.grad_weight(torch.zeros(0, 3, device=device), sign_words, 40).cpu(), torch.zeros(3, 40)
    )


def test_bad_arguments_are_refused(device):
    g = torch.zeros(1, 4, 3, 3, device=device)
    words = torch.zeros(1, 5, 5, 1, dtype=torch.int32, device=device)
    weight_words = pack_weight(torch.randn(4, 5, 3, 3)).to(device)
    with pytest.raises(ValueError, match="pad_value"):
        conv2d_backward.grad_weight(g, words, (4, 5, 3, 3), pad_value=0.5)
    with pytest.raises(ValueError, match="geometry gives 5x5"):
        conv2d_backward.grad_weight(g, words, (4, 5, 3, 3), padding=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="do not fit a weight"):
        conv2d_backward.grad_weight(g, words, (4, 40, 3, 3))
    with pytest.raises(ValueError, match="mask words"):
        conv2d_backward.grad_input(g, weight_words, words[:, :4], (1, 5, 5, 5))
    with pytest.raises(ValueError, match="do not fit an input"):
        conv2d_backward.grad_input(g, weight_words, words, (1, 6, 5, 5), groups=4)
    with pytest.raises(ValueError, match="mask_words"):
        linear_backward.grad_input(torch.zeros(2, 4, device=device), weight_words[:, 0, 0].contiguous(), words[0, 0], 5)


# ---- the references against the layers' autograd --------------------------------------------


# (N, C, H, W, O, kernel, stride, padding, dilation, groups, pad_value, channels_last), as
# binary_conv2d takes them ("same" with an even kernel pads asymmetrically).
LAYER_CASES = [
    (2, 40, 5, 6, 20, 3, 1, 1, 1, 1, 0.0, False),
    (2, 70, 7, 6, 18, (3, 2), (2, 1), (1, 2), (1, 2), 2, -1.0, True),
    (1, 6, 6, 5, 6, 3, (1, 2), (2, 1), (2, 1), 3, 1.0, False),
    (2, 8, 6, 6, 4, 4, 1, "same", 1, 1, 1.0, True),
]


@pytest.mark.parametrize("N,C,H,W,O,kernel,stride,padding,dilation,groups,pad_value,channels_last", LAYER_CASES)
def test_conv2d_references_give_the_layer_gradients(
    N, C, H, W, O, kernel, stride, padding, dilation, groups, pad_value, channels_last
):
    """From the saved words alone, the references give binary_conv2d's gradients (ste_sign, its
    backward on dense x and weight), bit for bit in fp32 on dyadic grad_out, in x's memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (random_signs_input((N, C, H, W), torch.float32, "cpu") * 1.5).contiguous(memory_format=fmt).requires_grad_()
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    weight = BinaryTensor.from_float(torch.randn(O, C // groups, *kernel), requires_grad=True)
    y = bnnops.binary_conv2d(x, weight, None, stride, padding, dilation, groups, pad_value=pad_value)
    g = dyadic(y.shape, torch.float32).cpu()
    y.backward(g)
    stride, dilation = bnnops.conv.as_pair(stride, "stride"), bnnops.conv.as_pair(dilation, "dilation")
    pads = bnnops.conv.conv_padding(padding, kernel, stride, dilation)
    sign_words, mask_words = ref.pack_sign_and_mask_conv_reference(x.detach(), 1.0, groups)
    geometry = dict(stride=stride, padding=pads, dilation=dilation, groups=groups, channels_last=channels_last)
    grad_weight = ref.conv2d_grad_weight_reference(g, sign_words, weight.shape, pad_value=pad_value, **geometry)
    grad_x = ref.conv2d_grad_input_reference(g, weight.words, mask_words, x.shape, **geometry)
    assert torch.equal(grad_weight, weight.grad) and grad_weight.is_contiguous(memory_format=fmt)
    assert torch.equal(grad_x, x.grad) and grad_x.is_contiguous(memory_format=fmt)


def test_linear_references_give_the_layer_gradients():
    """The linear references from the saved words give binary_linear's gradients (ste_sign)."""
    x = (random_signs_input((37, 100), torch.float32, "cpu") * 1.5).requires_grad_()
    weight = BinaryTensor.from_float(torch.randn(45, 100), requires_grad=True)
    y = bnnops.binary_linear(x, weight)
    g = dyadic(y.shape, torch.float32).cpu()
    y.backward(g)
    sign_words, mask_words = ref.pack_sign_and_mask_reference(x.detach(), 1.0)
    assert torch.equal(ref.linear_grad_weight_reference(g, sign_words, 100), weight.grad)
    assert torch.equal(ref.linear_grad_input_reference(g, weight.words, mask_words, 100), x.grad)


# ---- offline compile for sm_90 -----------------------------------------------------------------

# Compiles for sm_90 in a process without the interpreter (no GPU needed: Triton ships ptxas and
# cuobjdump) the conv backward kernels as the launchers would launch them for ResNet-18 layers
# at batch 256 (conv4_x and conv3_x, the downsampling 3x3 into conv3_x) (the launchers run on meta tensors; a stand-in records each launch's arguments, and
# the signature specializes them as a launch does: ints equal to 1 become constants, multiples of
# 16 are marked divisible, pointers 16-byte aligned), plus the pack and mask kernels; prints each
# kernel's registers, spills and tensor-core instructions.
_COMPILE_FOR_H100 = """
import os, re, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bnnops.kernels import conv2d_backward as cb, saved_activations as sa

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}
launches = []

class Record:
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

for name in ("_grad_weight_kernel", "_grad_input_kernel", "_sum_shares_kernel"):
    setattr(cb, name, Record(getattr(cb, name)))
sa._pack_sign_and_mask_kernel = Record(sa._pack_sign_and_mask_kernel)
cb._device_sms = lambda device: 132

def layer(c, hw, o, k, stride, dtype, channels_last):
    n, pad = 256, k // 2
    oh = (hw + 2 * pad - k) // stride + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.empty(n, o, oh, oh, dtype=dtype, device="meta").contiguous(memory_format=fmt)
    words = torch.empty(n, hw, hw, -(-c // 32), dtype=torch.int32, device="meta")
    w = torch.empty(o, k, k, -(-c // 32), dtype=torch.int32, device="meta")
    geometry = dict(stride=(stride, stride), padding=(pad,) * 4, channels_last=channels_last)
    cb.grad_weight(g, words, (o, c, k, k), **geometry)
    cb.grad_input(g, w, words, (n, c, hw, hw), **geometry)

# The largest tiles of each kernel, layout and dtype (the most registers), and the NCHW
# downsampling layer's 128 x 64 weight-gradient tile (which spilled at 4 warps).
for channels_last in (True, False):
    layer(256, 14, 256, 3, 1, torch.bfloat16, channels_last)
    layer(128, 28, 128, 3, 1, torch.float32, channels_last)
layer(64, 56, 128, 3, 2, torch.bfloat16, False)
x = torch.empty(256, 64, 56, 56, dtype=torch.bfloat16, device="meta")
sa.pack_sign_and_mask_conv(x, 1.0)
sa.pack_sign_and_mask_conv(x.contiguous(memory_format=torch.channels_last), 1.0)

compiled = {}
for fn, args, kwargs in launches:
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    consts, signature, attrs = dict(kwargs), {}, {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in consts})
    key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(consts.items())), repr(sorted(attrs)), repr(options))
    if key in compiled:
        continue
    compiled[key] = True
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs, stack, local = re.search(r"REG:(\\d+) STACK:(\\d+) SHARED:\\d+ LOCAL:(\\d+)", usage).groups()
    mma = ",".join(sorted(set(re.findall(r"HGMMA\\.\\w+", sass)))) or "none"
    tile = {k: v for k, v in consts.items() if k.startswith("BLOCK")}
    print(fn.__name__, signature.get("g_ptr", "-"), tile, "mma", mma, "regs", regs, "spill", int(stack) + int(local))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests run the compiled kernels themselves")
def test_kernels_compile_for_h100_without_spills():
    """The conv backward kernels compile for sm_90 as launched for ResNet-18's layers (NCHW and
    channels_last, bf16 and fp32 grad_out), their dots run on wgmma (HGMMA), and no kernel spills
    to local memory; the pack kernel compiles too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    if run.returncode != 0 and ("ptxas" in run.stderr or "backend" in run.stderr.lower()):
        pytest.skip(f"this Triton build cannot compile for CUDA offline: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    names = {line.split()[0] for line in lines}
    assert names == {
        "_grad_weight_kernel",
        "_grad_input_kernel",
        "_sum_shares_kernel",
        "_pack_sign_and_mask_kernel",
    }, run.stdout
    for line in lines:
        assert line.endswith("spill 0"), line
        if line.startswith(("_grad_weight", "_grad_input")):
            assert "mma HGMMA." in line, line
