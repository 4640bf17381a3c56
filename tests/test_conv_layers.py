"""bnnops.binary_conv2d and bnnops.nn.BinaryConv2d: forward and gradients against autograd through
a dense +-1 reference (F.conv2d on explicitly padded values), the layer's options, bad input, and
torch.compile of a small conv net."""

import pytest
import torch
import torch.nn.functional as F
from helpers import check_inference_runs_the_op_alone, check_learnable_scale_output_without_grad, random_signs_input
from torch import nn

import bnnops
from bnnops import BinaryTensor
from bnnops.conv import binary_conv2d, conv_padding
from bnnops.nn import BinaryConv2d
from bnnops.quantizers import get_quantizer

# Gradients: cuDNN / the CPU conv backward against autograd through F.conv2d on the same +-1 and
# real values: both sum the same fp32 products in possibly different orders.
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fp32_convolutions():
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa products): the dense
    references here must be true fp32, as the kernel is (exact W1A1, 3xTF32 W1A16)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def w1a16_atol(x, K):
    """The kernel's W1A16 bound against an fp32 reference (tests/test_conv2d.py): K * 2^-20 * max|x|."""
    return K * 2.0**-20 * x.abs().max().item()


def dense_reference(x, w_dense, bias, scale, stride, padding, dilation, groups, pad_value, iq):
    """What binary_conv2d computes, built from differentiable torch ops."""
    a = iq(x) if iq is not None else x
    pt, pb, pl, pr = conv_padding(padding, w_dense.shape[2:], stride, dilation)
    a = F.pad(a, (pl, pr, pt, pb), value=pad_value)
    y = F.conv2d(a, w_dense, None, stride, 0, dilation, groups)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    return y + bias.view(1, -1, 1, 1) if bias is not None else y


# (C, O, kernel, stride, padding, dilation, groups, pad_value, input_quantizer, weight_quantizer, scale)
CASES = [
    (6, 5, 3, 1, 1, 1, 1, 0.0, "ste_sign", None, False),
    (33, 4, 3, 2, 1, 1, 1, 1.0, "approx_sign", None, True),
    (8, 6, 2, 1, "same", 2, 2, -1.0, "swish_sign", None, False),  # even kernel: asymmetric "same"
    (5, 4, 3, 1, (2, 1), 1, 1, -1.0, None, None, False),  # W1A16 with a pad value
    (7, 3, 3, 1, 1, 1, 1, 1.0, "ste_sign", "ste_sign", False),  # latent weight
    (8, 4, (1, 3), 1, (0, 1), 1, 2, 0.0, "ste_sign", "magnitude_aware_sign", True),
]


