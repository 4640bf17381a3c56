"""bnnops.binary_conv1d and bnnops.nn.BinaryConv1d against sign-binarized F.conv1d, and the module
conventions tests/test_module_conventions.py holds BinaryConv2d to (init as nn.Conv1d, meta init,
repr, pickling, state dicts, dtype moves, strided inputs, errors as nn.Conv1d's), plus Bop on it
and its summary."""

import copy
import gc
import inspect
import io
import math
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, FLOAT_DTYPES
from test_module_conventions import ULP, ErrorInput, Variant, make_input, raised_by
from torch import nn

import bnnops
from bnnops import BinaryTensor
from bnnops.nn import BinaryConv1d
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError
from bnnops.optim import Bop
from bnnops.quantizers import get_quantizer

# Ragged channel counts (not multiples of 32), every geometry argument, both pad values, W1A1 and
# W1A16, unbatched input; each variant runs with a packed and with a latent weight.
VARIANTS = [
    Variant(dict(in_channels=37, out_channels=5, kernel_size=3, padding=1), ((3, 37, 29), (37, 11))),
    Variant(
        dict(in_channels=8, out_channels=6, kernel_size=2, stride=2, padding=1, dilation=3, groups=2, bias=False),
        ((2, 8, 17),),
    ),
    Variant(
        dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", pad_value=1.0, input_quantizer=None),
        ((2, 4, 9),),
    ),
    Variant(dict(in_channels=33, out_channels=3, kernel_size=(5,), padding=(2,), pad_value=-1.0), ((2, 33, 13),)),
    Variant(
        dict(in_channels=5, out_channels=3, kernel_size=1, stride=(3,), input_quantizer="swish_sign"), ((2, 5, 10),)
    ),
    Variant(dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid"), ((1, 3, 7),)),
]
# Latent weights take a weight quantizer per variant (magnitude_aware_sign scales the output).
LATENT_QUANTIZERS = ["ste_sign", "magnitude_aware_sign", "ste_sign", "approx_sign", "ste_sign", "ste_sign"]
CASES = [(v, i, latent) for i, v in enumerate(VARIANTS) for latent in (False, True)]
cases = pytest.mark.parametrize(
    "variant, index, latent", CASES, ids=[f"v{i}-{'latent' if lat else 'packed'}" for _, i, lat in CASES]
)

_CONV = dict(in_channels=4, out_channels=6, kernel_size=3)
ERRORS = [
    ErrorInput(_CONV, ShapeError, r"has 5 channels but the weight \(6, 4, 3\) with groups=1 expects 4", (2, 5, 8)),
    ErrorInput(_CONV, ShapeError, r"\(N, C, L\) or unbatched \(C, L\)", (1, 4, 6, 6)),
    ErrorInput(_CONV, ShapeError, r"\(N, C, L\) or unbatched \(C, L\)", (8,)),
    ErrorInput(_CONV, ShapeError, r"kernel 3 \(dilation 1\) is larger than the padded input of length 2", (1, 4, 2)),
    ErrorInput(_CONV, DtypeError, "float32, bfloat16", (1, 4, 8), torch.float64),
    ErrorInput(_CONV, DtypeError, "float32, bfloat16", (1, 4, 8), torch.int64),
    ErrorInput(_CONV, DtypeError, "same dtype", (1, 4, 8), torch.float16),
    ErrorInput(_CONV, DeviceError, "meta", (1, 4, 8), device="meta", torch_too=False),
    ErrorInput({**_CONV, "groups": 4}, ShapeError, "groups=4 must divide"),
    ErrorInput({**_CONV, "padding": "full"}, ShapeError, "'valid' or 'same'"),
    ErrorInput(
        {**_CONV, "stride": 2, "padding": "same"}, ShapeError, r"stride 1 \(as in torch.nn.Conv1d\), got stride=2$"
    ),
    ErrorInput({**_CONV, "kernel_size": (3, 3)}, ShapeError, "1-tuple", torch_too=False),
    ErrorInput({**_CONV, "padding_mode": "reflect"}, ValueError, "padding_mode='zeros' only", torch_too=False),
    ErrorInput({**_CONV, "pad_value": 0.5}, ValueError, "pad_value", torch_too=False),
    ErrorInput({**_CONV, "input_quantizer": "magnitude_aware_sign"}, ValueError, "weight quantizer", torch_too=False),
]


def kwargs_of(variant: Variant, index: int, latent: bool) -> dict:
    return {**variant.kwargs, **({"weight_quantizer": LATENT_QUANTIZERS[index]} if latent else {})}


def build(kwargs: dict, seed: int = 0, **factory) -> BinaryConv1d:
    torch.manual_seed(seed)
    return BinaryConv1d(**kwargs, **factory)


def torch_kwargs(kwargs: dict) -> dict:
    """The arguments nn.Conv1d also takes."""
    accepted = inspect.signature(nn.Conv1d).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def dense_weight(m: BinaryConv1d, dtype=torch.float64) -> torch.Tensor:
    """A leaf holding what receives the weight gradient: the dense +-1 weight, or the latent weight."""
    w = m.weight.dequantize(torch.float32) if isinstance(m.weight, BinaryTensor) else m.weight.detach()
    return w.to(dtype).clone().requires_grad_()


def dense_forward(m: BinaryConv1d, x, w_leaf, bias, magnitude=False):
    """What the layer computes, by F.conv1d on sign-binarized values in x's dtype; with
    ``magnitude`` the same sum over absolute values (the scale of the rounding errors)."""
    iq, wq = m.input_quantizer, m.weight_quantizer
    a = iq(x) if iq is not None else x
    w = wq(w_leaf) if wq is not None else w_leaf
    pad_value = m.pad_value
    if magnitude:
        a, w, bias, pad_value = a.abs(), w.abs(), None if bias is None else bias.abs(), abs(pad_value)
    if m.padding == "same":
        total = m.dilation[0] * (m.kernel_size[0] - 1)
        left, right = total // 2, total - total // 2
    else:
        left = right = 0 if m.padding == "valid" else m.padding[0]
    a = F.pad(a, (left, right), value=pad_value)
    return F.conv1d(a, w, bias, m.stride, 0, m.dilation, m.groups)


def assert_matches_dense(m: BinaryConv1d, x: torch.Tensor, y: torch.Tensor) -> None:
    """y = m(x) within the op's rounding of the float64 reference: W1A1 sums are exact (then scale
    and bias in fp32, 2^-24 each); W1A16 sums are fp32 of exact or 3xTF32 products, (K + 2) * 2^-20
    of the magnitude; then one rounding to y's dtype (the bound of test_module_conventions)."""
    x64 = x.detach().double()
    w, b = dense_weight(m).detach(), None if m.bias is None else m.bias.detach().double()
    with torch.no_grad():
        expected, magnitude = dense_forward(m, x64, w, b), dense_forward(m, x64, w, b, magnitude=True)
    per_term = 2.0**-22 if m.input_quantizer is not None else (math.prod(m.weight.shape[1:]) + 2) * 2.0**-20
    bound = per_term * magnitude + ULP[y.dtype] * expected.abs()
    error = (y.detach().double().cpu() - expected.cpu()).abs()
    assert y.shape == expected.shape and bool((error <= bound.cpu()).all()), (error - bound.cpu()).max()


def test_every_constructor_argument_is_exercised():
    used = [kwargs_of(v, i, lat) for v, i, lat in CASES] + [e.kwargs for e in ERRORS]
    for name, p in inspect.signature(BinaryConv1d).parameters.items():
        if name in ("device", "dtype"):
            continue
        required = p.default is inspect.Parameter.empty
        assert any(name in k and (required or k[name] != p.default) for k in used), name


@cases
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_conv1d_reference(variant, index, latent, dtype):
    """Forward in every float dtype (unbatched included): sign-binarized F.conv1d's values within
    the op's rounding, x's dtype, nn.Conv1d's output shape; the function gives the layer's bits."""
    kwargs = kwargs_of(variant, index, latent)
    m = build(kwargs, device=DEVICE, dtype=dtype)
    for shape in variant.input_shapes:
        x = make_input(shape, dtype)
        y = m(x)
        assert y.dtype == dtype
        assert y.shape == nn.Conv1d(**torch_kwargs(kwargs), device="meta")(x.to("meta", torch.float32)).shape
        assert_matches_dense(m, x, y)
        functional = bnnops.binary_conv1d(
            x,
            m.weight,
            m.bias,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            pad_value=m.pad_value,
            input_quantizer=m.input_quantizer,
            weight_quantizer=m.weight_quantizer,
        )
        assert torch.equal(functional, y)


@cases
def test_gradients_match_dense_reference(variant, index, latent):
    """Gradients of x, the weight (dense, of the logical (O, C/groups, k) shape: what Bop reads)
    and bias against autograd through the float64 reference."""
    m = build(kwargs_of(variant, index, latent), device=DEVICE)
    for shape in variant.input_shapes:
        m.zero_grad()
        x = make_input(shape, requires_grad=True)
        y = m(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert type(m.weight.grad) is torch.Tensor and m.weight.grad.shape == m.weight.shape
        x64, w64 = x.detach().double().requires_grad_(), dense_weight(m)
        b64 = None if m.bias is None else m.bias.detach().double().requires_grad_()
        dense_forward(m, x64, w64, b64).backward(g.double())
        pairs = [(x.grad, x64.grad), (m.weight.grad, w64.grad)] + ([] if m.bias is None else [(m.bias.grad, b64.grad)])
        for got, want in pairs:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()))


