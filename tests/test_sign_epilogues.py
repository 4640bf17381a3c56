"""The sign epilogues of the GEMM and conv kernels (folded inference) against the references of
:mod:`bnnops.ops.threshold`, bit for bit, on poisoned output buffers and ragged channel counts (on a
CPU in Triton's interpreter).

Thresholds are drawn from the values v actually takes (so v == threshold ties occur on many
channels), flips at random; integer-valued real inputs make W1A16 sums exact in every dtype, so
the kernel's v equals the reference's and a single wrong bit fails.
"""

import pytest
import torch
from helpers import DEVICE, FLOAT_DTYPES, WORD_POISON, poisoned

import bnnops
import bnnops.ops.threshold
from bnnops.kernels import load
from bnnops.kernels.gemm_configs import INTERPRETER_CONFIGS, with_kwargs
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.ops.reference import binary_conv2d_reference, w1a1_reference, w1a16_reference
from bnnops.ops.threshold import conv2d_sign_reference, w1a1_sign_reference, w1a16_sign_reference
from bnnops.packing import pack_bits, pack_signs_reference, pack_weight

SMALL = with_kwargs(INTERPRETER_CONFIGS["small"], SPLIT_K=1)
SWAPPED = with_kwargs(SMALL, SWAP_AB=True)


