"""bnnops::binary_conv2d: the reference against F.conv2d by hand, the Triton implicit-GEMM launcher
against the reference (interpreter on CPU, native on CUDA), the op's registration, checks and
torch.compile."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
from helpers import poisoned, random_signs_input

import bnnops.ops.conv  # noqa: F401  (registers bnnops::binary_conv2d)
from bnnops import kernels
from bnnops.ops.checks import DtypeError, ShapeError
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.ops.reference import binary_conv2d_reference
from bnnops.packing import pack_weight

FP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def conv_kernels():
    return kernels.load("conv2d")


@pytest.fixture(scope="module")
def conv_configs():
    return kernels.load("conv2d_configs")


def signs(t):
    return torch.where(t < 0, -1.0, 1.0)


def test_reference_is_f_conv2d_with_explicit_pad_value():
    # All-ones input and weight, 3x3: a corner output sees 4 image values and 5 padded ones, so it
    # is 4 with zero padding, 9 with pad_value +1 and 4 - 5 = -1 with -1 (larq's pad_values).
    x = torch.ones(1, 1, 4, 5)
    w = pack_weight(torch.ones(1, 1, 3, 3))
    corner = {0.0: 4.0, 1.0: 9.0, -1.0: -1.0}
    for pad_value, expected in corner.items():
        y = binary_conv2d_reference(x, w, padding=(1, 1, 1, 1), pad_value=pad_value)
        assert y.shape == (1, 1, 4, 5)
        assert y[0, 0, 0, 0].item() == expected and y[0, 0, 1, 1].item() == 9.0
    # Random +-1 data: the same as F.conv2d on the dense weight after an explicit pad.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 9, generator=g)
    dense = torch.randn(4, 3, 3, 2, generator=g)
    y = binary_conv2d_reference(
        x, pack_weight(dense), torch.arange(4.0), torch.full((4,), 0.5), (2, 1), (1, 0, 2, 1), (1, 2), 2, -1.0, True
    )
    padded = F.pad(signs(x), (2, 1, 1, 0), value=-1.0)
    expected = F.conv2d(padded, signs(dense), None, (2, 1), 0, (1, 2), 2) * 0.5 + torch.arange(4.0).view(1, 4, 1, 1)
    assert torch.equal(y, expected)


# (N, C, H, W, O, kernel, stride, padding (t, b, l, r), dilation, groups, pad_value, dtype,
#  channels_last, scale_bias, binarize, route). Few cases: on CUDA each is a compile.
CASES = [
    (2, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.0, "fp32", False, False, True, "fp8"),
    (1, 31, 5, 7, 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.0, "bf16", True, True, True, "fp8"),
    (2, 33, 7, 5, 40, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 1.0, "bf16", False, True, True, "int8"),
    (1, 64, 6, 6, 33, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, -1.0, "fp16", True, False, True, "fp8"),
    (1, 100, 5, 5, 7, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1, -1.0, "fp32", True, True, True, "int8"),
    (2, 5, 9, 8, 4, (5, 5), (1, 2), (2, 1, 2, 2), (1, 1), 1, 1.0, "fp16", False, True, True, "fp8"),
    (1, 40, 7, 7, 6, (3, 3), (1, 1), (1, 1, 1, 1), (2, 1), 2, 1.0, "bf16", True, False, True, "fp8"),
    (2, 8, 5, 6, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, 0.0, "fp32", False, True, True, "int8"),
    (1, 33, 7, 6, 9, (3, 3), (2, 1), (1, 1, 0, 1), (1, 1), 3, -1.0, "bf16", False, True, True, "fp8"),
    (1, 36, 6, 5, 6, (3, 3), (1, 1), (0, 1, 1, 0), (1, 1), 1, 1.0, "fp32", True, True, True, "fp8"),
    # W1A16: real inputs (a first layer), including a pad value on real data.
    (2, 3, 9, 7, 8, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 1, 0.0, "fp32", False, True, False, "fp8"),
    (1, 34, 6, 5, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, 1.0, "bf16", True, True, False, "fp8"),
    (2, 6, 5, 7, 5, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 0.0, "fp16", True, False, False, "fp8"),
]


def _case_id(c):
    N, C, H, W, O, k, st, _pad, dil, g, pv, dt, cl, sb, binarize, ar = c
    return (
        f"{'w1a1' if binarize else 'w1a16'}-N{N}C{C}x{H}x{W}-O{O}k{k[0]}x{k[1]}-s{st[0]}{st[1]}-d{dil[0]}{dil[1]}"
        f"-g{g}-pad{pv:+.0f}-{dt}{'-cl' if cl else ''}{'-sb' if sb else ''}{'-' + ar if binarize else ''}"
    )


ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _tolerance(dtype, binarize, x, K):
    """(rtol, atol) against the fp32 reference.

    W1A1: the sums are exact integers and the epilogue rounds scale * acc, then + bias, in fp32
    without FMA (as the reference's separate mul and add), then once to the output dtype with
    round-to-nearest-even (by hand for bf16, which Triton's interpreter would truncate): bit-exact
    on every backend. W1A16: products are exact (16-bit x times +-1 in TF32) or 3xTF32 (fp32 x,
    ~2^-21 relative), and the fp32 sums differ from the reference's by order: at most
    K * 2^-20 * max|x| in all, plus a final rounding: 2 ulp of the output dtype.
    """
    if binarize:
        return 0.0, 0.0
    return 2 * ULP[dtype], K * 2.0**-20 * x.abs().max().item()


@pytest.mark.parametrize("c", CASES, ids=_case_id)
def test_kernel_matches_reference(conv_kernels, device, c):
    N, C, H, W, O, (kh, kw), stride, padding, dilation, groups, pad_value, dt, cl, sb, binarize, ar = c
    dtype = FP[dt]
    g = torch.Generator().manual_seed(C * 1000 + O)
    x = random_signs_input((N, C, H, W), dtype, "cpu", generator=g, finite=not binarize)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dense = torch.randn(O, C // groups, kh, kw, generator=g)
    words = pack_weight(dense)
    scale = torch.rand(O, generator=g) + 0.5 if sb else None
    bias = torch.randn(O, generator=g) if sb else None
    expected = binary_conv2d_reference(x, words, bias, scale, stride, padding, dilation, groups, pad_value, binarize)

    out = poisoned(expected.shape, dtype, device)
    if cl:
        out = out.contiguous(memory_format=torch.channels_last)
    to = lambda t: None if t is None else t.to(device)
    y = conv_kernels.conv2d(
        x.to(device),
        words.to(device),
        bias=to(bias),
        scale=to(scale),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
        binarize=binarize,
        route=ar,
        out=out,
    )
    assert y is out
    rtol, atol = _tolerance(dtype, binarize, x.float(), kh * kw * C // groups)
    torch.testing.assert_close(y.cpu(), expected, rtol=rtol, atol=atol)


def test_prepare_writes_padded_signs_and_unpacked_weight(conv_kernels, device):
    # The operands the K loop reads: sign(x) channels-last with the pad value on the border, and
    # the weight words unpacked to +-1 along the padded reduction (padding bits -> +1).
    g = torch.Generator().manual_seed(3)
    x = random_signs_input((2, 35, 4, 3), torch.bfloat16, "cpu", generator=g)
    dense = torch.randn(5, 35, 3, 2, generator=g)
    words = pack_weight(dense)
    a, w = conv_kernels.prepare(x.to(device), words.to(device), torch.int8, True, (1, 2, 0, 1), -1.0)
    expected_a = F.pad(signs(x.float()), (0, 1, 1, 2), value=-1.0).permute(0, 2, 3, 1)
    assert a.shape == (2, 7, 4, 35) and torch.equal(a.cpu(), expected_a.to(torch.int8))
    expected_w = F.pad(signs(dense).permute(0, 2, 3, 1), (0, 64 - 35), value=1.0)
    assert w.shape == (5, 3, 2, 64) and torch.equal(w.cpu(), expected_w.to(torch.int8))


@pytest.mark.parametrize(
    "C, kernel, route",
    [(512, 3, "fp8"), (512, 3, "int8"), (16384, 1, "fp8")],
    ids=["K4608-fp8", "K4608-int8", "K16384-fp8"],
)
def test_kernel_exact_at_the_largest_sums(conv_kernels, device, C, kernel, route):
    # Output channel 0 sums K products of +1 and channel 1 K products of -1 at the centre pixel:
    # the extremes an fp8 accumulator must still hold exactly (FP8_EXACT_K = 16384). The second
    # image and the other channels are random. BLOCK_K = 128 keeps the interpreter's step count low.
    x = torch.randn(2, C, kernel, kernel)
    x[0] = 1.0
    dense = torch.randn(4, C, kernel, kernel)
    dense[0], dense[1] = 1.0, -1.0
    words = pack_weight(dense)
    pad = (kernel // 2,) * 4
    expected = binary_conv2d_reference(x, words, padding=pad)
    assert expected[0, 0, kernel // 2, kernel // 2] == C * kernel * kernel
    # On the GPU the config it would pick (the wgmma path whose accumulator is in question).
    config = (
        None
        if device == "cuda"
        else triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128), num_warps=4, num_stages=1)
    )
    y = conv_kernels.conv2d(x.to(device), words.to(device), padding=pad, route=route, config=config)
    assert torch.equal(y.cpu(), expected)


def test_kernel_allocates_in_the_input_memory_format(conv_kernels, device):
    x = torch.randn(2, 33, 6, 5, device=device)
    words = pack_weight(torch.randn(8, 33, 3, 3)).to(device)
    for x_in, channels_last in (
        (x, False),
        (x.contiguous(memory_format=torch.channels_last), True),
        (x[:, :, :, 1:], False),
    ):  # a non-contiguous NCHW view
        y = conv_kernels.conv2d(x_in, words, padding=(1, 1, 1, 1))
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        expected = binary_conv2d_reference(x_in.cpu(), words.cpu(), padding=(1, 1, 1, 1))
        assert torch.equal(y.cpu(), expected)


def _tile(config):
    return (*(config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), config.num_warps, config.num_stages)


def test_pick_config(conv_configs, monkeypatch):
    # The H100 table's picks for ResNet-18's 3x3 layers (M = batch*hw*hw, Og = Cg = c): the
    # largest tile up to 256x128 that leaves two tiles per SM, columns at most 128 wide, BLOCK_K
    # at most Cg; fp32 outputs at most 128x128; W1A16 its one config; a GPU without a table the
    # H100's; the interpreter its small config.
    monkeypatch.setattr(conv_configs, "_INTERPRET", False)

    def pick(batch, hw, c, **kwargs):
        return _tile(conv_configs.pick_config(batch * hw * hw, c, c, **kwargs))

    assert pick(256, 56, 64) == (256, 64, 64, 8, 4)
    assert pick(256, 28, 128) == (256, 128, 128, 8, 3)
    assert pick(256, 14, 256) == (256, 128, 128, 8, 3)
    assert pick(256, 7, 512) == (128, 128, 128, 8, 3)
    assert pick(64, 28, 128) == (128, 128, 128, 8, 3)
    assert pick(64, 14, 256) == (64, 128, 128, 4, 3)
    assert pick(64, 7, 512) == (64, 64, 128, 4, 3)
    assert pick(1, 8, 8) == (64, 64, 32, 4, 4)
    assert pick(256, 28, 128, out_bytes=4) == (128, 128, 128, 8, 3)
    assert pick(256, 28, 128, n_sms=500) == (128, 128, 128, 8, 3)  # 784 tiles of 256x128 < 2 * 500
    assert pick(256, 56, 64, binarize=False) == _tile(conv_configs.W1A16_CONFIG) == (64, 64, 32, 4, 3)
    assert pick(256, 7, 512, arch=80) == pick(256, 7, 512, arch=conv_configs.SM90)
    monkeypatch.setattr(conv_configs, "_INTERPRET", True)
    assert conv_configs.pick_config(10**6, 512, 512) is conv_configs.INTERPRETER_CONFIG


def test_pixel_run(conv_kernels):
    # OUT_VEC: the largest power of two up to 8 dividing OH*OW where each channel's pixels are
    # consecutive (stride(3) == 1, stride(2) == OW), else 1 (no promise).
    for (oh, ow), run in {
        (1, 1): 1,
        (1, 2): 2,
        (2, 3): 2,
        (3, 4): 4,
        (7, 7): 1,
        (14, 14): 4,
        (4, 6): 8,
        (32, 32): 8,
    }.items():
        assert conv_kernels._pixel_run(torch.empty(2, 3, oh, ow)) == run, (oh, ow)
    assert conv_kernels._pixel_run(torch.empty(2, 3, 4, 6, memory_format=torch.channels_last)) == 1
    assert conv_kernels._pixel_run(torch.empty(2, 3, 4, 7)[..., :6]) == 1  # rows padded to 7
    assert conv_kernels._pixel_run(torch.empty(2, 3, 6, 4).transpose(2, 3)) == 1
    assert conv_kernels._pixel_run(torch.empty(2, 12, 4, 6)[:, 3:11]) == 8  # a channel slice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H, W", [(4, 6), (3, 4), (1, 6), (3, 3)], ids=["run8", "run4", "run2", "run1"])
def test_kernel_writes_into_strided_out_views(conv_kernels, device, dtype, H, W):
    # The output store either walks (image, row, column) by the strides or, where each channel's
    # pixels are consecutive (NCHW), runs of OH*OW's largest power-of-two divisor up to 8 (8, 4,
    # 2 and none here), three images; only the view's elements change, in buffers with a fourth
    # image after the view, so a row past M that were stored would show.
    g = torch.Generator().manual_seed(H * W)
    x = random_signs_input((3, 33, H, W), dtype, "cpu", generator=g).to(device)
    words = pack_weight(torch.randn(8, 33, 3, 3, generator=g)).to(device)
    expected = binary_conv2d_reference(x.cpu(), words.cpu(), padding=(1, 1, 1, 1))
    for name, buffer, view in (
        ("NCHW", (4, 8, H, W), lambda b: b[:3]),
        ("channel slice of a larger NCHW buffer", (4, 12, H, W), lambda b: b[:3, 3:11]),
        ("rows padded by a column", (4, 8, H, W + 1), lambda b: b[:3, :, :, :W]),
    ):
        big = poisoned(buffer, dtype, device)
        out = view(big)
        conv_kernels.conv2d(x, words, padding=(1, 1, 1, 1), out=out)
        torch.testing.assert_close(out.cpu(), expected, rtol=0.0, atol=0.0, msg=name)
        outside = torch.ones(buffer, dtype=torch.bool)
        view(outside).fill_(False)
        assert big.cpu()[outside].isnan().all(), name


def test_op_matches_reference_and_opcheck(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 33, 7, 6, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    words = pack_weight(torch.randn(9, 11, 3, 3, generator=g)).to(device)
    bias = torch.randn(9, generator=g).to(device)
    args = (x, words, bias, None, [2, 1], [1, 1, 1, 0], [1, 1], 3, 1.0, True)
    y = torch.ops.bnnops.binary_conv2d(*args)
    expected = binary_conv2d_reference(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(y.cpu(), expected, rtol=2.0**-22, atol=0.0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.bnnops.binary_conv2d, args)
    w1a16 = (x.half(), words, None, torch.rand(9, device=device), [1, 1], [0, 0, 0, 0], [1, 1], 3, 0.0, False)
    torch.library.opcheck(torch.ops.bnnops.binary_conv2d, w1a16)


@pytest.mark.parametrize("binarize", [True, False], ids=["w1a1", "w1a16"])
def test_out_dtype_fp32_is_the_unrounded_product(device, binarize):
    """``out_dtype=torch.float32`` for 16-bit x: the fp32 result, rounded nowhere (what a layer
    with a learnable scale needs), on the reference, the launcher and the fake alike."""
    g = torch.Generator().manual_seed(9)
    x = random_signs_input((2, 40, 6, 5), torch.bfloat16, "cpu", generator=g, finite=True)
    x = x.contiguous(memory_format=torch.channels_last)
    words = pack_weight(torch.randn(7, 40, 3, 3, generator=g))
    scale, bias = torch.rand(7, generator=g) + 0.5, torch.randn(7, generator=g)
    args = [x, words, bias, scale, [1, 1], [1, 1, 1, 1], [1, 1], 1, -1.0, binarize]
    expected = binary_conv2d_reference(*args, out_dtype=torch.float32)
    assert expected.dtype == torch.float32 and expected.is_contiguous(memory_format=torch.channels_last)
    # The same fp32 values as the default op rounds to x's dtype.
    assert torch.equal(expected.bfloat16(), binary_conv2d_reference(*args))
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    for y in (
        torch.ops.bnnops.binary_conv2d(*on_device, torch.float32),
        CUDA_IMPLEMENTATIONS["binary_conv2d"](*on_device, torch.float32),
    ):
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
        rtol, atol = _tolerance(torch.float32, binarize, x.float(), 9 * 40)
        torch.testing.assert_close(y.cpu(), expected, rtol=rtol, atol=atol)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.ops.bnnops.binary_conv2d(*meta, torch.float32).dtype == torch.float32
    torch.library.opcheck(torch.ops.bnnops.binary_conv2d, (*on_device, torch.float32))
    with pytest.raises(DtypeError, match="out_dtype must be float32"):
        torch.ops.bnnops.binary_conv2d(*on_device, torch.int32)


@pytest.mark.parametrize("groups, binarize", [(1, True), (2, False)])
def test_zero_input_channels_agree_on_every_path(device, groups, binarize):
    """With zero input channels every sum is empty: the output is (N, O, OH, OW) filled with the
    bias (times nothing: scale has no effect on 0), as nn.Conv2d's empty sum, from the CPU
    reference, the launcher and the fake alike. (F.conv2d on the CPU returns (N, 0, OH, OW).)"""
    x = torch.randn(2, 0, 6, 5)
    words = pack_weight(torch.randn(4, 0, 3, 2))
    assert words.shape == (4, 3, 2, 0)
    bias, scale = torch.randn(4), torch.rand(4) + 0.5
    args = [x, words, bias, scale, [2, 1], [1, 1, 0, 1], [1, 2], groups, 1.0, binarize]
    expected = bias.view(1, 4, 1, 1).expand(2, 4, 3, 4)
    reference = torch.ops.bnnops.binary_conv2d(*args)
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    launcher = CUDA_IMPLEMENTATIONS["binary_conv2d"](*on_device)
    fake = torch.ops.bnnops.binary_conv2d(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert reference.shape == launcher.shape == fake.shape == (2, 4, 3, 4)
    assert torch.equal(reference, expected) and torch.equal(launcher.cpu(), expected)
    unbiased = torch.ops.bnnops.binary_conv2d(x, words, None, scale, *args[4:])
    assert torch.equal(unbiased, torch.zeros(2, 4, 3, 4))


def test_op_under_torch_compile(device):
    x = torch.randn(2, 31, 6, 7, device=device)
    words = pack_weight(torch.randn(5, 31, 3, 3)).to(device)

    def f(x):
        return torch.ops.bnnops.binary_conv2d(x, words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, -1.0, True).relu()

    # aot_eager traces the op through fake tensors like inductor does, without inductor's C++ compile time.
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_op_rejects_bad_input(device):
    x = torch.randn(2, 8, 5, 5, device=device)
    words = pack_weight(torch.randn(4, 8, 3, 3)).to(device)
    op = torch.ops.bnnops.binary_conv2d

    def call(x=x, words=words, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), groups=1, pad_value=0.0):
        return op(x, words, bias, None, list(stride), list(padding), [1, 1], groups, pad_value, True)

    with pytest.raises(DtypeError, match="float32, bfloat16 or float16"):
        call(x=x.to(torch.int32))
    with pytest.raises(ShapeError, match="rank 4"):
        call(x=x[0])
    with pytest.raises(DtypeError, match="int32 packed words"):
        call(words=words.float())
    with pytest.raises(ShapeError, match=r"int32 packed words .* got shape \(3, 3, 1\)"):
        call(words=words[0])
    with pytest.raises(ShapeError, match=r"9 channels in 1 group\(s\)|words per tap"):
        call(x=torch.randn(2, 40, 5, 5, device=device))
    with pytest.raises(ShapeError, match="divide"):
        call(groups=3)
    with pytest.raises(ShapeError, match="larger than the padded input"):
        call(x=torch.randn(2, 8, 2, 5, device=device))
    with pytest.raises(ValueError, match="pad_value"):
        call(pad_value=0.5)
    with pytest.raises(ShapeError, match=r"shape \(4,\)"):
        call(bias=torch.randn(5, device=device))
    with pytest.raises(ShapeError, match="padding 4"):
        call(padding=(1, 1))


# Compiles, for sm_90 in a process without the interpreter (no GPU needed: Triton ships ptxas and
# cuobjdump), the W1A1 fp8 kernel with scale and bias in every config conv2d_configs.pick_config
# chooses for ResNet-18's 3x3 layers at batch 256 and 64 and for the GEMM's fp8 route at 4096^3 and
# 8192^3, as a launch on those shapes specializes it (16-byte aligned pointers, channel counts and
# strides divisible by 16, unit strides and dilations), and prints what the test checks: the wgmma
# waits of the TTGIR, the output's store instructions and the registers / spills of the cubin.
_COMPILE_FOR_H100 = """
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bnnops.kernels import conv2d, conv2d_configs
fn = conv2d._conv2d_kernel
picked = {(conv2d_configs.pick_config(n * hw * hw, c, c), "bf16")
          for n in (256, 64) for hw, c in ((56, 64), (28, 128), (14, 256), (7, 512))}
# The W1A1 GEMM's fp8 route (a 1x1 conv) at 4096^3 and 8192^3, with bf16 and fp32 outputs.
picked |= {(conv2d_configs.pick_config(n, n, n, True, 132, size), out) for n in (4096, 8192)
           for out, size in (("bf16", 2), ("fp32", 4))}
tiles = sorted((*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c.num_warps, c.num_stages, out)
               for c, out in picked)
# Each with a channels-last output (soc = 1) and an NCHW one (sow = 1, pixel runs of 8), which must
# store along the pixels in whole 16-byte vectors too. M's divisibility is not assumed.
layouts = [(tile, "channels_last") for tile in tiles] + [(tile, "nchw") for tile in tiles]
for (m, n, k, warps, stages, out), layout in layouts:
    strides = dict(soc=1, OUT_VEC=1) if layout == "channels_last" else dict(sow=1, OUT_VEC=8)
    consts = dict(A_MODE=conv2d.A_FP8, PRECISION="tf32", EVEN_K=True, HAS_SCALE=True, HAS_BIAS=True,
                  BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, stride_h=1, stride_w=1, dil_h=1, dil_w=1, **strides)
    pointers = {"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "out_ptr": "*" + out, "scale_ptr": "*fp32", "bias_ptr": "*fp32"}
    signature = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in fn.arg_names}
    aligned = set(pointers) | {"HWp", "C", "Cg", "Og", "son", "soh", "sow", "soc"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned and a not in consts}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})
    waits = [line.split("pendings = ")[1][0] for line in kernel.asm["ttgir"].splitlines() if "warp_group_dot_wait" in line]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    regs, stack, local = re.search(r"REG:(\\d+) STACK:(\\d+) SHARED:\\d+ LOCAL:(\\d+)", usage).groups()
    stores = ",".join(sorted(set(re.findall(r"STG\\.E[.\\w]*", sass))))
    print(m, n, k, out, layout, "stores", stores, "waits", ",".join(waits), "regs", regs, "spill", int(stack) + int(local))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests run the compiled kernel itself")