@cases
def test_init_factory_kwargs_and_meta(variant, index, latent):
    """Init and reset_parameters draw as nn.Conv1d's from the same seed (the signs for a packed
    weight); device and dtype reach every parameter; built on meta, to_empty, reset_parameters
    gives the layer built directly, bit for bit."""
    kwargs = kwargs_of(variant, index, latent)
    m = build(kwargs, seed=1)
    torch.manual_seed(1)
    ref = nn.Conv1d(**torch_kwargs(kwargs))
    for seed in (None, 2):
        if seed is not None:
            torch.manual_seed(seed)
            m.reset_parameters()
            torch.manual_seed(seed)
            ref.reset_parameters()
        expected = ref.weight.detach() if latent else torch.where(ref.weight.detach() < 0, -1.0, 1.0)
        assert torch.equal(dense_weight(m, torch.float32).detach(), expected)
        assert (m.bias is None) == (ref.bias is None)
        assert m.bias is None or torch.equal(m.bias.detach(), ref.bias.detach())
    for dtype in FLOAT_DTYPES:
        on_device = build(kwargs, device=DEVICE, dtype=dtype)
        assert all(p.dtype == dtype and p.device.type == torch.device(DEVICE).type for p in on_device.parameters())
        assert isinstance(on_device.weight, BinaryTensor) != latent
    meta = build(kwargs, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device=DEVICE)
    torch.manual_seed(3)
    meta.reset_parameters()
    direct = build(kwargs, seed=3, device=DEVICE)
    x = make_input(variant.input_shapes[0])
    assert torch.equal(meta(x), direct(x))


