"""bnnops.convert: converted layers compute their source's eval output (bit for bit where the
arithmetic is exact, within a derived bound where it is not), the default filter and refusals, the
converted model's state dict (weights_only load) and its checkpoint size."""

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOAT_DTYPES, randomize_batch_norms
from torch import nn
from torch.nn.utils import parametrize

import bnnops
from bnnops.convert import ConversionError, LatentLayer, convert, default_filter, is_binary_weight
from bnnops.nn import BinaryConv1d, BinaryConv2d, BinaryLinear
from bnnops.scaled import ScaledBinaryConv1d, ScaledBinaryConv2d, ScaledBinaryLinear


def latent_binarynet(device, dtype=torch.float32, weight_quantizer="ste_sign"):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # Ragged widths: 20 and 40 channels, 45 dense units (not multiples of 32).
    model = bnnops.models.binarynet(
        input_shape=(3, 14, 14), filters=20, dense_units=45, weight_quantizer=weight_quantizer
    )
    return randomize_batch_norms(model, g).to(device, dtype)


def test_binarynet_latent_converts_bit_for_bit(device):
    model = latent_binarynet(device)
    converted = convert(model)
    layers = [m for m in converted.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    assert len(layers) == 9
    for layer in layers:
        assert layer.weight_quantizer is None and isinstance(layer.weight, bnnops.BinaryTensor)
    # The source is left as it was (not inplace).
    assert all(m.weight_quantizer is not None for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear)))
    assert converted.conv1.input_quantizer is None and converted.fc9.input_quantizer is not None
    x = torch.randn(5, 3, 14, 14, device=device)
    with torch.no_grad():
        for memory_format in (torch.contiguous_format, torch.channels_last):
            xm = x.contiguous(memory_format=memory_format)
            assert torch.equal(converted(xm), model(xm))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_binarynet_latent_converts_bit_for_bit_in_16_bits(device, dtype):
    model = latent_binarynet(device, dtype)
    converted = convert(model)
    x = torch.randn(3, 3, 14, 14, device=device, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_birealnet_magnitude_aware_converts_bit_for_bit(device):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = bnnops.models.birealnet18(
        num_classes=7, input_shape=(3, 20, 20), filters=12, weight_quantizer="magnitude_aware_sign"
    )
    model = randomize_batch_norms(model, g).to(device)
    converted = convert(model)
    assert isinstance(converted.block1.conv, ScaledBinaryConv2d)
    # Real layers stay as they are: the stem, the shortcuts' 1x1 convs, the classifier.
    assert type(converted.stem) is nn.Conv2d and type(converted.fc) is nn.Linear
    assert type(converted.block5.shortcut[1]) is nn.Conv2d
    alpha = model.block1.conv.weight.detach().abs().flatten(1).mean(1)
    assert torch.equal(converted.block1.conv.scale, alpha)
    x = torch.randn(2, 3, 20, 20, device=device)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_conv1d_layers_convert(device):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    latent = BinaryConv1d(6, 35, 5, padding=2, stride=2, weight_quantizer="magnitude_aware_sign", device=device)
    plain = nn.Conv1d(35, 9, 3, bias=True)
    with torch.no_grad():
        plain.weight.copy_(plus_minus_alpha(plain.weight.shape, g))
    model = nn.Sequential(latent, nn.BatchNorm1d(35), plain).to(device)
    model = randomize_batch_norms(model, g)
    converted = convert(model)
    assert isinstance(converted[0], ScaledBinaryConv1d) and isinstance(converted[2], ScaledBinaryConv1d)
    assert converted[0].input_quantizer is not None and converted[2].input_quantizer is None
    x = torch.randn(3, 6, 41, generator=g).to(device)
    with torch.no_grad():
        h = model[1](model[0](x))
        assert torch.equal(converted[1](converted[0](x)), h)  # the latent layer: bit for bit
        want, got = model[2](h), converted[2](h)
    abs_sum = F.conv1d(h.abs().double(), plain.weight.detach().abs().double().to(device))
    abs_sum = abs_sum + plain.bias.detach().double().abs().to(device).view(-1, 1)
    assert ((got.double() - want.double()).abs() <= w1a16_bound(abs_sum, 35 * 3, torch.float32)).all()


def test_inplace_keeps_the_object_and_modes(device):
    model = latent_binarynet(device)
    model.fc7.train()
    rng = torch.get_rng_state()
    converted = convert(model, inplace=True)
    assert converted is model and isinstance(model.conv2.weight, bnnops.BinaryTensor)
    assert model.fc7.training and not model.conv2.training
    assert torch.equal(torch.get_rng_state(), rng)  # no initialization ran


def test_already_packed_layers_are_kept(device):
    model = nn.Sequential(BinaryLinear(40, 10, device=device))
    converted = convert(model, inplace=True)
    assert converted[0] is model[0]


def plus_minus_alpha(shape, generator, alpha_one=False):
    """A weight +-alpha per output channel: random signs (zeros never appear), alpha in [0.05, 2)."""
    signs = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    if alpha_one:
        return signs
    alpha = torch.rand(shape[0], generator=generator) * 1.95 + 0.05
    return signs * alpha.view(-1, *[1] * (len(shape) - 1))


def w1a16_bound(x_abs_sum: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """|converted - source| for a W1A16 layer whose source sums x * (+-alpha) and the bnnops layer
    x * (+-1) then * alpha: each side is within (K + 2) u sum|x| alpha of the exact value (a sum
    of K terms in fp32, one product, one bias add), plus half an ulp of the output dtype for each
    side's final rounding."""
    u = 2.0**-24
    out_ulp = torch.finfo(dtype).eps
    return 2 * (K + 2) * u * x_abs_sum + out_ulp * x_abs_sum + 1e-30


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_plain_plus_minus_alpha_layers_convert_to_w1a16(device, dtype):
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(5, 37, 3, padding=1, stride=2)
    lin = nn.Linear(37 * 4 * 4, 33)
    lin_one = nn.Linear(33, 9, bias=False)
    with torch.no_grad():
        conv.weight.copy_(plus_minus_alpha(conv.weight.shape, g))
        lin.weight.copy_(plus_minus_alpha(lin.weight.shape, g))
        lin_one.weight.copy_(plus_minus_alpha(lin_one.weight.shape, g, alpha_one=True))
    model = nn.Sequential(conv, nn.ReLU(), nn.Sequential(nn.Flatten(), lin, nn.Tanh(), lin_one)).to(device, dtype)
    model.eval()
    converted = convert(model)
    assert isinstance(converted[0], ScaledBinaryConv2d) and converted[0].input_quantizer is None
    assert isinstance(converted[2][1], ScaledBinaryLinear)
    assert type(converted[2][3]) is BinaryLinear  # every alpha 1: no scale
    assert torch.equal(converted[0].scale, conv.weight.detach().abs().flatten(1).amax(1).float())
    # Layer by layer against the source on the same input, bounded as w1a16_bound derives.
    x = torch.randn(4, 5, 8, 8, generator=g).to(device, dtype)
    with torch.no_grad():
        h = x
        for source, target, K in ((model[0], converted[0], 45), (model[2][1], converted[2][1], 37 * 16)):
            h = h.flatten(1) if source is model[2][1] else h
            want, got = source(h), target(h)
            w = source.weight.detach().double()
            flat = h.double() if h.dim() == 2 else F.unfold(h.double(), 3, padding=1, stride=2).transpose(1, 2)
            abs_sum = flat.abs() @ w.abs().flatten(1).T  # sum_k |x_k| alpha, per output
            if h.dim() == 4:
                abs_sum = abs_sum.transpose(1, 2).reshape(want.shape)
            abs_sum = abs_sum + source.bias.detach().double().abs().view(-1, *[1] * (want.dim() - 2))
            bound = w1a16_bound(abs_sum, K, dtype)
            assert ((got.double() - want.double()).abs() <= bound).all()
            h = torch.relu(want)


def test_parametrized_sign_weight_converts(device):
    class Sign(nn.Module):
        def forward(self, w):
            return torch.where(w < 0, -1.0, 1.0).to(w.dtype)

    lin = nn.Linear(70, 6).to(device)
    parametrize.register_parametrization(lin, "weight", Sign())
    model = nn.Sequential(nn.Linear(3, 70), lin).to(device).eval()
    converted = convert(model)
    assert type(converted[0]) is nn.Linear and type(converted[1]) is BinaryLinear
    x = torch.randn(8, 3, device=device)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def sign(x):
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


class SignConv2d(nn.Conv2d):
    """A user's latent-weight convolution: binarizes its input and weight in its forward."""

    def forward(self, x):
        return self._conv_forward(sign(x), sign(self.weight), self.bias)


class SignLinear(nn.Linear):
    def forward(self, x):
        return F.linear(sign(x), sign(self.weight), self.bias)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SignConv2d(6, 33, 3, padding=1)
        self.bn = nn.BatchNorm2d(33)

    def forward(self, x):
        return self.bn(self.conv(x)) + x.mean(1, keepdim=True)


def test_declared_latent_layers_convert_bit_for_bit(device):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(Block(), nn.PReLU(), nn.Flatten(), SignLinear(33 * 25, 11))
    model = randomize_batch_norms(model, g).to(device)
    declared = convert(
        model, latent_fn=lambda m, fqn: LatentLayer() if isinstance(m, (SignConv2d, SignLinear)) else None
    )
    assert isinstance(declared[0].conv, BinaryConv2d) and isinstance(declared[3], BinaryLinear)
    assert declared[0].conv.bias is not None and declared[0].conv.pad_value == 0.0
    x = torch.randn(4, 6, 5, 5, device=device)
    with torch.no_grad():
        assert torch.equal(declared(x), model(x))
    # Undeclared, the subclasses are left alone by default, and refused when a filter picks them.
    assert type(convert(model)[3]) is SignLinear
    with pytest.raises(ConversionError, match="forward of its own.*latent_fn"):
        convert(model, filter_fn=lambda m, fqn: fqn == "3")


def test_declared_magnitude_aware_layer(device):
    class ScaledSignLinear(nn.Linear):
        def forward(self, x):
            alpha = self.weight.abs().mean(1, keepdim=True)
            return F.linear(sign(x), alpha * sign(self.weight), self.bias)

    torch.manual_seed(4)
    model = nn.Sequential(ScaledSignLinear(50, 19)).to(device)
    spec = LatentLayer(weight_quantizer="magnitude_aware_sign")
    converted = convert(model, latent_fn=lambda m, fqn: spec if fqn == "0" else None)
    assert isinstance(converted[0], ScaledBinaryLinear)
    x = torch.randn(6, 50, device=device)
    with torch.no_grad():
        want, got = model(x), converted(x)
    # The source rounds alpha * sign(w) products and sums them; the converted sums +-1 exactly
    # and multiplies once: within 2 (K + 2) u sum|alpha| of each other, bias included.
    bound = 2 * 52 * 2.0**-24 * (50 * model[0].weight.abs().mean(1) + model[0].bias.abs())
    assert ((got - want).abs() <= bound.detach()).all()


def test_default_filter_skips_real_layers_and_user_filter_refuses_them(device):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)).to(device)
    converted = convert(model)
    assert [type(m) for m in converted] == [nn.Conv2d, nn.Flatten, nn.Linear]
    assert not default_filter(model[0], "0")
    with pytest.raises(ConversionError, match=r"'2' \(Linear\): its weight is not \+-alpha.*real values"):
        convert(model, filter_fn=lambda m, fqn: fqn == "2")


