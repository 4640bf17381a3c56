"""torch's generic module checks for the bnnops layers, in the style of PyTorch's own test_modules.py.

PyTorch tests every ``nn`` module through one list of ``ModuleInfo`` entries (a class, constructor
variants, input makers, a reference: torch/testing/_internal/common_modules.py) and one set of
checks written once (test/test_modules.py). Here ``LAYERS`` lists a :class:`LayerInfo` per bnnops
layer and weight mode (a packed BinaryTensor weight, or a float latent weight with a weight
quantizer), each with constructor variants, forward input shapes and the construction / forward
mistakes it must refuse; every test below runs on all of them:

forward against a dense float64 reference (F.linear / F.conv2d on sign(x) or x and the dense +-1
weight), factory kwargs and the meta device context, init and ``reset_parameters`` against
``nn.Linear`` / ``nn.Conv2d``, meta init then ``to_empty`` then ``reset_parameters`` (FSDP's
path), repr, pickling, state_dict round trips, ``to()`` (dtypes, devices), memory formats (a
channels_last input gives a channels_last output and gradients), non-contiguous inputs, errors
(RuntimeErrors where nn.Linear / nn.Conv2d raise one), gradients against the dense reference,
train/eval, and CPU/GPU parity where a GPU exists.

:func:`test_every_constructor_argument_is_exercised` fails when a layer gains a constructor
argument that no variant (or error input) sets: a new argument is checked by every test here as
soon as it is added to a variant.
"""

import copy
import inspect
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, FLOAT_DTYPES, random_signs_input
from torch import nn

import bnnops
from bnnops import BinaryTensor
from bnnops.conv import conv_padding
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError
from bnnops.quantizers import get_quantizer

# One rounding to the output dtype: at most one ulp of the result (half an ulp, to nearest).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True, scope="module")
def fp32_convolutions():
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa products), which the conv
    backward uses: the gradients compared here must be true fp32, as the forward kernels are."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@dataclass(frozen=True)
class Variant:
    """One constructor call and the input shapes its forward runs on."""

    kwargs: dict
    input_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ErrorInput:
    """A mistake the layer must refuse with ``error`` (its message matching ``match``): at
    construction (``input_shape`` None) or in forward on an input of ``input_shape`` and
    ``input_dtype`` on ``device`` (default: the CPU, where the test builds the layer).
    ``torch_too``: nn.Linear / nn.Conv2d refuse the same mistake, with a RuntimeError in forward
    or a ValueError at construction, which bnnops's error must then also be."""

    kwargs: dict
    error: type[Exception]
    match: str
    input_shape: tuple[int, ...] | None = None
    input_dtype: torch.dtype = torch.float32
    device: str | None = None
    torch_too: bool = True


@dataclass(frozen=True)
class LayerInfo:
    """A layer and weight mode (``latent``: a float latent weight with a weight quantizer, else a
    packed BinaryTensor), its torch counterpart, its constructor variants and its mistakes."""

    name: str
    cls: type[nn.Module]
    torch_cls: type[nn.Module]
    latent: bool
    variants: list[Variant]
    errors: list[ErrorInput] = field(default_factory=list)

    @property
    def is_conv(self) -> bool:
        return self.cls is BinaryConv2d


