"""The CPU training path of the binary layers: its shortcuts give the bits of the ops they stand for.

On the CPU a training forward convolves (or multiplies) float x and packs only the words its
backward keeps, the backward of a conv that needs both gradients runs both references' products in
one ``aten.convolution_backward`` (:func:`bnnops.ops.backward_reference.conv2d_grads_reference`),
and :func:`bnnops.packing.pack_bits` / :func:`bnnops.packing.unpack_bits` read bytes through
dtype-changing views. Gradients here are normal draws (not dyadic), so a changed summation order
would show.
"""

import pytest
import torch
from helpers import DEVICE, FLOAT_DTYPES
from torch import nn

from bnnops import BinaryTensor, binary_conv2d, binary_linear, packing
from bnnops.layer_common import pack_saved_input
from bnnops.ops import backward_reference
from bnnops.ops.conv import output_shape
from bnnops.packing import pack_bits, pack_weight, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (5, 64), (2, 3, 33), (3, 0), (0, 5), (2, 2, 2, 70)], ids=str)
def test_pack_bits_byte_path_matches_the_shifts(monkeypatch, shape):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    strided = bits.transpose(0, -1).contiguous().transpose(0, -1)  # the same bits, other strides
    words = pack_bits(strided)
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)  # the shift path
    expected = pack_bits(bits)
    assert words.dtype == torch.int32 and words.shape == expected.shape and torch.equal(words, expected)
    assert torch.equal(unpack_bits(words, shape[-1]), bits)
    monkeypatch.undo()
    assert torch.equal(unpack_bits(words, shape[-1]), bits)


def test_unpack_bits_reads_every_bit_of_a_word():
    words = torch.randint(-(2**31), 2**31, (3, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    bits = unpack_bits(words, 4 * 32 - 5)
    expected = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    assert bits.dtype == torch.bool and torch.equal(bits, expected.flatten(-2)[:, : 4 * 32 - 5].bool())


def test_cpu_saved_words_hold_only_the_bits_asked_for():
    x = torch.randn(6, 45)
    sign, mask = pack_saved_input(x, 1.0, None, True, False)
    assert mask is None and sign.untyped_storage().nbytes() == sign.numel() * 4
    sign, mask = pack_saved_input(x.view(6, 5, 3, 3), 1.0, 1, False, True)
    assert sign is None and mask.untyped_storage().nbytes() == mask.numel() * 4
    both = pack_saved_input(x, 1.0, None, True, True)
    expected = (pack_bits(x < 0), pack_bits(x.abs() <= 1.0))
    assert all(torch.equal(a, b) for a, b in zip(both, expected))


# (C, O, kernel, stride, padding (top, bottom, left, right), dilation, groups, pad_value)
CASES = [
    (6, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 0.0),
    (33, 4, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, 1.0),
    (8, 6, (2, 2), (1, 1), (1, 0, 1, 0), (2, 2), 2, -1.0),
    (70, 4, (1, 1), (2, 1), (0, 0, 0, 0), (1, 1), 2, 0.0),
    (8, 4, (1, 3), (1, 2), (0, 2, 1, 0), (1, 1), 4, -1.0),
]


@pytest.mark.parametrize("c", CASES, ids=[f"C{c[0]}-g{c[6]}-pad{c[7]:+.0f}" for c in CASES])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv2d_grads_reference_gives_both_references_bits(c, dtype, channels_last):
    C, O, kernel, stride, padding, dilation, groups, pad_value = c
    gen = torch.Generator().manual_seed(C + O)
    x = torch.randn(2, C, 7, 6, generator=gen) * 1.5
    sign_words, mask_words = backward_reference.pack_sign_and_mask_conv_reference(x, 1.0, groups)
    words = pack_weight(torch.randn(O, C // groups, *kernel, generator=gen))
    grad = torch.randn(output_shape(x.shape, (O, *kernel, 0), stride, padding, dilation), generator=gen).to(dtype)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    geometry = (stride, padding, dilation, groups)
    for mask in (mask_words, None):
        gx, gw = backward_reference.conv2d_grads_reference(
            grad, words, sign_words, mask, list(x.shape), *geometry, pad_value, dtype, channels_last
        )
        rx = backward_reference.conv2d_grad_input_reference(
            grad, words, mask, list(x.shape), *geometry, dtype, channels_last
        )
        rw = backward_reference.conv2d_grad_weight_reference(
            grad, sign_words, (O, C // groups, *kernel), *geometry, pad_value, None, channels_last
        )
        for got, expected in ((gx, rx), (gw, rw)):
            assert got.dtype == expected.dtype == dtype and got.stride() == expected.stride()
            assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_training_layers_give_the_bits_of_the_backward_ops(dtype):
    """A training call (x and weight requiring grad) against the backward ops called one by one
    through the dispatcher on the words the layer saves."""
    gen = torch.Generator().manual_seed(7)
    C, O, groups = 10, 6, 2
    x = (torch.randn(2, C, 5, 7, generator=gen) * 1.5).to(device=DEVICE, dtype=dtype)
    latent = torch.randn(O, C // groups, 3, 3, generator=gen).to(device=DEVICE, dtype=dtype)
    weight = nn.Parameter(BinaryTensor.from_float(latent))
    xg = x.clone().requires_grad_()
    y = binary_conv2d(xg, weight, None, 2, 1, 1, groups, pad_value=-1.0)
    with torch.no_grad():
        assert torch.equal(y, binary_conv2d(x, weight, None, 2, 1, 1, groups, pad_value=-1.0))
    grad = torch.randn(y.shape, generator=gen).to(device=DEVICE, dtype=dtype)
    y.backward(grad)
    sign_words, mask_words = backward_reference.pack_sign_and_mask_conv_reference(x, 1.0, groups)
    geometry = ([2, 2], [1, 1, 1, 1], [1, 1], groups)
    words = weight.words
    gx = torch.ops.bnnops.binary_conv2d_grad_input(grad, words, mask_words, list(x.shape), *geometry, dtype)
    gw = torch.ops.bnnops.binary_conv2d_grad_weight(grad, sign_words, list(latent.shape), *geometry, -1.0)
    assert torch.equal(xg.grad, gx) and torch.equal(weight.grad, gw)

    xl = (torch.randn(3, 45, generator=gen) * 1.5).to(device=DEVICE, dtype=dtype)
    weight = nn.Parameter(BinaryTensor.from_float(torch.randn(7, 45, generator=gen).to(device=DEVICE, dtype=dtype)))
    xg = xl.clone().requires_grad_()
    y = binary_linear(xg, weight)
    grad = torch.randn(y.shape, generator=gen).to(device=DEVICE, dtype=dtype)
    y.backward(grad)
    sign_words, mask_words = backward_reference.pack_sign_and_mask_reference(xl, 1.0)
    gx = torch.ops.bnnops.binary_linear_grad_input_masked(grad, weight.words, mask_words, 45)
    gw = torch.ops.bnnops.binary_linear_grad_weight(grad, sign_words, 45)
    assert torch.equal(xg.grad, gx) and torch.equal(weight.grad, gw)