@pytest.mark.parametrize(
    "layer,match",
    [
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "pads with a constant"),
        (nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), "pads with a constant"),
    ],
)
def test_unrepresentable_layers_are_refused(layer, match):
    with torch.no_grad():
        layer.weight.copy_(sign(torch.randn(layer.weight.shape)))
    with pytest.raises(ConversionError, match=match):
        convert(nn.Sequential(layer))


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        convert(lambda x: x)
    with pytest.raises(TypeError, match="LatentLayer or None"):
        convert(nn.Sequential(nn.Linear(3, 3)), latent_fn=lambda m, fqn: "ste_sign")
    with pytest.raises(ValueError, match="weight quantizer"):
        convert(nn.Linear(3, 3), latent_fn=lambda m, fqn: LatentLayer(input_quantizer="magnitude_aware_sign"))


def test_default_filter_needs_two_weights_and_a_nonzero_alpha_per_channel(device):
    """Layers that are +-alpha only trivially stay real under the default filter: one weight per
    output channel (nn.Linear(1, n), a depthwise 1x1 conv on one channel per group), all-zero
    weights or a zero channel; an explicit filter_fn still converts them."""
    g = torch.Generator().manual_seed(31)
    one_input = nn.Linear(1, 6)
    depthwise = nn.Conv2d(4, 4, 1, groups=4)
    zeros = nn.Linear(5, 3)
    zeros.weight.data.zero_()
    zero_channel = nn.Linear(5, 3)
    zero_channel.weight.data.copy_(sign(torch.randn(3, 5, generator=g)))
    zero_channel.weight.data[1] = 0.0
    binary = nn.Linear(5, 3)
    binary.weight.data.copy_(sign(torch.randn(3, 5, generator=g)) * 0.25)
    model = nn.Sequential(one_input, nn.Flatten(), zeros, zero_channel, binary).to(device)
    assert all(is_binary_weight(m.weight) for m in (one_input, depthwise, zeros, zero_channel, binary))
    assert [default_filter(m, "") for m in (one_input, depthwise, zeros, zero_channel, binary)] == [False] * 4 + [True]
    converted = convert(model)
    assert [type(m) for m in converted][:4] == [nn.Linear, nn.Flatten, nn.Linear, nn.Linear]
    assert isinstance(converted[4].weight, bnnops.BinaryTensor)
    explicit = convert(nn.Sequential(one_input), filter_fn=lambda m, fqn: True)
    assert isinstance(explicit[0].weight, bnnops.BinaryTensor)