_LINEAR = dict(in_features=8, out_features=3)
_LINEAR_ERRORS = [
    ErrorInput(_LINEAR, ShapeError, "last dimension is 9", (2, 9)),
    ErrorInput(_LINEAR, ShapeError, "at least one dimension", ()),
    ErrorInput(_LINEAR, DtypeError, "float32, bfloat16 or float16", (2, 8), torch.float64),
    ErrorInput(_LINEAR, DtypeError, "float32, bfloat16 or float16", (2, 8), torch.int64),
    ErrorInput(_LINEAR, DtypeError, "same dtype", (2, 8), torch.bfloat16),
    ErrorInput(_LINEAR, DeviceError, "is on meta", (2, 8), device="meta"),
    ErrorInput({**_LINEAR, "input_quantizer": "relu"}, ValueError, "unknown quantizer", torch_too=False),
]
_CONV = dict(in_channels=4, out_channels=6, kernel_size=3)
_CONV_ERRORS = [
    ErrorInput(_CONV, ShapeError, "has 5 channels", (1, 5, 6, 6)),
    ErrorInput(_CONV, ShapeError, r"\(C, H, W\)", (1, 1, 4, 6, 6)),
    ErrorInput(_CONV, ShapeError, r"\(C, H, W\)", (4, 6)),
    ErrorInput(_CONV, ShapeError, "larger than the padded", (1, 4, 2, 6)),
    ErrorInput(_CONV, DtypeError, "float32, bfloat16", (1, 4, 6, 6), torch.float64),
    ErrorInput(_CONV, DtypeError, "float32, bfloat16", (1, 4, 6, 6), torch.int64),
    ErrorInput(_CONV, DtypeError, "same dtype", (1, 4, 6, 6), torch.float16),
    # nn.Conv2d runs a meta input against CPU parameters (a meta result): no torch counterpart.
    ErrorInput(_CONV, DeviceError, "meta", (1, 4, 6, 6), device="meta", torch_too=False),
    ErrorInput({**_CONV, "groups": 4}, ShapeError, "groups=4 must divide"),
    ErrorInput({**_CONV, "padding": "full"}, ShapeError, "'valid' or 'same'"),
    ErrorInput({**_CONV, "stride": 2, "padding": "same"}, ShapeError, "stride 1"),
    # Only zero padding, holding pad_value: no torch counterpart for either.
    ErrorInput({**_CONV, "padding_mode": "reflect"}, ValueError, "padding_mode='zeros' only", torch_too=False),
    ErrorInput({**_CONV, "pad_value": 0.5}, ValueError, "pad_value", torch_too=False),
    ErrorInput({**_CONV, "input_quantizer": "magnitude_aware_sign"}, ValueError, "weight quantizer", torch_too=False),
]


def _linear_variants(latent: bool) -> list[Variant]:
    wq = (lambda name: dict(weight_quantizer=name)) if latent else (lambda name: {})
    return [
        Variant(dict(in_features=40, out_features=7, **wq("ste_sign")), ((3, 40), (40,), (2, 3, 40))),
        Variant(
            dict(in_features=33, out_features=5, bias=False, input_quantizer=None, **wq("magnitude_aware_sign")),
            ((4, 33),),
        ),
        Variant(dict(in_features=70, out_features=9, input_quantizer="approx_sign", **wq("approx_sign")), ((2, 70),)),
    ]


def _conv_variants(latent: bool) -> list[Variant]:
    wq = (lambda name: dict(weight_quantizer=name)) if latent else (lambda name: {})
    asymmetric = dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False)
    return [
        Variant(
            dict(in_channels=6, out_channels=5, kernel_size=3, padding=1, **wq("ste_sign")), ((2, 6, 7, 6), (6, 5, 5))
        ),
        Variant(
            dict(in_channels=8, out_channels=6, **asymmetric, pad_value=-1.0, **wq("magnitude_aware_sign")),
            ((2, 8, 7, 9),),
        ),
        # An even kernel: "same" pads one more at the bottom and right.
        Variant(
            dict(
                in_channels=4,
                out_channels=4,
                kernel_size=4,
                padding="same",
                pad_value=1.0,
                input_quantizer=None,
                **wq("ste_sign"),
            ),
            ((1, 4, 6, 5),),
        ),
        Variant(
            dict(
                in_channels=5,
                out_channels=3,
                kernel_size=1,
                stride=2,
                input_quantizer="swish_sign",
                **wq("approx_sign"),
            ),
            ((2, 5, 5, 4),),
        ),
    ]