@pytest.mark.parametrize(
    "c", CASES, ids=lambda c: f"C{c[0]}-O{c[1]}-k{c[2]}-p{c[4]}-g{c[6]}-pad{c[7]:+.0f}-{c[8]}-{c[9]}"
)
def test_forward_and_gradients_match_dense_reference(device, c):
    C, O, k, stride, padding, dilation, groups, pad_value, iq_name, wq_name, with_scale = c
    kernel = k if isinstance(k, tuple) else (k, k)
    g = torch.Generator().manual_seed(C + O)
    x = random_signs_input((2, C, 7, 6), torch.float32, "cpu", generator=g, finite=True).to(device).requires_grad_()
    latent = torch.randn(O, C // groups, *kernel, generator=g).to(device)
    bias = torch.randn(O, generator=g).to(device).requires_grad_()
    scale = (torch.rand(O, generator=g) + 0.5).to(device) if with_scale else None
    iq, wq = get_quantizer(iq_name), get_quantizer(wq_name)
    if wq is None:
        weight = nn.Parameter(BinaryTensor.from_float(latent))
        w_ref = weight.dequantize().detach().requires_grad_()
        w_dense = w_ref
    else:
        weight = latent.clone().requires_grad_()
        w_ref = latent.clone().requires_grad_()
        w_dense = wq(w_ref)

    y = binary_conv2d(
        x,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        pad_value=pad_value,
        input_quantizer=iq_name,
        scale=scale,
        weight_quantizer=wq_name,
    )
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    expected = dense_reference(x_ref, w_dense, bias_ref, scale, stride, padding, dilation, groups, pad_value, iq)
    assert y.shape == expected.shape
    # W1A1: exact sums, then scale and bias (or a magnitude-aware scale inside the reference's
    # weights): fp32 rounding only. W1A16: the kernel's 3xTF32 bound.
    atol = 1e-5 if iq is not None else w1a16_atol(x, kernel[0] * kernel[1] * C // groups)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=atol)

    grad = torch.randn(y.shape, generator=g).to(device)
    y.backward(grad)
    expected.backward(grad)
    assert type(weight.grad) is torch.Tensor and weight.grad.shape == weight.shape  # dense, for Bop
    torch.testing.assert_close(x.grad, x_ref.grad, **GRAD_TOL)
    torch.testing.assert_close(weight.grad, w_ref.grad, **GRAD_TOL)
    torch.testing.assert_close(bias.grad, bias_ref.grad, **GRAD_TOL)


def test_learnable_scale_gets_its_gradient(device):
    x = torch.randn(2, 8, 5, 5, device=device)
    weight = BinaryTensor.from_float(torch.randn(4, 8, 3, 3, device=device))
    scale = torch.rand(4, device=device).requires_grad_()
    scale_ref = scale.detach().clone().requires_grad_()
    y = binary_conv2d(x, weight, None, padding=1, scale=scale)
    expected = dense_reference(
        x, weight.dequantize(), None, scale_ref, (1, 1), 1, (1, 1), 1, 0.0, get_quantizer("ste_sign")
    )
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(scale.grad, scale_ref.grad, **GRAD_TOL)
    x, weight = x.bfloat16(), weight.to(torch.bfloat16)
    check_learnable_scale_output_without_grad(lambda: binary_conv2d(x, weight, None, padding=1, scale=scale), scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("iq,wq", [(None, None), ("ste_sign", None), ("ste_sign", "magnitude_aware_sign")])
def test_learnable_scale_gives_the_fixed_scale_output(device, dtype, iq, wq):
    """A scale's requires_grad never changes the output: a learnable scale multiplies the op's fp32
    product, then the bias is added, in fp32, and the sum is rounded once, which are the bits of
    the fixed scale fused in the op's epilogue. Random 16-bit inputs, biases and scales (W1A16,
    W1A1 with a +-1 pad value, a magnitude-aware latent weight), NCHW and channels_last. Inputs
    and weights mostly positive, 300 channels: W1A1 sums near 2500, past the integers bf16 and
    fp16 hold exactly."""
    g = torch.Generator().manual_seed(11)
    for scale_dtype, memory_format in ((torch.float32, torch.contiguous_format), (dtype, torch.channels_last)):
        x = (torch.randn(2, 300, 5, 4, generator=g) + 2).to(dtype).to(device).contiguous(memory_format=memory_format)
        dense = (torch.randn(9, 300, 3, 3, generator=g) + 2).to(dtype).to(device)
        w = BinaryTensor.from_float(dense) if wq is None else dense
        bias = torch.randn(9, generator=g).to(dtype).to(device)
        scale = (torch.rand(9, generator=g) * 2 + 0.1).to(scale_dtype).to(device)

        kwargs = dict(padding=1, pad_value=1.0, input_quantizer=iq, weight_quantizer=wq)
        fixed = binary_conv2d(x, w, bias, scale=scale, **kwargs)
        learnable = binary_conv2d(x, w, bias, scale=scale.clone().requires_grad_(), **kwargs)
        assert learnable.requires_grad and learnable.dtype == fixed.dtype == dtype
        assert learnable.is_contiguous(memory_format=memory_format)
        assert torch.equal(learnable, fixed), (learnable != fixed).float().mean()


def test_binary_conv2d_bf16_channels_last(device):
    # Exact integers (|y| <= 9 * 40 < 256 is exact in bf16) in the input's memory format.
    x = torch.randn(2, 40, 6, 6, device=device).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = BinaryTensor.from_float(torch.randn(8, 40, 3, 3, device=device), dtype=torch.bfloat16)
    y = binary_conv2d(x, weight, padding=1, pad_value=1.0)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    expected = dense_reference(
        x.float(), weight.dequantize(torch.float32), None, None, (1, 1), 1, (1, 1), 1, 1.0, bnnops.quantizers.sign
    )
    assert torch.equal(y.float(), expected)


@pytest.mark.parametrize("kernel, groups, pad_value", [(3, 1, 0.0), (3, 2, 1.0), (1, 1, 0.0), (1, 2, -1.0)])
def test_backward_runs_in_the_input_memory_format_without_weight_copies(device, kernel, groups, pad_value):
    # The backward unpacks the weight in the input's memory format: for channels_last that is the
    # words' own order, so no dense copy of the weight is made (NCHW makes one, except for a 1x1
    # kernel, whose moved words are already NCHW-contiguous). The weight cuDNN gets has x's format
    # (a mismatched one it would convert, x and the gradient too), including a 1x1 kernel's, whose
    # strides are ambiguous. That is the backward from x (approx_sign keeps x); ste_sign's packed
    # backward runs the ops of bnnops.ops.backward (tests/test_backward_ops.py).
    from torch._prims_common import suggest_memory_format
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.copies, self.formats = shape, [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy)
                and out.shape == self.shape
            ):
                self.copies.append(func)
            if func.overloadpacket is torch.ops.aten.convolution_backward:
                self.formats.append(suggest_memory_format(args[2]))
            return out

    g = torch.Generator().manual_seed(5)
    weight = nn.Parameter(BinaryTensor.from_float(torch.randn(6, 10 // groups, kernel, kernel, generator=g).to(device)))
    padding = kernel // 2
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 10, 7, 5, generator=g).to(device).contiguous(memory_format=memory_format).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        w_ref = weight.dequantize().detach().requires_grad_()
        y = binary_conv2d(
            x, weight, None, padding=padding, groups=groups, pad_value=pad_value, input_quantizer="approx_sign"
        )
        grad = torch.randn(y.shape, generator=g).to(device).contiguous(memory_format=memory_format)
        with Watch(weight.shape) as watch:  # grad_x alone: AccumulateGrad copies a channels_last grad_weight
            torch.autograd.grad(y, x, grad, retain_graph=True)
        copies = 1 if memory_format == torch.contiguous_format and kernel > 1 else 0
        assert len(watch.copies) == copies and watch.formats == [memory_format], (
            memory_format,
            watch.copies,
            watch.formats,
        )
        weight.grad = None
        y.backward(grad)
        dense_reference(
            x_ref, w_ref, None, None, (1, 1), padding, (1, 1), groups, pad_value, get_quantizer("approx_sign")
        ).backward(grad)
        assert x.grad.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(x.grad, x_ref.grad, **GRAD_TOL)
        torch.testing.assert_close(weight.grad, w_ref.grad, **GRAD_TOL)


def test_layer_options_and_init(device):
    layer = BinaryConv2d(6, 8, 3, padding="same", pad_value=-1, device=device)
    assert isinstance(layer.weight, BinaryTensor) and layer.weight.shape == (8, 6, 3, 3)
    assert layer.bias.shape == (8,) and "pad_value=-1.0" in repr(layer)
    assert layer(torch.randn(2, 6, 5, 7, device=device)).shape == (2, 8, 5, 7)
    even = BinaryConv2d(
        4,
        4,
        4,
        padding="same",
        dilation=2,
        bias=False,
        input_quantizer=None,
        weight_quantizer="ste_sign",
        device=device,
    )
    assert type(even.weight) is nn.Parameter and not isinstance(even.weight, BinaryTensor) and even.bias is None
    assert even(torch.randn(1, 4, 9, 8, device=device)).shape == (1, 4, 9, 8)
    strided = BinaryConv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2, device=device)
    assert strided(torch.randn(1, 4, 9, 8, device=device)).shape == (1, 6, 5, 8)
    assert nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2)(torch.randn(1, 4, 9, 8)).shape == (
        1,
        6,
        5,
        8,
    )


def test_bad_input_gets_clear_errors(device):
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        BinaryConv2d(4, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="groups=3 must divide"):
        BinaryConv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="pad_value"):
        BinaryConv2d(4, 4, 3, pad_value=2.0)
    with pytest.raises(ValueError, match="stride 1"):
        BinaryConv2d(4, 4, 3, stride=2, padding="same")
    layer = BinaryConv2d(4, 4, 3, device=device)
    with pytest.raises(ValueError, match="has 5 channels but the weight"):
        layer(torch.randn(1, 5, 6, 6, device=device))
    with pytest.raises(ValueError, match="larger than the padded input"):
        layer(torch.randn(1, 4, 2, 6, device=device))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or unbatched \(C, H, W\)"):
        layer(torch.randn(1, 1, 4, 6, 6, device=device))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.ones(1, 4, 6, 6, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        layer(torch.randn(1, 4, 6, 6, device=device).half())
    with pytest.raises(TypeError, match="scale must be a float32"):
        binary_conv2d(torch.randn(1, 4, 6, 6, device=device), layer.weight, scale=2.0)
    with pytest.raises(ValueError, match="weight quantizer"):
        BinaryConv2d(4, 4, 3, input_quantizer="magnitude_aware_sign")
    with pytest.raises(TypeError, match=r"bias \(torch.float16\) and x"):
        binary_conv2d(torch.randn(1, 4, 6, 6, device=device), layer.weight, layer.bias.detach().half())
    with pytest.raises(ValueError, match="weight quantizer"):
        binary_conv2d(torch.randn(1, 4, 6, 6, device=device), layer.weight, input_quantizer="magnitude_aware_sign")
    # A learnable scale is applied outside the op: its shape is still checked (no silent broadcast).
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        binary_conv2d(
            torch.randn(1, 4, 6, 6, device=device), layer.weight, scale=torch.ones(1, device=device, requires_grad=True)
        )


@pytest.mark.parametrize("iq,wq", [("ste_sign", None), (None, None), ("ste_sign", "magnitude_aware_sign")])
def test_inference_runs_the_op_alone(monkeypatch, device, iq, wq):
    """With nothing to differentiate the layer calls the op without an autograd node; same output."""
    layer = BinaryConv2d(6, 5, 3, padding=1, input_quantizer=iq, weight_quantizer=wq, device=device)
    x = torch.randn(2, 6, 5, 5, device=device)
    check_inference_runs_the_op_alone(monkeypatch, layer, x, bnnops.conv._BinaryConv2dFunction)


def test_f_conv2d_on_a_binary_weight_runs_w1a16(device):
    # nn.Conv2d with a BinaryTensor weight: F.conv2d reaches the packed W1A16 path (real inputs).
    conv = nn.Conv2d(6, 4, 3, padding="same", bias=True).to(device)
    dense = torch.where(conv.weight.detach() < 0, -1.0, 1.0)
    conv.weight = nn.Parameter(BinaryTensor.from_float(conv.weight.detach()))
    x = torch.randn(2, 6, 5, 5, device=device, requires_grad=True)
    y = conv(x)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = dense.clone().requires_grad_()
    expected = F.conv2d(x_ref, w_ref, conv.bias, 1, "same")
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=w1a16_atol(x, 6 * 9))
    y.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **GRAD_TOL)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, **GRAD_TOL)