@cases
def test_repr_pickle_and_state_dict(variant, index, latent):
    """repr names every argument set; torch.save / deepcopy copies give the same output; the state
    dict has nn.Conv1d's keys, loads into a layer of another seed, and across weight modes; an
    nn.Conv1d's state dict loads by packing its signs."""
    kwargs = kwargs_of(variant, index, latent)
    m = build(kwargs, seed=4)
    text = repr(m)
    assert text.startswith("BinaryConv1d(")
    for name, value in kwargs.items():
        if name.endswith("quantizer"):
            assert f"{name}={get_quantizer(value)!r}" in text
        elif name in ("kernel_size", "stride", "dilation") or (name == "padding" and not isinstance(value, str)):
            assert f"{name}={(value,) if isinstance(value, int) else tuple(value)}" in text, name
        elif name not in ("in_channels", "out_channels"):
            assert f"{name}={value!r}" in text or f"{name}={value}" in text, name
    x = make_input(variant.input_shapes[0], device="cpu")
    y = m(x)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(m)):
        assert torch.equal(other(x), y)
    state = m.state_dict()
    assert list(state) == list(nn.Conv1d(**torch_kwargs(kwargs)).state_dict())
    other = build(kwargs, seed=5)
    other.load_state_dict(state)
    assert torch.equal(other(x), y)
    switched = dict(kwargs)
    switched.pop("weight_quantizer") if latent else switched.update(weight_quantizer="ste_sign")
    other_mode = BinaryConv1d(**switched)
    other_mode.load_state_dict(state)
    signs = lambda layer: torch.where(dense_weight(layer, torch.float32).detach() < 0, -1.0, 1.0)
    assert torch.equal(signs(other_mode), signs(m))
    torch.manual_seed(6)
    dense = nn.Conv1d(**torch_kwargs(kwargs))
    m.load_state_dict(dense.state_dict())
    assert torch.equal(signs(m), torch.where(dense.weight.detach() < 0, -1.0, 1.0))