def test_is_binary_weight():
    w = torch.tensor([[0.5, -0.5, 0.5], [-2.0, -2.0, 2.0], [0.0, 0.0, 0.0]])
    assert is_binary_weight(w)
    assert not is_binary_weight(torch.tensor([[0.5, -0.25]]))
    assert not is_binary_weight(torch.tensor([[float("nan"), 1.0]]))
    assert not is_binary_weight(torch.tensor([[float("inf"), float("-inf")]]))


def test_a_single_layer_model_is_replaced(device):
    lin = BinaryLinear(45, 3, weight_quantizer="ste_sign", device=device)
    converted = convert(lin, inplace=True)
    assert converted is not lin and isinstance(converted.weight, bnnops.BinaryTensor)
    words = converted.weight.words
    assert words.shape == (3, 2) and not (words[:, 1] >> 13).any()  # padding bits 13..31 stay 0
    x = torch.randn(2, 45, device=device)
    with torch.no_grad():
        assert torch.equal(converted(x), lin(x))


def saved(state_dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return buffer


def test_converted_state_dict_loads_with_weights_only(device):
    model = latent_binarynet(device, weight_quantizer="magnitude_aware_sign")
    converted = convert(model)
    state = torch.load(saved(converted.state_dict()), weights_only=True)
    assert isinstance(state["conv2.weight"], bnnops.BinaryTensor) and "conv2.scale" in state
    fresh = convert(latent_binarynet(device, weight_quantizer="magnitude_aware_sign"))
    for m in fresh.modules():
        if isinstance(m, (ScaledBinaryConv2d, ScaledBinaryLinear)):
            m.scale.fill_(3.0)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 14, 14, device=device)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_binarynet_checkpoint_is_under_a_28th_of_float32():
    # The full-size model (10.4M binary weights): 1 bit each, against 32 in the float32 model;
    # batch norm (float32 in both) is what keeps the ratio above 1/32.
    model = bnnops.models.binarynet(weight_quantizer="ste_sign")
    float_bytes = saved(model.state_dict()).getbuffer().nbytes
    converted_bytes = saved(convert(model, inplace=True).state_dict()).getbuffer().nbytes
    assert converted_bytes <= float_bytes / 28, converted_bytes / float_bytes