def thresholds_at(v: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (last dim of v, flattened rows) a threshold equal to one of its values, and a random flip."""
    rows = v.reshape(-1, v.shape[-1])
    pick = torch.randint(0, rows.shape[0], (rows.shape[1],), generator=generator)
    t = rows[pick, torch.arange(rows.shape[1])].clone()
    flip = torch.rand(rows.shape[1], generator=generator) < 0.5
    return t, flip


def integers(shape, dtype, generator):
    return torch.randint(-3, 4, shape, generator=generator).to(dtype)


def junk_in_padding(words: torch.Tensor, K: int, generator: torch.Generator, groups: int = 1) -> torch.Tensor:
    """``words`` (..., groups * ceil(K/32)) with random bits in the padding bits K % 32 .. 31 of each
    group's last word (the format says 0; kernels must mask them, so they must not change a result)."""
    per_group = -(-K // 32)
    if K % 32 == 0:
        return words
    junk = torch.randint(-(2**31), 2**31 - 1, words.shape, generator=generator, dtype=torch.int64).to(torch.int32)
    last = torch.arange(words.shape[-1]) % per_group == per_group - 1
    return torch.where(last, words | (junk & -(1 << (K % 32))), words)


def padding_bits_are_zero(words: torch.Tensor, K: int) -> bool:
    """Whether every group's last word (``words`` (..., groups * ceil(K/32)), K channels a group)
    has its bits K % 32 .. 31 at 0."""
    per_group = -(-K // 32)
    return K % 32 == 0 or not (words[..., per_group - 1 :: per_group] >> (K % 32)).any()


@pytest.mark.parametrize("config", [SMALL, SWAPPED], ids=["tiles", "swapped"])
@pytest.mark.parametrize("packed", [False, True])
def test_w1a1_sign_words(config, packed):
    g = torch.Generator().manual_seed(1)
    M, N, K = 37, 70, 75
    x = torch.randn(M, K, generator=g)
    words = junk_in_padding(pack_signs_reference(torch.randn(N, K, generator=g)), K, g)
    t, flip = thresholds_at(w1a1_reference(x, words, K), g)
    t = t.to(torch.int32)
    x_in = junk_in_padding(pack_signs_reference(x), K, g) if packed else x
    out = poisoned((M, 3), torch.int32, DEVICE)
    got = load("gemm").w1a1_sign(
        x_in.to(DEVICE), words.to(DEVICE), K, t.to(DEVICE), flip.to(DEVICE), out=out, config=config
    )
    want = w1a1_sign_reference(x_in, words, K, t, flip)
    assert got is out and torch.equal(got.cpu(), want)
    assert padding_bits_are_zero(got.cpu(), N)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_w1a16_sign_words(dtype):
    g = torch.Generator().manual_seed(2)
    M, N, K = 20, 45, 50
    x = integers((M, K), dtype, g)
    words = junk_in_padding(pack_signs_reference(torch.randn(N, K, generator=g)), K, g)
    bias = integers((N,), torch.float32, g)
    t, flip = thresholds_at(w1a16_reference(x, words, None, bias), g)
    out = poisoned((M, 2), torch.int32, DEVICE)
    gemm = load("gemm")
    got = gemm.w1a16_sign(
        x.to(DEVICE), words.to(DEVICE), t.to(DEVICE), flip.to(DEVICE), bias=bias.to(DEVICE), out=out, config=SMALL
    )
    assert torch.equal(got.cpu(), w1a16_sign_reference(x, words, None, bias, t, flip))


def test_sign_configs_refuse_split_k():
    x = torch.randn(4, 40, device=DEVICE)
    words = pack_signs_reference(torch.randn(8, 40)).to(DEVICE)
    t, flip = torch.zeros(8, dtype=torch.int32, device=DEVICE), torch.zeros(8, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="without split-K"):
        load("gemm").w1a1_sign(x, words, 40, t, flip, config=INTERPRETER_CONFIGS["split"])


@pytest.mark.parametrize(
    "groups, out_groups, packed, binarize",
    [(1, 1, False, True), (2, 2, True, True), (1, 1, True, True), (1, 1, False, False)],
    ids=["w1a1", "grouped-packed", "packed", "w1a16-bf16"],
)
def test_conv_sign_words(groups, out_groups, packed, binarize):
    """W1A1 (integer threshold; fp32 or packed input with junk padding bits) and W1A16 (bf16 input
    and threshold) conv epilogues, ragged output channels per group (36 / 2 = 18), poisoned output."""
    g = torch.Generator().manual_seed(3)
    C, O = 10, 36
    x = torch.randn(2, C, 7, 9, generator=g)
    w = junk_in_padding(pack_weight(torch.randn(O, C // groups, 3, 3, generator=g)), C // groups, g)
    geometry = ([1, 2], [1, 0, 2, 1], [1, 1], groups, -1.0)
    if not binarize:
        x = integers(x.shape, torch.bfloat16, g)
    v = binary_conv2d_reference(x, w, None, None, *geometry, binarize, torch.float32 if binarize else None)
    t, flip = thresholds_at(v.permute(0, 2, 3, 1), g)
    t = t.to(torch.int32) if binarize else t
    x_in = x
    if packed:
        x_in = pack_bits(x.permute(0, 2, 3, 1).reshape(*x.shape[:1], *x.shape[2:], groups, C // groups) < 0).flatten(-2)
        x_in = junk_in_padding(x_in, C // groups, g, groups)
    want = conv2d_sign_reference(x_in, w, C, None, None, *geometry, binarize, t, flip, out_groups)
    conv = load("conv2d")
    out = poisoned(want.shape, torch.int32, DEVICE)
    real = torch.float32 if binarize else x.dtype
    args = dict(stride=geometry[0], padding=geometry[1], dilation=geometry[2], groups=groups, pad_value=-1.0)
    got = conv.conv2d(
        x_in.to(DEVICE),
        w.to(DEVICE),
        binarize=binarize,
        channels=C if packed else None,
        out=out,
        signs=(t.to(DEVICE), flip.to(DEVICE), real),
        **args,
    )
    assert got is out and torch.equal(got.cpu(), want)
    assert got.shape[-1] == out_groups * ((O // out_groups + 31) // 32)
    assert padding_bits_are_zero(got.cpu(), O // out_groups)


def test_conv_sign_op_cuda_path_regroups():
    """The op's CUDA code (run here on CPU tensors) when the reader's groups differ from the conv's
    on ragged channels: the reference's packing."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 5, 5, generator=g)
    w = pack_weight(torch.randn(36, 6, 1, 1, generator=g))
    t = torch.randint(-3, 4, (36,), generator=g, dtype=torch.int32)
    flip = torch.rand(36, generator=g) < 0.5
    args = (x, w, 6, None, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, 0.0, True, t, flip, 2)
    got = CUDA_IMPLEMENTATIONS["binary_conv2d_sign"](*args)
    assert torch.equal(got, conv2d_sign_reference(*args)) and got.shape == (1, 5, 5, 2)
    assert WORD_POISON not in got


def test_opcheck_and_bad_input():
    """The three ops pass opcheck (schema, fake, dynamic shapes) and refuse wrong thresholds."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g, device=DEVICE)
    words = pack_signs_reference(torch.randn(33, 40, generator=g)).to(DEVICE)
    t = torch.randint(-9, 10, (33,), generator=g, dtype=torch.int32).to(DEVICE)
    flip = (torch.rand(33, generator=g) < 0.5).to(DEVICE)
    image = torch.randn(2, 4, 5, 5, generator=g, device=DEVICE)
    conv_words = pack_weight(torch.randn(33, 4, 3, 3, generator=g)).to(DEVICE)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True)
    ops = torch.ops.bnnops
    torch.library.opcheck(ops.binary_linear_w1a1_sign.default, (x, words, 40, t, flip))
    torch.library.opcheck(ops.binary_linear_w1a16_sign.default, (x, words, None, None, t.float(), flip))
    torch.library.opcheck(ops.binary_conv2d_sign.default, (image, conv_words, 4, None, None, *geometry, t, flip, 1))
    with pytest.raises(bnnops.DtypeError, match="threshold must be a torch.int32"):
        ops.binary_linear_w1a1_sign(x, words, 40, t.float(), flip)
    with pytest.raises(bnnops.ShapeError, match=r"flip must have shape \(33,\)"):
        ops.binary_linear_w1a1_sign(x, words, 40, t, flip[:5])
    with pytest.raises(bnnops.DtypeError, match="flip must be a bool"):
        ops.binary_linear_w1a16_sign(x, words, None, None, t.float(), t)
    with pytest.raises(bnnops.ShapeError, match="out_groups=2"):
        ops.binary_conv2d_sign(image, conv_words, 4, None, None, *geometry, t, flip, 2)
    with pytest.raises(bnnops.ShapeError, match="channels=5"):
        ops.binary_conv2d_sign(image, conv_words, 5, None, None, *geometry, t, flip, 1)