@cases
def test_dtype_moves_and_strided_inputs(variant, index, latent):
    """to(dtype) converts every parameter (a packed weight keeps its bits) and the output follows;
    a strided input and output gradient give the contiguous call's output and gradients."""
    m = build(kwargs_of(variant, index, latent), device=DEVICE)
    shape = variant.input_shapes[0]
    x = make_input(shape, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, [x, *m.parameters()], g)
    strided = lambda t: torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2].requires_grad_(t.requires_grad)
    for xi, gi in ((strided(x), g), (x, strided(g))):
        yi = m(xi)
        torch.testing.assert_close(yi, y, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(yi, [xi, *m.parameters()], gi), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    words = None if latent else m.weight.words.clone()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        m.to(dtype)
        assert all(p.dtype == dtype for p in m.parameters())
        assert m(make_input(shape, dtype)).dtype == dtype
        assert words is None or torch.equal(m.weight.words, words)


@pytest.mark.parametrize("latent", [False, True], ids=["packed", "latent"])
def test_errors(latent):
    """Each mistake raises its documented error; a forward mistake nn.Conv1d reports with a
    RuntimeError is one here too, a construction mistake it reports with a ValueError too."""
    for e in ERRORS:
        kwargs = {**e.kwargs, **({"weight_quantizer": "ste_sign"} if latent else {})}
        if e.input_shape is None:
            with pytest.raises(e.error, match=e.match):
                BinaryConv1d(**kwargs)
            if e.torch_too:
                assert isinstance(raised_by(nn.Conv1d, **torch_kwargs(kwargs)), ValueError), e
            continue
        m = build(kwargs)
        x = torch.randn(e.input_shape, device=e.device or "cpu").to(e.input_dtype)
        with pytest.raises(e.error, match=e.match) as raised:
            m(x)
        assert isinstance(raised.value, RuntimeError), e
        if e.torch_too:
            assert isinstance(raised_by(nn.Conv1d(**torch_kwargs(kwargs)), x), RuntimeError), e


def test_function_refuses_a_weight_that_is_not_3d():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ShapeError, match="3-D"):
        bnnops.binary_conv1d(x, BinaryTensor.from_float(torch.randn(3, 4, 1, 3)))
    with pytest.raises(DtypeError, match="BinaryTensor or a float latent weight"):
        bnnops.binary_conv1d(x, torch.ones(3, 4, 3, dtype=torch.int32))


def test_bop_trains_the_packed_weight():
    """A Bop step reads the (O, C, k) gradient and flips exactly the bits whose momentum passed the
    threshold with the gradient's sign, the words shared with the 2-D op."""
    torch.manual_seed(0)
    m = BinaryConv1d(6, 4, 3, padding=1, device=DEVICE)
    opt = Bop([m.weight], lr=1.0, threshold=0.0)
    before = m.weight.dequantize(torch.float32).clone()
    m(make_input((5, 6, 12))).square().sum().backward()
    grad = m.weight.grad.clone()
    opt.step()
    after = m.weight.dequantize(torch.float32)
    # gamma 1: m = grad; flip where |m| > 0 and sign(m) == sign(w).
    flips = (grad != 0) & ((grad > 0) == (before > 0))
    assert flips.any() and torch.equal(after, torch.where(flips, -before, before))


def test_summary_counts_binary_conv1d():
    """bnnops.summary: the layer's binary weights, packed bytes (C padded to 32 bits per word) and
    binary MACs (weight.numel() * output positions)."""
    model = nn.Sequential(BinaryConv1d(40, 8, 3, padding=1, bias=False))
    model.input_shape = (40, 12)
    row = bnnops.summary(model, print_table=False).layers[0]
    assert (row.binary_params, row.real_params) == (8 * 40 * 3, 0)
    assert row.memory_bytes == 4 * 8 * 3 * 2
    assert (row.binary_macs, row.real_macs) == (8 * 40 * 3 * 12, 0)


