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

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, FLOAT_DTYPES, random_signs_input
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import bnnops
from bnnops import BinaryTensor, binary_conv2d, binary_linear
from bnnops.conv import conv_padding
from bnnops.memory import saved_bytes
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.ops.backward_reference import pack_sign_and_mask_conv_reference
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
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


def _dyadic(shape, seed):
    """Multiples of 1/8 in [-3, 3]: exact in every float dtype, and every fp32 sum of them here is
    exact, so backward paths that sum in another order agree bit for bit."""
    return torch.randint(-24, 25, shape, generator=torch.Generator().manual_seed(seed)).float() / 8


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
    grad = _dyadic(y.shape, grad_seed).to(dtype=x.dtype, device=x.device)
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


# The ops a layer's training step calls: run on CPU tensors with their CUDA bodies by cuda_path_on_cpu.
LAYER_OPS = (
    "binary_linear_w1a1",
    "binary_linear_grad_input",
    "binary_linear_grad_weight",
    "binary_linear_grad_input_masked",
    "binary_conv2d",
    "binary_conv2d_packed",
    "binary_conv2d_grad_weight",
    "binary_conv2d_grad_input",
)


@contextlib.contextmanager
def cuda_path_on_cpu(monkeypatch):
    """Run the layers' CUDA path on CPU tensors, under the Triton interpreter: the pack kernel of
    ``pack_saved_input`` and the ops' CUDA bodies, swapped in for their CPU kernels meanwhile."""
    monkeypatch.setattr(bnnops.layer_common, "runs_kernels", lambda t: True)
    library = torch.library.Library("bnnops", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Warning only once for all operators")
            for name in LAYER_OPS:
                library.impl(name, CUDA_IMPLEMENTATIONS[name], "CPU")
        yield
    finally:
        library._destroy()
        monkeypatch.undo()


@pytest.mark.skipif(DEVICE != "cpu", reason="runs the CUDA path on CPU tensors")
def test_cuda_path_under_the_interpreter(monkeypatch):
    """The CUDA path (pack kernel, packed forward, backward launchers) gives the CPU path's
    gradients bit for bit (dyadic gradients: exact sums in any order), channels_last kept."""
    x = random_signs_input((5, 40), torch.float32, "cpu", generator=torch.Generator().manual_seed(6), finite=True) * 1.5
    grad = _dyadic((5, 6), 7)
    xc = random_signs_input(
        (2, 36, 5, 4), torch.float32, "cpu", generator=torch.Generator().manual_seed(8), finite=True
    )
    xc = (xc * 1.5).contiguous(memory_format=torch.channels_last)
    conv_case = (36, 4, 3, 2, 1, 1, 2, -1.0)
    expected = _linear_grads(x, "binary", ste_sign, torch.float32, grad)
    expected_conv = _conv_grads(xc, conv_case, ste_sign, None, 9)[:2]
    with cuda_path_on_cpu(monkeypatch):
        got = _linear_grads(x, "binary", ste_sign, torch.float32, grad)
        got_conv = _conv_grads(xc, conv_case, ste_sign, None, 9)[:2]
    for a, b in zip([*got, *got_conv], [*expected, *expected_conv]):
        assert torch.equal(a, b)
    assert got_conv[0].is_contiguous(memory_format=torch.channels_last)


class LogOps(TorchDispatchMode):
    """Records (op name, dtype of its first argument) of every bnnops op dispatched."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("bnnops."):
            self.calls.append((str(func).split(".")[1], args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("c", CONV_CASES[1:3], ids=CONV_IDS[1:3])
@pytest.mark.parametrize("dtype, channels_last", [(torch.float16, True), (torch.bfloat16, False)], ids=str)
def test_training_forward_convolves_the_saved_words(dtype, channels_last, c):
    """With ste_sign a training forward packs x once and, on CUDA, runs the product on the sign words
    (no op reads float x again; in eager CPU code the product reads float x, as the reference would
    unpack the words again), with the output bits, dtype and memory format of the inference call."""
    C, O, k, stride, padding, dilation, groups, pad_value = c
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = random_signs_input((2, C, 7, 6), dtype, DEVICE, generator=torch.Generator().manual_seed(10), finite=True)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    layer = BinaryConv2d(C, O, k, stride, padding, dilation, groups, bias=True, pad_value=pad_value)
    layer = layer.to(device=DEVICE, dtype=dtype)
    linear = BinaryLinear(45, 7, bias=True).to(device=DEVICE, dtype=dtype)
    xl = random_signs_input((3, 45), dtype, DEVICE, generator=torch.Generator().manual_seed(11), finite=True)
    with torch.no_grad():
        expected, expected_linear = layer(x), linear(xl)
    with LogOps() as log:
        y, y_linear = layer(x), linear(xl.requires_grad_())
    if torch.device(DEVICE).type == "cuda":
        assert log.calls == [("binary_conv2d_packed", torch.int32), ("binary_linear_w1a1", torch.int32)]
    else:
        assert log.calls == [("binary_conv2d", dtype), ("binary_linear_w1a1", dtype)]
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
    assert y.stride() == expected.stride() and torch.equal(y.detach(), expected)
    assert torch.equal(y_linear.detach(), expected_linear)


def test_packed_input_conv_gives_the_weight_gradient(monkeypatch):
    """binary_conv2d on int32 x (x's sign words, any strides): the float call's output (in fp32,
    channels_last) and weight gradient, on the CPU path and on the CUDA path."""
    C, groups = 40, 2
    x = random_signs_input(
        (2, C, 5, 4), torch.float32, DEVICE, generator=torch.Generator().manual_seed(12), finite=True
    )
    sign_words = pack_sign_and_mask_conv_reference(x.cpu(), 1.0, groups)[0]
    strided = torch.zeros(*sign_words.shape[:-1], 2 * sign_words.shape[-1], dtype=torch.int32)
    strided[..., 1::2] = sign_words
    words = strided[..., 1::2].to(DEVICE)
    assert not words.is_contiguous()
    dense = torch.randn(6, C // groups, 3, 3, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    grad = _dyadic((2, 6, 5, 4), 14).to(DEVICE)

    def run(inp):
        weight = nn.Parameter(BinaryTensor.from_float(dense))
        y = binary_conv2d(inp, weight, None, 1, 1, groups=groups, pad_value=-1.0)
        y.backward(grad)
        return y.detach(), weight.grad

    y, gw = run(x.contiguous(memory_format=torch.channels_last))
    for path in (contextlib.nullcontext(), cuda_path_on_cpu(monkeypatch) if DEVICE == "cpu" else None):
        if path is None:
            continue
        with path:
            y_packed, gw_packed = run(words)
        assert y_packed.dtype == torch.float32 and y_packed.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y_packed, y) and torch.equal(gw_packed, gw)
    # Unbatched words (H, W, words) too, and clear errors.
    weight = BinaryTensor.from_float(dense)
    assert torch.equal(binary_conv2d(words[0], weight, None, 1, 1, groups=groups, pad_value=-1.0), y[0])
    with pytest.raises(bnnops.ShapeError, match="needs groups \\* ceil"):
        binary_conv2d(words, weight, None, 1, 1)  # groups=1: 20 channels need 1 word a pixel, not 2
    with pytest.raises(bnnops.DtypeError, match="int32 packed sign words"):
        binary_conv2d(words.long(), weight, None, 1, 1, groups=groups)


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


def test_strided_packed_input_gives_the_weight_gradient_on_the_cuda_path(monkeypatch):
    """A packed (int32) x is saved as given; the backward op's CUDA body makes it contiguous for its launcher."""
    torch.manual_seed(0)
    dense = BinaryTensor.from_float(torch.randn(8, 40))
    words = bnnops.pack_signs(torch.randn(6, 80))[:, ::2][:, :2]  # (6, 2) int32, not contiguous
    assert not words.is_contiguous()
    weight = torch.nn.Parameter(BinaryTensor(dense.words.clone(), dense.shape))
    with cuda_path_on_cpu(monkeypatch) if DEVICE == "cpu" else contextlib.nullcontext():
        bnnops.binary_linear(words, weight).sum().backward()
    x_signs = bnnops.unpack_signs(words.contiguous(), 40)
    assert torch.equal(weight.grad, torch.ones(6, 8).t() @ x_signs)