LAYERS = [
    LayerInfo("BinaryLinear-packed", BinaryLinear, nn.Linear, False, _linear_variants(False), _LINEAR_ERRORS),
    LayerInfo("BinaryLinear-latent", BinaryLinear, nn.Linear, True, _linear_variants(True), _LINEAR_ERRORS),
    LayerInfo("BinaryConv2d-packed", BinaryConv2d, nn.Conv2d, False, _conv_variants(False), _CONV_ERRORS),
    LayerInfo("BinaryConv2d-latent", BinaryConv2d, nn.Conv2d, True, _conv_variants(True), _CONV_ERRORS),
]
layers = pytest.mark.parametrize("info", LAYERS, ids=lambda info: info.name)
# channels_last is a 4-D layout: the image layers only.
conv_layers = pytest.mark.parametrize("info", [i for i in LAYERS if i.is_conv], ids=lambda info: info.name)


def cases(info: LayerInfo):
    """(variant, input shape) of every forward the layer info lists."""
    return [(v, shape) for v in info.variants for shape in v.input_shapes]


def make_input(shape, dtype=torch.float32, device=DEVICE, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = random_signs_input(shape, dtype, "cpu", generator=g, finite=True).to(device)
    return x.requires_grad_(requires_grad)


def build(info: LayerInfo, variant: Variant, seed: int = 0, **factory) -> nn.Module:
    torch.manual_seed(seed)
    return info.cls(**variant.kwargs, **factory)


def torch_kwargs(info: LayerInfo, kwargs: dict) -> dict:
    """The arguments nn.Linear / nn.Conv2d also take."""
    accepted = inspect.signature(info.torch_cls).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def dense_weight(m: nn.Module, dtype=torch.float64) -> torch.Tensor:
    """A leaf holding what receives the weight gradient: the dense +-1 weight, or the latent weight."""
    w = m.weight.dequantize(torch.float32) if isinstance(m.weight, BinaryTensor) else m.weight.detach()
    w = w.to(dtype)
    return w.clone().requires_grad_()


def dense_forward(m: nn.Module, x: torch.Tensor, w_leaf: torch.Tensor, bias: torch.Tensor | None, magnitude=False):
    """What the layer computes, from differentiable torch ops in x's dtype (float64 here).

    With ``magnitude`` the same sum over absolute values: the scale of the rounding errors."""
    iq, wq = m.input_quantizer, m.weight_quantizer
    a = iq(x) if iq is not None else x
    w = wq(w_leaf) if wq is not None else w_leaf
    if magnitude:
        a, w, bias = a.abs(), w.abs(), None if bias is None else bias.abs()
    if not isinstance(m, BinaryConv2d):
        return F.linear(a, w, bias)
    unbatched = a.dim() == 3
    a = a[None] if unbatched else a
    pt, pb, pl, pr = conv_padding(m.padding, m.kernel_size, m.stride, m.dilation)
    pad_value = abs(m.pad_value) if magnitude else m.pad_value
    a = F.pad(a, (pl, pr, pt, pb), value=pad_value)
    y = F.conv2d(a, w, bias, m.stride, 0, m.dilation, m.groups)
    return y[0] if unbatched else y


def reduction_length(m: nn.Module) -> int:
    return math.prod(m.weight.shape[1:])


def assert_matches_dense(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """y = m(x) within the rounding the op allows of the float64 reference (see the bound below)."""
    x64 = x.detach().double()
    w = dense_weight(m).detach()
    b = None if m.bias is None else m.bias.detach().double()
    with torch.no_grad():
        expected = dense_forward(m, x64, w, b)
        magnitude = dense_forward(m, x64, w, b, magnitude=True)
    # W1A1: exact sums, then scale and bias in fp32 (2^-24 each). W1A16: fp32 sums of exact
    # (16-bit x) or 3xTF32 (fp32 x on a GPU) products, (K + 2) * 2^-20 of the magnitude. Then one
    # rounding to y's dtype.
    per_term = 2.0**-22 if m.input_quantizer is not None else (reduction_length(m) + 2) * 2.0**-20
    bound = per_term * magnitude + ULP[y.dtype] * expected.abs()
    error = (y.detach().double().cpu() - expected.cpu()).abs()
    assert y.shape == expected.shape and bool((error <= bound.cpu()).all()), (error - bound.cpu()).max()


def raised_by(call: Callable[..., object], *args: object, **kwargs: object) -> Exception | None:
    """What ``call(*args, **kwargs)`` raises (None if nothing)."""
    try:
        call(*args, **kwargs)
    except Exception as e:
        return e
    return None


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BinaryLinear, BinaryConv2d])
def test_every_constructor_argument_is_exercised(cls):
    """Each constructor argument (but the factory kwargs, which test_factory_kwargs covers) is set
    to a value other than its default by some variant or error input of every info of its class,
    so every check here sees it (weight_quantizer: the latent infos)."""
    infos = [i for i in LAYERS if i.cls is cls]
    used = [v.kwargs for i in infos for v in i.variants] + [e.kwargs for i in infos for e in i.errors]
    for name, p in inspect.signature(cls).parameters.items():
        if name in ("device", "dtype"):
            continue
        required = p.default is inspect.Parameter.empty
        assert any(name in k and (required or k[name] != p.default) for k in used), name