def test_scaled_layers_fuse_their_scale(device):
    torch.manual_seed(6)
    cases = [
        (ScaledBinaryLinear(45, 13), BinaryLinear(45, 13), (3, 45)),
        (ScaledBinaryConv1d(33, 13, 3, padding=1), BinaryConv1d(33, 13, 3, padding=1), (2, 33, 9)),
        (ScaledBinaryConv2d(33, 13, 3, padding=1), BinaryConv2d(33, 13, 3, padding=1), (2, 33, 5, 6)),
    ]
    for scaled, plain, shape in cases:
        scaled, plain = scaled.to(device), plain.to(device)
        assert scaled.scale.dtype == torch.float32 and torch.equal(scaled.scale, torch.ones(13, device=device))
        plain.load_state_dict({k: v for k, v in scaled.state_dict().items() if k != "scale"})
        x = torch.randn(shape, device=device)
        with torch.no_grad():
            assert torch.equal(scaled(x), plain(x))  # ones: the unscaled layer's bits
            scaled.scale.uniform_(-2, 2)
            # The op's epilogue: the exact integer sums times scale, then + bias, each rounded once in fp32.
            w = scaled.weight.dequantize()
            signs = sign(x)
            if x.dim() == 2:
                sums = F.linear(signs, w)
            else:
                sums = (F.conv1d if x.dim() == 3 else F.conv2d)(signs, w, padding=1)
            channel = (-1, *[1] * (x.dim() - 2))
            assert torch.equal(scaled(x), sums * scaled.scale.view(channel) + scaled.bias.view(channel))