def test_cpu_dense_weight_is_unpacked_once_over_repeated_calls(monkeypatch):
    """Every call passes the same 4-D words view to the 2-D op, so the CPU dense-weight cache
    (keyed by the words object) unpacks the weight once, as for BinaryConv2d; a flip (Bop) or new
    words (``words.data = ...``) unpack again, and the output follows them."""
    from bnnops import weight_cache

    unpacks = []
    real = weight_cache.unpack_signs_reference
    monkeypatch.setattr(weight_cache, "unpack_signs_reference", lambda *a: unpacks.append(a) or real(*a))
    weight_cache.clear_dense_signs()
    torch.manual_seed(0)
    m = BinaryConv1d(37, 5, 3, padding=1)
    x = make_input((2, 37, 11), torch.float32)
    first = m(x)
    for _ in range(9):
        assert torch.equal(m(x), first)
    assert len(unpacks) == 1
    negated = BinaryTensor.from_float(-m.weight.dequantize(torch.float32))
    m.weight.words.data = negated.words  # other storage, same words object
    # sums of +-1 products plus the bias: only the bias's rounding differs (stale weights: >= 2)
    flipped = F.conv1d(torch.where(x >= 0, 1.0, -1.0), m.weight.dequantize(torch.float32), m.bias, padding=1)
    for _ in range(2):
        torch.testing.assert_close(m(x), flipped, rtol=0, atol=1e-4)
    assert len(unpacks) == 2
    with torch.no_grad():
        m.weight.words[1, 2, 0] ^= 0b101  # in place, as Bop flips: channels 0 and 2 of one tap
    reference = F.conv1d(torch.where(x >= 0, 1.0, -1.0), m.weight.dequantize(torch.float32), m.bias, padding=1)
    torch.testing.assert_close(m(x), reference, rtol=0, atol=1e-4)
    assert len(unpacks) == 3
    # The kept 4-D words do not hold the layer's words alive.
    words = weakref.ref(m.weight.words)
    assert words() in bnnops.conv1d._WORDS_4D
    del m, first
    gc.collect()
    assert words() is None


@pytest.mark.parametrize(
    ("kwargs", "x_shape", "w_shape", "match"),
    [
        ({"groups": 3}, (1, 4, 8), (6, 2, 3), r"has 4 channels but the weight \(6, 2, 3\) with groups=3 expects 6$"),
        ({"stride": 2, "padding": "same"}, (1, 4, 8), (6, 4, 3), r"got stride=2$"),
        ({"padding": "full"}, (1, 4, 8), (6, 4, 3), r"an int, a 1-tuple, 'valid' or 'same', got 'full'$"),
        ({"stride": 0}, (1, 4, 8), (6, 4, 3), r"got kernel_size=3, stride=0, padding=0, dilation=1$"),
        ({"padding": (-1,)}, (1, 4, 8), (6, 4, 3), r"stride=1, padding=-1, dilation=1$"),
        ({"dilation": (2, 3)}, (1, 4, 8), (6, 4, 3), r"dilation must be an int or a 1-tuple of an int, got \(2, 3\)$"),
        ({"dilation": 3, "padding": 1}, (4, 3), (6, 4, 3), r"kernel 3 \(dilation 3\) .* padded input of length 5$"),
        ({"padding": "valid"}, (2, 4, 2), (6, 4, 3), r"kernel 3 \(dilation 1\) .* padded input of length 2$"),
    ],
)
@pytest.mark.parametrize("latent", [False, True], ids=["packed", "latent"])
def test_function_errors_name_the_1d_geometry(kwargs, x_shape, w_shape, match, latent):
    """binary_conv1d checks its 1-D arguments itself: messages name (O, C/groups, k), the stride,
    padding, dilation and length as given, never the (N, C, 1, L) view of the 2-D op."""
    w = torch.randn(w_shape)
    weight = w if latent else BinaryTensor.from_float(w)
    quantizer = {"weight_quantizer": "ste_sign"} if latent else {}
    with pytest.raises(ShapeError, match=match) as raised:
        bnnops.binary_conv1d(torch.randn(x_shape), weight, **kwargs, **quantizer)
    message = str(raised.value)
    assert ", 1, " not in message and not re.search(r"\dx\d|\(1, ", message), message