@layers
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_dense_reference(info, dtype):
    """Forward in every float dtype: the dense reference's values within the op's rounding, x's
    dtype, and nn.Linear / nn.Conv2d's output shape (unbatched inputs included)."""
    for variant, shape in cases(info):
        m = build(info, variant, device=DEVICE, dtype=dtype)
        x = make_input(shape, dtype)
        y = m(x)
        assert y.dtype == dtype
        counterpart = info.torch_cls(**torch_kwargs(info, variant.kwargs), device="meta")
        assert y.shape == counterpart(x.to("meta", torch.float32)).shape
        assert_matches_dense(m, x, y)


@layers
def test_factory_kwargs(info):
    """device and dtype reach every parameter (a BinaryTensor's words on the device, its logical
    dtype the dtype); under ``with torch.device("meta")`` every parameter is on meta, with the
    metadata of one built on the CPU (torch's test_device_ctx_init)."""
    for variant in info.variants:
        for dtype in FLOAT_DTYPES:
            m = build(info, variant, device=DEVICE, dtype=dtype)
            for name, p in m.named_parameters():
                assert p.device.type == torch.device(DEVICE).type and p.dtype == dtype, name
                assert isinstance(p, nn.Parameter) and p.requires_grad, name
            assert isinstance(m.weight, BinaryTensor) != info.latent
            if not info.latent:
                assert m.weight.words.device == m.weight.device and m.weight.words.dtype == torch.int32
        on_cpu = build(info, variant)
        with torch.device("meta"):
            on_meta = build(info, variant)
        for (name, p_meta), p_cpu in zip(on_meta.named_parameters(), on_cpu.parameters()):
            assert p_meta.is_meta and type(p_meta) is type(p_cpu), name
            assert (p_meta.shape, p_meta.dtype, p_meta.requires_grad) == (p_cpu.shape, p_cpu.dtype, p_cpu.requires_grad)


@layers
def test_init_and_reset_parameters_draw_as_torch(info):
    """The init and ``reset_parameters`` draw what nn.Linear / nn.Conv2d's do from the same seed:
    the same bias, the latent weight itself or the binary weight's signs; reset_parameters
    initializes in place (the same parameter objects) and redraws."""
    for variant in info.variants:
        m = build(info, variant, seed=1)
        torch.manual_seed(1)
        ref = info.torch_cls(**torch_kwargs(info, variant.kwargs))
        params = [id(p) for p in m.parameters()]
        for seed in (None, 2):
            if seed is not None:
                torch.manual_seed(seed)
                m.reset_parameters()
                torch.manual_seed(seed)
                ref.reset_parameters()
            assert [id(p) for p in m.parameters()] == params
            expected = ref.weight.detach() if info.latent else torch.where(ref.weight.detach() < 0, -1.0, 1.0)
            assert torch.equal(dense_weight(m, torch.float32).detach(), expected)
            assert (m.bias is None) == (ref.bias is None)
            if m.bias is not None:
                assert torch.equal(m.bias.detach(), ref.bias.detach())