class SmallNet(nn.Module):
    """A real-input first layer, two binary layers (one with +1 padding), a binary linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = BinaryConv2d(3, 16, 3, padding=1, input_quantizer=None)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = BinaryConv2d(16, 16, 3, stride=2, padding=1, pad_value=1.0, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = BinaryConv2d(16, 8, 3, padding="same", weight_quantizer="ste_sign")
        self.head = bnnops.nn.BinaryLinear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x))
        return self.head(self.conv3(x).flatten(1))


def test_small_conv_net_compiles_fullgraph(device):
    torch.manual_seed(0)
    net = SmallNet().to(device)
    x = torch.randn(4, 3, 8, 8, device=device)

    def step(model):
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step(net)
    # aot_eager traces forward and backward through fake tensors and AOTAutograd as inductor does;
    # inductor itself passes too but spends ~30 s of C++ compilation on CPU.
    compiled_loss, compiled_grads = step(torch.compile(net, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unbatched_input_and_autocast(device):
    layer = BinaryConv2d(4, 6, 3, padding=1, device=device)
    x = torch.randn(4, 7, 7, device=device)
    assert torch.equal(layer(x), layer(x[None])[0])
    assert torch.equal(F.conv2d(x, layer.weight), F.conv2d(x[None], layer.weight)[0])
    # Under autocast x and bias run in autocast's dtype, as nn.Conv2d's do; gradients keep theirs.
    device_type = torch.device(device).type
    x4 = torch.randn(2, 4, 7, 7, device=device, requires_grad=True)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = layer(x4)
    assert y.dtype == torch.bfloat16
    assert torch.equal(
        y, binary_conv2d(x4.bfloat16(), layer.weight.to(torch.bfloat16), layer.bias.bfloat16(), padding=1)
    )
    y.float().sum().backward()
    assert x4.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