def test_picked_configs_compile_for_h100_with_async_mma_and_no_spills():
    """Every config picked for ResNet-18's layers compiles for sm_90, its fp8 wgmma is
    asynchronous (a wait with 1 pending inside the K loop: the reason fp8 is the default),
    nothing spills to local memory, and the output is stored in 16-byte vectors, channels-last
    and NCHW alike."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    if run.returncode != 0 and ("ptxas" in run.stderr or "backend" in run.stderr.lower()):
        pytest.skip(f"this Triton build cannot compile for CUDA offline: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) >= 4, run.stdout
    assert any(" nchw " in line for line in lines), run.stdout
    for line in lines:
        assert "waits 1," in line and line.endswith("spill 0") and " stores STG.E.128 " in line, line


# ---- the packed-input route: x given as its sign words (bnnops::binary_conv2d_packed) ----

# (C, groups, padding, pad_value, channels_last): ragged channels, two words a group, 1 channel a group.
PACKED_CASES = [
    (33, 1, [1, 0, 2, 1], -1.0, True),
    (70, 2, [1, 1, 1, 1], 1.0, False),
    (6, 3, [0, 2, 0, 0], 0.0, True),
    (3, 3, [1, 1, 0, 1], 1.0, False),
]


def _sign_words(x, groups, garbage=True):
    """x's per-group channels-last sign words, with random bits in every word's padding (they must
    not change a result) when ``garbage``."""
    from bnnops.ops.backward_reference import pack_sign_and_mask_conv_reference

    words = pack_sign_and_mask_conv_reference(x, 1.0, groups)[0]
    Cg = x.shape[1] // groups
    if garbage and Cg % 32:
        junk = torch.randint(-(2**31), 2**31 - 1, words.shape, dtype=torch.int32)
        pad_bits = -(1 << (Cg % 32))  # bits Cg % 32 .. 31 of the last word of each group
        last = (torch.arange(words.shape[-1]) % -(-Cg // 32)) == -(-Cg // 32) - 1
        words = torch.where(last, words | (junk & pad_bits), words)
    return words


@pytest.mark.parametrize("case", PACKED_CASES, ids=[f"C{c[0]}-g{c[1]}" for c in PACKED_CASES])
def test_prepare_from_words_equals_prepare_from_x(device, conv_kernels, case):
    """The operand pass reads the sign words instead of x and writes the same padded +-1 operand."""
    C, groups, padding, pad_value, _ = case
    g = torch.Generator().manual_seed(C)
    x = random_signs_input((2, C, 5, 7), torch.float32, "cpu", generator=g, finite=True)
    words = pack_weight(torch.randn(4, C // groups, 3, 3, generator=g)).to(device)
    sign_words = _sign_words(x, groups)
    strided = torch.zeros(*sign_words.shape[:-1], 2 * sign_words.shape[-1], dtype=torch.int32)
    strided[..., ::2] = sign_words  # a word stride of 2
    for dtype in (torch.int8, torch.float8_e4m3fn):
        a_x, w_x = conv_kernels.prepare(x.to(device), words, dtype, True, padding, pad_value)
        a_p, w_p = conv_kernels.prepare(
            strided[..., ::2].to(device), words, dtype, True, padding, pad_value, channels=C, groups=groups
        )
        assert torch.equal(a_p.float().cpu(), a_x.float().cpu()) and torch.equal(w_p.float(), w_x.float())


@pytest.mark.parametrize(
    "case, out_dtype",
    list(zip(PACKED_CASES, [torch.float32, torch.bfloat16, torch.float16, torch.float32])),
    ids=[f"C{c[0]}-g{c[1]}" for c in PACKED_CASES],
)
def test_packed_op_equals_the_op_on_x(device, case, out_dtype):
    """binary_conv2d_packed on x's sign words gives binary_conv2d's W1A1 output on x, bit for bit,
    on the reference, the launcher and the fake, in the requested memory format."""
    C, groups, padding, pad_value, channels_last = case
    g = torch.Generator().manual_seed(C + 1)
    x = random_signs_input((2, C, 6, 5), torch.float32, "cpu", generator=g, finite=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    words = pack_weight(torch.randn(6, C // groups, 3, 2, generator=g))
    bias, scale = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    geometry = [[1, 2], padding, [2, 1], groups, pad_value]
    expected = binary_conv2d_reference(x, words, bias, scale, *geometry, True, out_dtype)
    args = [_sign_words(x, groups), words, C, bias, scale, *geometry, channels_last, out_dtype]
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    fake = torch.ops.bnnops.binary_conv2d_packed(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    for y in (torch.ops.bnnops.binary_conv2d_packed(*args), CUDA_IMPLEMENTATIONS["binary_conv2d_packed"](*on_device)):
        assert y.dtype == fake.dtype == out_dtype and y.shape == fake.shape == expected.shape
        assert y.is_contiguous(memory_format=fmt) and fake.is_contiguous(memory_format=fmt)
        assert torch.equal(y.cpu(), expected)
    torch.library.opcheck(torch.ops.bnnops.binary_conv2d_packed, on_device)


def test_packed_op_checks():
    x = torch.zeros(2, 5, 5, 2, dtype=torch.int32)  # 40 channels in 2 groups: one word each
    words = torch.zeros(4, 3, 3, 1, dtype=torch.int32)
    geometry = [[1, 1], [1, 1, 1, 1], [1, 1], 2, 0.0, False, torch.float32]
    assert torch.ops.bnnops.binary_conv2d_packed(x, words, 40, None, None, *geometry).shape == (2, 4, 5, 5)
    op = torch.ops.bnnops.binary_conv2d_packed
    with pytest.raises(DtypeError, match="int32 sign words"):
        op(x.float(), words, 40, None, None, *geometry)
    with pytest.raises(ShapeError, match="words per pixel"):
        op(x, words, 80, None, None, *geometry)  # 40 channels a group: 2 words each
    with pytest.raises(ShapeError, match="rank 4"):
        op(x[0], words, 40, None, None, *geometry)
    with pytest.raises(ShapeError, match="divide"):
        op(x, words, 41, None, None, *geometry)
    with pytest.raises(ShapeError, match="words per tap"):
        op(x, words, 40, None, None, *geometry[:3], 1, *geometry[4:])  # 1 group of 40: 2 words a tap
    with pytest.raises(DtypeError, match="out_dtype"):
        op(x, words, 40, None, None, *geometry[:-1], torch.int32)