@layers
def test_meta_init_then_to_empty_and_reset_parameters(info):
    """FSDP's deferred init: built on the meta device, ``to_empty`` onto the device, then
    ``reset_parameters`` gives the layer built there directly from the same seed, bit for bit."""
    for variant, shape in cases(info)[:1] + cases(info)[-1:]:
        for how in ("device kwarg", "device context"):
            if how == "device kwarg":
                m = build(info, variant, device="meta")
            else:
                with torch.device("meta"):
                    m = build(info, variant)
            assert all(p.is_meta for p in m.parameters())
            m.to_empty(device=DEVICE)
            assert all(p.device.type == torch.device(DEVICE).type for p in m.parameters())
            torch.manual_seed(3)
            m.reset_parameters()
            direct = build(info, variant, seed=3, device=DEVICE)
            for (name, p), q in zip(m.named_parameters(), direct.parameters()):
                assert type(p) is type(q), name
                if isinstance(p, BinaryTensor):
                    assert torch.equal(p.words, q.words), name
                else:
                    assert torch.equal(p.detach(), q.detach()), name
            x = make_input(shape)
            assert torch.equal(m(x), direct(x))


@layers
def test_repr(info):
    """repr and str name the class and every constructor argument the variant sets."""
    for variant in info.variants:
        m = build(info, variant)
        text = repr(m)
        assert text == str(m) and text.startswith(info.cls.__name__ + "(")
        for name, value in variant.kwargs.items():
            if name in ("in_features", "out_features", "in_channels", "out_channels"):
                assert str(value) in text, name
            elif name == "bias":
                assert f"bias={value}" in text
            elif name.endswith("quantizer"):
                assert f"{name}={get_quantizer(value)!r}" in text
            elif name in ("kernel_size", "stride", "dilation"):
                pair = (value, value) if isinstance(value, int) else tuple(value)
                assert f"{name}={pair}" in text
            else:
                assert f"{name}={value!r}" in text or f"{name}={value}" in text, name


@layers
def test_pickle_and_deepcopy(info):
    """``torch.save`` of the whole module then ``torch.load``, and ``copy.deepcopy``, give a layer
    with the same output; the copies own their parameters."""
    for variant, shape in cases(info):
        m = build(info, variant, device=DEVICE)
        x = make_input(shape)
        y = m(x)
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        clone = copy.deepcopy(m)
        for other in (loaded, clone):
            assert type(other) is type(m) and torch.equal(other(x), y)
            assert all(p is not q for p, q in zip(other.parameters(), m.parameters()))


@layers
def test_state_dict_round_trip(info):
    """state_dict has nn.Linear / nn.Conv2d's keys; it loads into a layer built from another seed
    (from memory and through torch.save / torch.load(weights_only=True)), and across weight modes
    (a latent checkpoint gives a binary weight its signs; a binary one gives a latent weight +-1)."""
    for variant, shape in cases(info):
        m = build(info, variant, seed=4)
        state = m.state_dict()
        assert list(state) == list(info.torch_cls(**torch_kwargs(info, variant.kwargs)).state_dict())
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        x = make_input(shape, device="cpu")
        for loaded_state in (state, torch.load(buffer, weights_only=True)):
            other = build(info, variant, seed=5)
            other.load_state_dict(loaded_state)
            assert torch.equal(other(x), m(x))
        kwargs = dict(variant.kwargs)
        if info.latent:
            kwargs.pop("weight_quantizer")
        else:
            kwargs["weight_quantizer"] = "ste_sign"
        other_mode = info.cls(**kwargs)
        other_mode.load_state_dict(state)
        signs = lambda layer: torch.where(dense_weight(layer, torch.float32).detach() < 0, -1.0, 1.0)
        assert torch.equal(signs(other_mode), signs(m))


