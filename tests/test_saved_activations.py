"""What a binary layer keeps for backward, and the gradients it gives from it.

A layer with the ``ste_sign`` input quantizer keeps x's sign and pass-mask words (2 bits per
element), not x (:mod:`bnnops.layer_common`). Checked here: the bytes kept, counted with
``torch.autograd.graph.saved_tensors_hooks`` (:func:`bnnops.memory.saved_bytes`), per layer
kind and gradient need; gradients equal bit for bit to the backward from x itself (the same layer
with a quantizer that keeps x: an ``SteSign`` subclass with its own ``grad``) in every dtype, pad
value, stride, group count and memory format, and close to autograd through a dense +-1
reference; the CUDA wiring (the Triton launchers, under the interpreter on CPU tensors); and
torch.compile, checkpointing, autocast and gradient accumulation.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, FLOAT_DTYPES, random_signs_input
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnnops
from bnnops import BinaryTensor, binary_conv2d, binary_linear
from bnnops.conv import conv_padding
from bnnops.memory import saved_bytes
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.quantizers import SteSign, approx_sign, ste_sign


class KeepsInput(SteSign):
    """ste_sign with its own ``grad`` (the same values): a layer keeps x itself for it, so its
    backward is the one from x that the packed backward must reproduce."""

    def grad(self, x, grad_out):
        return torch.where(x.abs() <= self.clip_value, grad_out, 0)


def test_quantizers_say_what_a_layer_keeps():
    assert ste_sign.saves_mask_only and SteSign(0.5).saves_mask_only and SteSign(None).saves_mask_only
    assert not approx_sign.saves_mask_only and not bnnops.quantizers.swish_sign.saves_mask_only
    assert not KeepsInput().saves_mask_only


def _count(fn, *params):
    """Bytes autograd keeps while ``fn()`` runs, the storages of ``params`` excluded."""
    holder = nn.Module()
    holder.held = nn.ParameterList(params)
    return sum(saved_bytes(holder, fn).values())


def _words(*shape):
    return 4 * torch.Size(shape).numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_keeps_two_bits_per_input_element(dtype):
    M, K, N = 6, 45, 5
    words = _words(M, -(-K // 32))
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    weight = nn.Parameter(BinaryTensor.from_float(torch.randn(N, K, dtype=dtype, device=DEVICE)))
    xg = x.clone().requires_grad_()
    assert _count(lambda: binary_linear(xg, weight), weight) == 2 * words  # sign and mask words
    assert _count(lambda: binary_linear(x, weight), weight) == words  # x needs no gradient: sign words only
    weight.requires_grad_(False)
    assert _count(lambda: binary_linear(xg, weight), weight) == words  # frozen weight: mask words only
    weight.requires_grad_(True)
    x_bytes = x.numel() * x.element_size()
    assert _count(lambda: binary_linear(xg, weight, input_quantizer="approx_sign"), weight) == x_bytes
    assert _count(lambda: binary_linear(xg, weight, input_quantizer=KeepsInput()), weight) == x_bytes
    assert _count(lambda: binary_linear(xg, weight, input_quantizer=None), weight) == x_bytes  # W1A16: g^T x
    weight.requires_grad_(False)
    assert _count(lambda: binary_linear(xg, weight, input_quantizer=None), weight) == 0
    latent = torch.randn(N, K, dtype=dtype, device=DEVICE, requires_grad=True)
    # Latent weight: the sign and mask words, and the weight's words (the latent tensor is a parameter).
    assert _count(lambda: binary_linear(xg, latent, weight_quantizer="ste_sign"), latent) == 2 * words + _words(N, 2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv_keeps_two_bits_per_input_element(dtype, channels_last):
    N, C, H, W, O, groups = 2, 40, 5, 6, 6, 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = BinaryConv2d(C, O, 3, padding=1, groups=groups, pad_value=1.0, device=DEVICE, dtype=dtype)
    x = torch.randn(N, C, H, W, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    words = _words(N, H, W, groups * 1)  # 20 channels a group: one word each
    assert _count(lambda: layer(x), *layer.parameters()) == 2 * words
    layer.input_quantizer = approx_sign
    assert _count(lambda: layer(x), *layer.parameters()) == x.numel() * x.element_size()


def _linear_grads(x, weight_kind, iq, dtype, grad):
    K = x.shape[-1]
    g = torch.Generator().manual_seed(K)
    latent = torch.randn(grad.shape[-1], K, generator=g).to(dtype=dtype, device=x.device)
    if weight_kind == "binary":
        weight = nn.Parameter(BinaryTensor.from_float(latent))
        wq = None
    else:
        weight, wq = latent.requires_grad_(), "ste_sign"
    x = x.detach().clone().requires_grad_()
    bias = torch.zeros(grad.shape[-1], dtype=dtype, device=x.device, requires_grad=True)
    binary_linear(x, weight, bias, input_quantizer=iq, weight_quantizer=wq).backward(grad)
    return x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("weight_kind", ["binary", "latent"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_linear_gradients_equal_the_backward_from_x(dtype, weight_kind):
    x = random_signs_input((3, 4, 45), dtype, DEVICE, generator=torch.Generator().manual_seed(1), finite=True)
    x = x * 1.5  # a third of the values outside the clip
    grad = torch.randn(3, 4, 7).to(dtype=dtype, device=DEVICE)
    for clip in (1.0, 0.5):
        packed = _linear_grads(x, weight_kind, SteSign(clip), dtype, grad)
        from_x = _linear_grads(x, weight_kind, KeepsInput(clip), dtype, grad)
        for a, b in zip(packed, from_x):
            assert a.dtype == b.dtype and torch.equal(a, b)


# (C, O, kernel, stride, padding, dilation, groups, pad_value)
CONV_CASES = [
    (6, 5, 3, 1, 1, 1, 1, 0.0),
    (33, 4, 3, 2, 1, 1, 1, 1.0),
    (8, 6, 2, 1, "same", 2, 2, -1.0),  # even kernel: asymmetric padding
    (70, 4, 1, 2, 0, 1, 2, 0.0),  # 1x1, 35 channels a group: two words each
    (8, 4, (1, 3), 1, (0, 1), 1, 2, -1.0),
]
CONV_IDS = [f"C{c[0]}-k{c[2]}-s{c[3]}-p{c[4]}-g{c[6]}-pad{c[7]:+.0f}" for c in CONV_CASES]


def _conv_grads(x, c, iq, wq, grad_seed):
    C, O, k, stride, padding, dilation, groups, pad_value = c
    kernel = k if isinstance(k, tuple) else (k, k)
    g = torch.Generator().manual_seed(C + O)
    latent = torch.randn(O, C // groups, *kernel, generator=g).to(dtype=x.dtype, device=x.device)
    weight = nn.Parameter(BinaryTensor.from_float(latent)) if wq is None else latent.requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = binary_conv2d(
        x, weight, None, stride, padding, dilation, groups, pad_value=pad_value, input_quantizer=iq, weight_quantizer=wq
    )
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(x.dtype).to(x.device)
    y.backward(grad)
    return x.grad, weight.grad, grad


@pytest.mark.parametrize("c", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_conv_gradients_equal_the_backward_from_x(dtype, channels_last, c):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = random_signs_input((2, c[0], 7, 6), dtype, DEVICE, generator=torch.Generator().manual_seed(2), finite=True)
    x = (x * 1.5).contiguous(memory_format=fmt)
    for wq in (None, "ste_sign"):
        gx, gw, _ = _conv_grads(x, c, ste_sign, wq, 3)
        rx, rw, _ = _conv_grads(x, c, KeepsInput(), wq, 3)
        assert torch.equal(gx, rx) and torch.equal(gw, rw)
        # grad_input in the input's memory format, as nn.Conv2d's (grad_weight's layout is the
        # parameter's: autograd's accumulation; tests/test_module_conventions.py).
        assert gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("c", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_gradients_match_dense_autograd(channels_last, c):
    C, O, k, stride, padding, dilation, groups, pad_value = c
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = random_signs_input((2, C, 7, 6), torch.float32, DEVICE, generator=torch.Generator().manual_seed(4), finite=True)
    x = (x * 1.5).contiguous(memory_format=fmt)
    gx, gw, grad = _conv_grads(x, c, "ste_sign", None, 5)
    kernel = k if isinstance(k, tuple) else (k, k)
    latent = torch.randn(O, C // groups, *kernel, generator=torch.Generator().manual_seed(C + O)).to(DEVICE)
    w_ref = torch.where(latent < 0, -1.0, 1.0).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    pt, pb, pl, pr = conv_padding(padding, kernel, stride, dilation)
    a = F.pad(ste_sign(x_ref), (pl, pr, pt, pb), value=pad_value)
    F.conv2d(a, w_ref, None, stride, 0, dilation, groups).backward(grad)
    torch.testing.assert_close(gx, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.fixture
def launchers_on_cpu(monkeypatch):
    """Run the layers' CUDA wiring (pack kernel, packed backward launchers) on CPU tensors, under
    the Triton interpreter."""
    for module in (bnnops.layer_common, bnnops.linear, bnnops.conv):
        monkeypatch.setattr(module, "runs_kernels", lambda t: True)


def _dyadic(shape, seed):
    """Multiples of 1/8: every fp32 sum of them here is exact, so kernels and references agree bit for bit."""
    return torch.randint(-24, 25, shape, generator=torch.Generator().manual_seed(seed)).float() / 8


@pytest.mark.skipif(DEVICE != "cpu", reason="runs the CUDA wiring on CPU tensors")
def test_cuda_wiring_under_the_interpreter(monkeypatch):
    x = random_signs_input((5, 40), torch.float32, "cpu", generator=torch.Generator().manual_seed(6), finite=True) * 1.5
    grad = _dyadic((5, 6), 7)
    expected = _linear_grads(x, "binary", ste_sign, torch.float32, grad)
    xc = random_signs_input(
        (2, 36, 5, 4), torch.float32, "cpu", generator=torch.Generator().manual_seed(8), finite=True
    )
    xc = (xc * 1.5).contiguous(memory_format=torch.channels_last)
    conv_case = (36, 4, 3, 2, 1, 1, 2, -1.0)
    expected_conv = _conv_grads(xc, conv_case, ste_sign, None, 9)[:2]
    for module in (bnnops.layer_common, bnnops.linear, bnnops.conv):
        monkeypatch.setattr(module, "runs_kernels", lambda t: True)
    got = _linear_grads(x, "binary", ste_sign, torch.float32, grad)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    got_conv = _conv_grads(xc, conv_case, ste_sign, None, 9)[:2]
    # The conv's grad_out is random: the launchers' sums run in another order (fp32 rounding).
    for a, b in zip(got_conv, expected_conv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got_conv[0].is_contiguous(memory_format=torch.channels_last)


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryConv2d(3, 8, 3, padding=1, input_quantizer=None),
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 8, 3, padding=1, pad_value=1.0),
        nn.Flatten(),
        BinaryLinear(8 * 16, 5),
    ).to(DEVICE)


def _grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_compile_checkpoint_accumulation_and_autocast():
    model = _small_net()
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    eager = _grads(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    compiled(x).square().sum().backward()
    for p, e in zip([p for p in model.parameters() if p.grad is not None], eager):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6)

    model.zero_grad()
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    for p, e in zip([p for p in model.parameters() if p.grad is not None], eager):
        assert torch.equal(p.grad, e)

    # Accumulation: a second backward adds the same gradient.
    model.zero_grad()
    model(x).square().sum().backward()
    model(x).square().sum().backward()
    for p, e in zip([p for p in model.parameters() if p.grad is not None], eager):
        torch.testing.assert_close(p.grad, 2 * e)

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        saved = saved_bytes(model, lambda: model(x))
        y = model(x)
    y.float().sum().backward()
    # The second conv's bf16 input is kept as sign and mask words: 2 * (2 x 4 x 4 pixels x 1 word).
    assert saved["2"] == 2 * _words(2, 4, 4, 1)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_second_derivatives_still_refused():
    layer = BinaryLinear(40, 3).to(DEVICE)
    x = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    v = torch.ones(4, 3, device=DEVICE, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x), x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative|second derivative"):
        gx.sum().backward()


def test_strided_packed_input_gives_the_weight_gradient_on_the_kernel_path(monkeypatch):
    """A packed (int32) x is saved as given; the kernel path makes it contiguous for its launcher."""
    import bnnops.linear as linear_module

    monkeypatch.setattr(linear_module, "runs_kernels", lambda x: True)
    torch.manual_seed(0)
    dense = BinaryTensor.from_float(torch.randn(8, 40))
    words = bnnops.pack_signs(torch.randn(6, 80))[:, ::2][:, :2]  # (6, 2) int32, not contiguous
    assert not words.is_contiguous()
    weight = torch.nn.Parameter(BinaryTensor(dense.words.clone(), dense.shape))
    bnnops.binary_linear(words, weight).sum().backward()
    x_signs = bnnops.unpack_signs(words.contiguous(), 40)
    assert torch.equal(weight.grad, torch.ones(6, 8).t() @ x_signs)
