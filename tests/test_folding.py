"""bnnops.fold_for_inference: folded models against their unfolded eval copies.

Every folded layer's packed words are compared with the packed sign of what the unfolded model
hands the next binary layer (hooks on both models), and the final outputs with each other. On
the CPU both run the same float operations on the same integers (the thresholds are found by
running the batch norm module itself on every reachable sum), so the bound is 0: outputs equal
bit for bit, argmax identical (ties in the logits are counted, and equal in both by construction).
Batch norm statistics are drawn so the hard cases occur: negative and zero scales, zero variance
(eps alone), integer means with zero shift (batch norm outputs exactly 0: sign(0) = +1).
"""

import pytest
import torch
from helpers import DEVICE, FLOAT_DTYPES
from torch import nn

import bnnops
import bnnops.folding
from bnnops.activation_bytes import activation_bytes_written
from bnnops.folded_layers import FoldedBinaryConv2d, FoldedBinaryLinear, PackedFlatten, PackedMaxPool2d
from bnnops.folding import FoldError, fold_for_inference
from bnnops.models import binarynet, birealnet18
from bnnops.nn import BinaryConv2d, BinaryLinear, MaxPool2d
from bnnops.ops.backward_reference import pack_sign_and_mask_conv_reference
from bnnops.packing import pack_bits
from bnnops.scaled import ScaledBinaryConv2d, ScaledBinaryLinear