@layers
def test_to_dtype_and_device(info):
    """``to(dtype)``, ``.half()``, ``.bfloat16()``, ``.float()`` convert every parameter (a binary
    weight keeps its bits) and the output follows; ``.double()`` (float64 is not computed) is
    refused with a TypeError naming the float dtypes, at the conversion (binary weight) or at
    forward (latent weight)."""
    variant, shape = cases(info)[0]
    m = build(info, variant, device=DEVICE)
    words = None if info.latent else m.weight.words.clone()
    for convert, dtype in (
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.float(), torch.float32),
        (lambda m: m.to(DEVICE, torch.float16), torch.float16),
    ):
        convert(m)
        assert all(p.dtype == dtype for p in m.parameters())
        assert m(make_input(shape, dtype)).dtype == dtype
        if words is not None:
            assert torch.equal(m.weight.words, words)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        m.double()(make_input(shape, torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: moving between CPU and CUDA")
@layers
def test_multiple_device_transfer(info):
    variant, shape = cases(info)[0]
    m = build(info, variant, device="cuda")
    x = make_input(shape, device="cuda")
    y = m(x)
    m.cpu()
    assert all(p.device.type == "cpu" for p in m.parameters())
    m(x.cpu())
    m.cuda()
    assert torch.equal(m(x), y)


@conv_layers
def test_memory_format(info):
    """torch's test_memory_format: for each input format and module format the output and the
    gradients (autograd.grad over the input and parameters) equal the contiguous ones, and a
    channels_last input gives a channels_last output, input gradient and weight gradient. The
    module's own format does not set the output's (the packed weight has none; see the README)."""
    for variant, shape in cases(info):
        if len(shape) != 4:
            continue
        m = build(info, variant, device=DEVICE)
        x = make_input(shape, requires_grad=True)
        y_ref = m(x)
        grad_out = torch.rand_like(y_ref)
        params = list(m.parameters())
        grads_ref = torch.autograd.grad(y_ref, [x, *params], grad_out)
        for input_format in (torch.contiguous_format, torch.channels_last):
            xf = x.detach().contiguous(memory_format=input_format).requires_grad_()
            for module_format in (torch.preserve_format, torch.contiguous_format, torch.channels_last):
                m.to(memory_format=module_format)
                params = list(m.parameters())
                y = m(xf)
                assert torch.equal(y, y_ref), (input_format, module_format)
                assert y.is_contiguous(memory_format=input_format), (input_format, module_format)
                grads = torch.autograd.grad(y, [xf, *params], torch.empty_like(y).copy_(grad_out))
                for got, want in zip(grads, grads_ref):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                    if got.dim() == 4:
                        assert got.is_contiguous(memory_format=input_format), (input_format, module_format, got.shape)


@layers
def test_non_contiguous_inputs(info):
    """torch's test_non_contiguous_tensors: an input and an output gradient that are strided
    views give the contiguous call's output and gradients."""

    def non_contiguous(t):
        out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
        return out.requires_grad_(t.requires_grad)

    for variant, shape in cases(info):
        if not shape:
            continue
        m = build(info, variant, device=DEVICE)
        x = make_input(shape, requires_grad=True)
        y = m(x)
        g = torch.randn_like(y)
        expected = torch.autograd.grad(y, [x, *m.parameters()], g)
        for xi, gi in ((x, non_contiguous(g)), (non_contiguous(x), g), (non_contiguous(x), non_contiguous(g))):
            assert not (xi.is_contiguous() and gi.is_contiguous())
            yi = m(xi)
            torch.testing.assert_close(yi, y, rtol=1e-5, atol=1e-5)
            for got, want in zip(torch.autograd.grad(yi, [xi, *m.parameters()], gi), expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@layers
def test_errors(info):
    """Each mistake raises its documented bnnops error with its message. A forward mistake that
    nn.Linear / nn.Conv2d report with a RuntimeError is a RuntimeError here too (ShapeError,
    DtypeError and DeviceError derive from it); a construction mistake that they report with a
    ValueError is one here too."""
    for e in info.errors:
        kwargs = dict(e.kwargs)
        if info.latent:
            kwargs["weight_quantizer"] = "ste_sign"
        if e.input_shape is None:
            with pytest.raises(e.error, match=e.match):
                info.cls(**kwargs)
            torch_error = raised_by(info.torch_cls, **torch_kwargs(info, kwargs))
            if e.torch_too:
                assert isinstance(torch_error, ValueError), (kwargs, torch_error)
            continue
        torch.manual_seed(0)
        m = info.cls(**kwargs)
        x = torch.randn(e.input_shape, device=e.device or "cpu").to(e.input_dtype)
        with pytest.raises(e.error, match=e.match) as raised:
            m(x)
        assert isinstance(raised.value, RuntimeError), (e, raised.value)
        if e.torch_too:
            torch_error = raised_by(info.torch_cls(**torch_kwargs(info, kwargs)), x)
            assert isinstance(torch_error, RuntimeError), (e, torch_error)


@layers
def test_gradients_match_dense_reference(info):
    """Gradients of x, the weight (a dense float tensor of its logical shape, what Bop or a torch
    optimizer consumes) and bias against autograd through the float64 dense reference."""
    for variant, shape in cases(info):
        m = build(info, variant, device=DEVICE)
        x = make_input(shape, requires_grad=True)
        y = m(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert type(m.weight.grad) is torch.Tensor and m.weight.grad.shape == m.weight.shape
        assert m.weight.grad.dtype == m.weight.dtype
        x64 = x.detach().double().requires_grad_()
        w64 = dense_weight(m)
        b64 = None if m.bias is None else m.bias.detach().double().requires_grad_()
        dense_forward(m, x64, w64, b64).backward(g.double())
        pairs = [(x.grad, x64.grad), (m.weight.grad, w64.grad)]
        pairs += [] if m.bias is None else [(m.bias.grad, b64.grad)]
        for got, want in pairs:
            scale = 1 + want.abs().max().item()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)


@layers
def test_train_and_eval_do_not_differ(info):
    """The layers hold no mode-dependent state: train() and eval() give the same output, and the
    forward never reads ``training`` (torch's test_if_train_and_eval_modes_differ)."""
    variant, shape = cases(info)[0]
    m = build(info, variant, device=DEVICE)
    x = make_input(shape)
    y = m.train()(x)
    assert torch.equal(m.eval()(x), y)
    del m.training
    assert torch.equal(m(x), y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: compares the CPU references with the kernels")
@layers
def test_cpu_gpu_parity(info):
    """The same layer on the CPU (pure-PyTorch references) and the GPU (the Triton kernels):
    outputs within the W1A16 bound (W1A1 bit for bit) and gradients close."""
    for variant, shape in cases(info):
        cpu = build(info, variant)
        gpu = copy.deepcopy(cpu).cuda()
        x = make_input(shape, device="cpu", requires_grad=True)
        xg = x.detach().cuda().requires_grad_()
        y, yg = cpu(x), gpu(xg)
        if cpu.input_quantizer is not None:
            assert torch.equal(yg.cpu(), y)
        else:
            assert_matches_dense(cpu, x, yg.cpu())
        g = torch.randn_like(y)
        y.backward(g)
        yg.backward(g.cuda())
        for a, b in zip([x, *cpu.parameters()], [xg, *gpu.parameters()]):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-4)


def test_error_types_are_exported_and_both():
    """The three error types are torch's RuntimeError and the Python type that names the mistake."""
    assert issubclass(ShapeError, ValueError) and issubclass(ShapeError, RuntimeError)
    assert issubclass(DtypeError, TypeError) and issubclass(DtypeError, RuntimeError)
    assert issubclass(DeviceError, ValueError) and issubclass(DeviceError, RuntimeError)
    for name in ("ShapeError", "DtypeError", "DeviceError"):
        assert name in bnnops.ops.checks.__all__