def hard_statistics(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random eval statistics of every batch norm, with the hard cases on some channels."""
    for bn in model.modules():
        if not isinstance(bn, nn.BatchNorm1d | nn.BatchNorm2d):
            continue
        c = bn.num_features
        kind = torch.randint(0, 6, (c,), generator=generator)
        mean = torch.randn(c, generator=generator) * 4
        var = torch.rand(c, generator=generator) * 9 + 0.1
        gamma = torch.randn(c, generator=generator)
        beta = torch.randn(c, generator=generator)
        mean = torch.where(kind == 1, mean.round(), mean)  # integer mean, zero shift: exact zeros
        beta = torch.where(kind == 1, 0.0, beta)
        var = torch.where(kind == 2, 0.0, var)  # zero variance: eps alone
        gamma = torch.where(kind == 3, 0.0, gamma)  # constant output sign(beta)
        gamma = torch.where(kind == 4, -gamma.abs(), gamma)  # negative scale: flipped
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if bn.affine:
            bn.weight.data.copy_(gamma)
            bn.bias.data.copy_(beta)
    return model


def conv_words(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Packed signs of a real conv activation (N, C, H, W), per-group channels-last words."""
    return pack_sign_and_mask_conv_reference(x, 0.0, groups)[0]


def record(model: nn.Module, kinds: tuple[type, ...]) -> tuple[dict[str, torch.Tensor], list]:
    """Inputs of every module of ``kinds`` by name (first positional argument), and the hooks."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0])))
    return seen, handles


def check_folded(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``model``; check each packed input of a folded layer against the unfolded model's real
    input there (its signs, packed) and the outputs against each other; return both outputs."""
    model = model.eval()
    folded = fold_for_inference(model)
    real_inputs, h1 = record(model, (BinaryConv2d, BinaryLinear))
    packed_inputs, h2 = record(folded, (FoldedBinaryConv2d, FoldedBinaryLinear))
    with torch.no_grad():
        expected, got = model(x), folded(x)
    for h in h1 + h2:
        h.remove()
    compared, previous = 0, None
    for name, module in folded.named_modules():
        if name in packed_inputs and module.packed_input:
            real, words = real_inputs[name], packed_inputs[name]
            if isinstance(module, FoldedBinaryConv2d):
                want = conv_words(real, module.groups)
            elif isinstance(previous, PackedFlatten) and not previous.repack:
                # Words in (h, w, c) order: the flatten passed the conv's words through.
                want = pack_bits(real.unflatten(1, (previous.channels, -1)).transpose(1, 2).flatten(1) < 0)
            else:
                want = pack_bits(real < 0)
            assert torch.equal(words, want), name
            compared += 1
        previous = module
    assert compared > 0
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    return expected, got


@pytest.mark.parametrize("filters, dtype", [(8, dtype) for dtype in FLOAT_DTYPES] + [(12, torch.float32)], ids=str)
def test_binarynet_folded_equals_unfolded(filters, dtype):
    """BinaryNet (small widths: 8 gives ragged convs and a word-aligned flatten, 12 a repacked
    flatten), random images in three dtypes: every packed activation and the logits equal."""
    g = torch.Generator().manual_seed(filters)
    model = hard_statistics(binarynet(filters=filters, dense_units=40), g).to(DEVICE, dtype)
    x = torch.randn(24, 3, 32, 32, generator=g).to(DEVICE, dtype)
    expected, got = check_folded(model, x)
    top2 = expected.float().topk(2, dim=1).values
    ties = int((top2[:, 0] == top2[:, 1]).sum())
    assert torch.equal(expected.argmax(1), got.argmax(1)), f"{ties} exact ties"
    folded = fold_for_inference(model)
    assert sum(isinstance(m, PackedMaxPool2d) for m in folded.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in folded.modules()) == 1  # the logits' one


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_memory_formats_and_a_real_first_layer(fmt):
    """The W1A16 first layer's float threshold (bisection over fp32) and a channels_last input."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        BinaryConv2d(5, 40, 3, padding=1, input_quantizer=None),
        nn.BatchNorm2d(40),
        BinaryConv2d(40, 33, 3, stride=2, padding=1, pad_value=-1.0),
        nn.BatchNorm2d(33),
        BinaryConv2d(33, 7, 2),
    )
    hard_statistics(model, g).to(DEVICE)
    x = torch.randn(4, 5, 9, 11, generator=g).to(DEVICE).contiguous(memory_format=fmt)
    check_folded(model, x)


@pytest.mark.parametrize(
    "pool, order",
    [
        (nn.MaxPool2d(2), "before"),
        (MaxPool2d(3, stride=2, padding=1), "before"),
        (nn.MaxPool2d(3, stride=2, ceil_mode=True), "after"),
        (nn.MaxPool2d(2, stride=1, dilation=2), "before"),
    ],
)
def test_max_pool_on_bits(pool, order):
    """Pooling on words (AND where the threshold's bit is 1 below it, OR above, padding neutral)
    equals pooling the real values, before or after the batch norm, with a grouped reader whose
    groups hold ragged channel counts."""
    g = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(36)
    layers = [BinaryConv2d(6, 36, 3, bias=True), *((pool, bn) if order == "before" else (bn, pool))]
    model = nn.Sequential(*layers, BinaryConv2d(36, 12, 1, groups=2))
    hard_statistics(model, g).to(DEVICE)
    x = torch.randn(3, 6, 12, 13, generator=g).to(DEVICE)
    check_folded(model, x)
    words = fold_for_inference(model)[:3](x)
    # Two groups of 18 channels: bits 18..31 of each group's word are padding, 0.
    assert words.shape[-1] == 2 and not (words >> 18).any()


def test_user_sequential_linear_chain_with_bias_and_nesting():
    """A nested user Sequential of linear layers with biases (folded into integer thresholds), a
    binarized real input (W1A1 first layer), ragged widths, dropout and identities inside chains,
    and a real head; padding bits 0."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(BinaryLinear(75, 45), nn.BatchNorm1d(45)),
        nn.Sequential(BinaryLinear(45, 70, bias=True), nn.Dropout(0.5), nn.BatchNorm1d(70, affine=False, eps=1e-5)),
        nn.Identity(),
        BinaryLinear(70, 9, bias=True),
        nn.BatchNorm1d(9),
    )
    hard_statistics(model, g).to(DEVICE)
    x = torch.randn(50, 3, 5, 5, generator=g).to(DEVICE)
    check_folded(model, x)
    folded = fold_for_inference(model)
    hidden = folded[1](folded[0](x))
    assert hidden.dtype == torch.int32 and hidden.shape == (50, 2) and not (hidden[:, 1] >> 13).any()
    assert not any(isinstance(m, nn.Dropout | nn.BatchNorm1d) for m in folded[:4].modules())


def test_small_sums_with_exact_ties(monkeypatch):
    """K = 5: sums take 11 values; integer means and zero shifts make batch norm outputs exactly 0
    (sign +1), zero variance with a tiny eps makes huge slopes: the folded bits still equal. The
    thresholds are derived 9 channels per batch norm call (as a wide layer's are)."""
    monkeypatch.setattr(bnnops.folding, "_GRID_VALUES", 100)
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(BinaryLinear(5, 64, bias=False), nn.BatchNorm1d(64, eps=1e-12), BinaryLinear(64, 3))
    hard_statistics(model, g)
    bn = model[1]
    bn.running_mean[:32] = torch.arange(-5, 6).repeat(3)[:32].float()
    bn.bias.data[:32] = 0.0
    bn.running_var[:8] = 0.0
    model.to(DEVICE)
    x = torch.randn(400, 5, generator=g).to(DEVICE)
    check_folded(model, x)
    sliced = bnnops.folding.thresholds(model[0], model[1])
    monkeypatch.setattr(bnnops.folding, "_GRID_VALUES", 2**24)
    whole = bnnops.folding.thresholds(model[0], model[1])
    assert all(torch.equal(a, b) for a, b in zip(sliced, whole))


def test_fold_keeps_real_consumers_and_refuses_latent_weights():
    """Bi-Real Net's blocks (real shortcuts) stay as they are; a latent weight in a chain is refused."""
    g = torch.Generator().manual_seed(13)
    model = hard_statistics(birealnet18(num_classes=5, input_shape=(3, 16, 16), filters=4), g).eval()
    folded = fold_for_inference(model)
    assert not any(isinstance(m, FoldedBinaryConv2d | FoldedBinaryLinear) for m in folded.modules())
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
    latent = nn.Sequential(BinaryLinear(8, 8, weight_quantizer="ste_sign"), nn.BatchNorm1d(8), BinaryLinear(8, 2))
    with pytest.raises(FoldError, match="latent weight.*bnnops.convert"):
        fold_for_inference(latent)
    no_stats = nn.Sequential(BinaryLinear(8, 8), nn.BatchNorm1d(8, track_running_stats=False), BinaryLinear(8, 2))
    with pytest.raises(FoldError, match="no running statistics"):
        fold_for_inference(no_stats)
    assert isinstance(latent[0].weight, nn.Parameter) and latent.training  # the input model is unchanged


def test_folded_layers_refuse_wrong_words():
    model = fold_for_inference(nn.Sequential(BinaryLinear(40, 40), nn.BatchNorm1d(40), BinaryLinear(40, 3)))
    with pytest.raises(bnnops.DtypeError, match="int32 packed sign words"):
        model[2](torch.randn(2, 40))
    with pytest.raises(bnnops.ShapeError, match=r"words of shape \(N, 2\)"):
        model[2](torch.zeros(2, 3, dtype=torch.int32))
    pool = PackedMaxPool2d(torch.zeros(2, dtype=torch.int32), (2, 2), (2, 2), (0, 0), (1, 1), False)
    flatten = PackedFlatten(40, repack=True)
    for module in (pool, flatten):
        with pytest.raises(bnnops.DtypeError, match="int32 packed sign words"):
            module(torch.randn(1, 4, 4, 2))
        with pytest.raises(bnnops.ShapeError):
            module(torch.zeros(1, 4, 4, 3, dtype=torch.int32))


def test_binarynet_writes_under_a_twelfth_of_the_activation_bytes():
    """Counted activation bytes per image, folded vs unfolded BinaryNet at its full width with bf16
    activations (the unfolded model's smallest count): at most 1/12."""
    dtype = torch.bfloat16
    model = binarynet().eval().to(dtype)
    folded = fold_for_inference(model)
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    unfolded_bytes = sum(activation_bytes_written(model, x).values())
    folded_bytes = sum(activation_bytes_written(folded, x).values())
    assert 12 * folded_bytes <= unfolded_bytes


def random_scales(layer: nn.Module, generator: torch.Generator) -> nn.Module:
    """A scaled layer's scale: random magnitudes, with negative and zero channels."""
    n = layer.scale.numel()
    scale = (torch.rand(n, generator=generator) * 3 + 0.05) * torch.randn(n, generator=generator).sign()
    scale[::7] = 0.0
    layer.scale.copy_(scale)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scaled_layers_start_and_consume_chains(dtype):
    """bnnops.scaled layers (scale with negative and zero channels) as producers, W1A16 (scale
    applied by the sign op) and W1A1 (scale folded into the integer threshold), and as consumers,
    with real output (scale applied by the op): bits and logits equal the unfolded model's."""
    g = torch.Generator().manual_seed(17)
    model = nn.Sequential(
        random_scales(ScaledBinaryConv2d(5, 40, 3, padding=1, bias=True, input_quantizer=None), g),
        nn.BatchNorm2d(40),
        random_scales(ScaledBinaryConv2d(40, 36, 3, stride=2, bias=True), g),
        nn.BatchNorm2d(36),
        nn.Flatten(),
        random_scales(ScaledBinaryLinear(36 * 16, 9, bias=True), g),
    )
    hard_statistics(model, g).to(DEVICE, dtype)
    x = torch.randn(6, 5, 10, 10, generator=g).to(DEVICE, dtype)
    check_folded(model, x)
    folded = fold_for_inference(model)
    assert [type(m) for m in folded if not isinstance(m, nn.Identity)] == [
        FoldedBinaryConv2d,
        FoldedBinaryConv2d,
        PackedFlatten,
        FoldedBinaryLinear,
    ]
    linear = nn.Sequential(
        random_scales(ScaledBinaryLinear(30, 50, input_quantizer=None), g),
        nn.BatchNorm1d(50),
        BinaryLinear(50, 40, bias=True),
        nn.BatchNorm1d(40),
        random_scales(ScaledBinaryLinear(40, 3), g),
    )
    hard_statistics(linear, g).to(DEVICE, dtype)
    check_folded(linear, torch.randn(20, 30, generator=g).to(DEVICE, dtype))


def test_convert_then_fold_keeps_a_plain_layers_alpha():
    """A plain nn.Conv2d with +-alpha weights (alpha != 1) converts to a ScaledBinaryConv2d; folding
    the converted model starts a chain with it and keeps its scale: outputs equal bit for bit."""
    g = torch.Generator().manual_seed(19)
    conv = nn.Conv2d(3, 20, 3, padding=1)
    alpha = torch.rand(20, generator=g) * 3 + 0.1
    conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=g).sign() * alpha[:, None, None, None])
    model = nn.Sequential(
        conv,
        nn.BatchNorm2d(20),
        BinaryConv2d(20, 7, 3, weight_quantizer="ste_sign"),
        nn.BatchNorm2d(7),
        BinaryConv2d(7, 5, 3, weight_quantizer="magnitude_aware_sign"),
    )
    converted = bnnops.convert(hard_statistics(model, g).eval()).to(DEVICE)
    assert type(converted[0]) is ScaledBinaryConv2d and type(converted[4]) is ScaledBinaryConv2d
    check_folded(converted, torch.randn(4, 3, 9, 9, generator=g).to(DEVICE))


def test_subclasses_with_their_own_forward_are_left_alone():
    """Only the exact binary layer types (and the scaled ones) fold: a subclass's forward is kept."""

    class Doubled(BinaryLinear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(
        Doubled(10, 20),
        nn.BatchNorm1d(20),
        BinaryLinear(20, 20),
        nn.BatchNorm1d(20),
        BinaryLinear(20, 20),
        nn.BatchNorm1d(20),
        Doubled(20, 3),
    )
    hard_statistics(model, torch.Generator().manual_seed(23)).eval()
    folded = fold_for_inference(model)
    kept = [Doubled, nn.BatchNorm1d, FoldedBinaryLinear, nn.Identity, FoldedBinaryLinear, nn.BatchNorm1d, Doubled]
    assert [type(m) for m in folded] == kept
    assert folded[2].threshold is not None and not folded[2].packed_input
    assert folded[4].packed_input and folded[4].threshold is None
    x = torch.randn(5, 10)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float"])
def test_folded_layers_refuse_a_dtype_change(cast):
    """Thresholds hold for the folding dtype: a cast raises before changing the layer; a move does not."""
    model = nn.Sequential(BinaryLinear(40, 40, bias=True), nn.BatchNorm1d(40), BinaryLinear(40, 3, bias=True))
    hard_statistics(model, torch.Generator().manual_seed(29))
    folded = fold_for_inference(model.to(torch.bfloat16 if cast == "float" else torch.float32))
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    with pytest.raises(bnnops.DtypeError, match=r"fold after the final \.to\(dtype\)"):
        getattr(folded, cast)()
    after = folded.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    folded.to("cpu")  # same dtype: accepted
