import warnings

import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    check_inference_runs_the_op_alone,
    check_learnable_scale_output_without_grad,
    random_signs_input,
)
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bnnops
from bnnops import BinaryTensor, linear
from bnnops.nn import BinaryLinear
from bnnops.ops import reference
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.packing import pack_signs
from bnnops.quantizers import get_quantizer


def signs(t):
    return torch.where(t < 0, -1.0, 1.0).to(t.dtype)


def dense_reference(x, weight, bias, input_quantizer, weight_quantizer, scale):
    """The same layer through plain autograd on a dense +-1 (or quantized latent) weight.

    Returns (y, the tensor whose .grad is the weight gradient)."""
    if isinstance(weight, BinaryTensor):
        w_leaf = weight.dequantize().detach().requires_grad_(True)
        w = w_leaf
    else:
        w_leaf = weight
        w = get_quantizer(weight_quantizer or "ste_sign")(weight)
    q = get_quantizer(input_quantizer)
    xq = q(x) if q is not None else x
    y = xq.float() @ w.float().T
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), w_leaf


def make_weight(kind, N, K, dtype, device):
    w = torch.randn(N, K, device=device).to(dtype)
    if kind == "binary":
        return nn.Parameter(BinaryTensor.from_float(w))
    return nn.Parameter(w)


# (input quantizer, weight kind, weight quantizer, dtype, scale kind, bias, leading dims)
CASES = [
    ("ste_sign", "binary", None, torch.float32, None, True, (3, 5)),
    ("approx_sign", "binary", None, torch.float32, "fixed", False, (7,)),
    ("swish_sign", "binary", None, torch.bfloat16, "learned", True, (2, 3)),
    (None, "binary", None, torch.float32, "fixed", True, (4, 2)),
    (None, "binary", None, torch.float16, None, True, (1,)),
    ("ste_sign", "latent", "ste_sign", torch.float32, None, True, (6,)),
    ("ste_sign", "latent", "magnitude_aware_sign", torch.float32, None, False, (5,)),
    (None, "latent", "magnitude_aware_sign", torch.bfloat16, "learned", True, (2, 2)),
]


@pytest.mark.parametrize("iq,kind,wq,dtype,scale_kind,with_bias,lead", CASES)
def test_binary_linear_matches_dense_autograd(device, iq, kind, wq, dtype, scale_kind, with_bias, lead):
    N, K = 37, 70
    x = random_signs_input((*lead, K), dtype, device, finite=True).requires_grad_(True)
    weight = make_weight(kind, N, K, dtype, device)
    bias = nn.Parameter(torch.randn(N, device=device).to(dtype)) if with_bias else None
    scale = None if scale_kind is None else (torch.rand(N, device=device) + 0.5)
    if scale_kind == "learned":
        scale.requires_grad_(True)

    y = bnnops.binary_linear(x, weight, bias, input_quantizer=iq, scale=scale, weight_quantizer=wq)
    assert y.shape == (*lead, N) and y.dtype == dtype
    up = torch.randn_like(y)
    y.backward(up)
    grads = [t.grad.clone() for t in (x, weight, bias, scale) if t is not None and t.requires_grad]
    assert type(weight.grad) is torch.Tensor and weight.grad.shape == (N, K) and weight.grad.dtype == dtype
    for t in (x, weight, bias, scale):
        if t is not None:
            t.grad = None

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, w_leaf = dense_reference(x_ref, weight, bias, iq, wq, scale)
    y_ref.backward(up)
    ref_grads = [t.grad for t in (x_ref, w_leaf, bias, scale) if t is not None and t.requires_grad]

    # fp32: exact integer dots, or fp32 sums in another order, with real fp32 operands entering
    # the tensor cores as two TF32 terms (about 2^-20 of each |term|: see test_gemm). 16-bit: y
    # and the gradients are rounded to 8 (bf16) or 11 bits, and sums over the batch (bias,
    # scale) cancel, so the error is relative to the largest term, not to each result.
    fp32_atol = 2.0**-18 * max(x.abs().sum(-1).max().item(), up.abs().sum(-1).max().item())
    for got, want in zip([y] + grads, [y_ref] + ref_grads):
        want = want.to(got.dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=fp32_atol)
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_packed_activations(device):
    N, K = 20, 45
    x = random_signs_input((3, 4, K), torch.float32, device)
    weight = make_weight("binary", N, K, torch.float32, device)
    y_float = bnnops.binary_linear(x, weight)
    y_packed = bnnops.binary_linear(bnnops.pack_signs(x), weight)
    assert y_packed.dtype == torch.float32 and torch.equal(y_packed, y_float)
    y_packed.sum().backward()
    g_packed = weight.grad.clone()
    weight.grad = None
    y_float.sum().backward()
    assert torch.equal(g_packed, weight.grad)


def test_ops_match_independent_dense_math(device):
    # The ops (reference on CPU, kernels on CUDA) against plain torch on dense +-1 tensors, with
    # leading dims and non-contiguous inputs.
    N, K = 33, 100
    w = torch.randn(N, K, device=device)
    words = bnnops.pack_signs(w)
    dense = signs(w)
    x = torch.randn(K, 2, 3, device=device).permute(1, 2, 0)  # (2, 3, K), not contiguous
    scale = torch.rand(2 * N, device=device)[::2] + 0.5  # not contiguous either
    bias = torch.randn(N, device=device)
    y = torch.ops.bnnops.binary_linear_w1a1(x, words, K, scale, bias, torch.float32)
    assert torch.equal(y, (signs(x) @ dense.T) * scale + bias)
    y = torch.ops.bnnops.binary_linear_w1a1(bnnops.pack_signs(x), words, K, None, None, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, (signs(x) @ dense.T).bfloat16())
    # Real fp32 operands go through the tensor cores as two TF32 terms: 2^-18 of the sum of |terms|.
    y = torch.ops.bnnops.binary_linear_w1a16(x, words, None, bias)
    torch.testing.assert_close(y, x @ dense.T + bias, rtol=1e-5, atol=2.0**-18 * x.abs().sum(-1).max().item())
    g = torch.randn(N, 2, 3, device=device).permute(1, 2, 0)
    torch.testing.assert_close(
        torch.ops.bnnops.binary_linear_grad_input(g, words, K),
        g @ dense,
        rtol=1e-5,
        atol=2.0**-18 * g.abs().sum(-1).max().item(),
    )


def test_opcheck(device):
    N, K = 9, 40
    words = bnnops.pack_signs(torch.randn(N, K, device=device))
    x = torch.randn(2, 3, K, device=device)
    scale, bias = torch.rand(N, device=device), torch.randn(N, device=device)
    torch.library.opcheck(torch.ops.bnnops.binary_linear_w1a1.default, (x, words, K, scale, bias, torch.float32))
    torch.library.opcheck(
        torch.ops.bnnops.binary_linear_w1a1.default, (bnnops.pack_signs(x), words, K, None, None, torch.bfloat16)
    )
    torch.library.opcheck(torch.ops.bnnops.binary_linear_w1a16.default, (x.half(), words, None, bias.half()))
    grad = torch.randn(5, N, device=device)
    torch.library.opcheck(torch.ops.bnnops.binary_linear_grad_input.default, (grad, words, K))


@pytest.fixture
def counted_unpacks(monkeypatch):
    """Count every way to build a dense weight; on CPU, run the ops' CUDA implementations (the
    Triton kernels, interpreted) instead of the references, whose job is to build it."""
    calls = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(BinaryTensor, "dequantize", counting("dequantize", BinaryTensor.dequantize))
    reference_unpack = counting("unpack_signs_reference", bnnops.packing.unpack_signs_reference)
    for module in (bnnops.packing, reference):
        monkeypatch.setattr(module, "unpack_signs_reference", reference_unpack)
    monkeypatch.setattr(bnnops.packing, "unpack_weight", counting("unpack_weight", bnnops.packing.unpack_weight))
    if torch.cuda.is_available():
        yield calls
        return
    # Override the ops' CPU kernels for this test only; destroying the handle restores the references.
    cuda_kernels = torch.library.Library("bnnops", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning only once for all operators")
        for name in ("binary_linear_w1a1", "binary_linear_w1a16", "binary_linear_grad_input"):
            cuda_kernels.impl(name, CUDA_IMPLEMENTATIONS[name], "CPU")
    yield calls
    cuda_kernels._destroy()


class LogUnpackOps(TorchDispatchMode):
    """Records every dispatched op whose name says it unpacks (bnnops::unpack_signs and any other)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "unpack" in str(func):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("iq,wq", [("ste_sign", None), (None, None), ("approx_sign", "ste_sign")])
def test_dense_weight_never_built(device, counted_unpacks, iq, wq):
    layer = BinaryLinear(70, 33, input_quantizer=iq, weight_quantizer=wq).to(device)
    x = torch.randn(4, 70, device=device, requires_grad=True)
    with LogUnpackOps(counted_unpacks):
        layer(x).square().sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
        assert counted_unpacks == []
        # The counters work: reading the weight densely is seen (the method and the op).
        if wq is None:
            layer.weight.dequantize()
            assert {"dequantize", "bnnops.unpack_signs.default"} <= set(counted_unpacks)


def test_binary_linear_layer(device):
    torch.manual_seed(0)
    ref = nn.Linear(50, 20)
    torch.manual_seed(0)
    layer = BinaryLinear(50, 20).to(device)
    # Init: the signs of nn.Linear's init, and its bias.
    assert isinstance(layer.weight, BinaryTensor) and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight.dequantize().cpu(), signs(ref.weight.detach()))
    assert torch.equal(layer.bias.detach().cpu(), ref.bias.detach())
    assert "input_quantizer=SteSign" in repr(layer)
    latent = BinaryLinear(50, 20, bias=False, weight_quantizer="ste_sign", device=device)
    assert type(latent.weight) is nn.Parameter and latent.bias is None
    # The latent weight trains with a torch optimizer through the binary kernels.
    before = latent.weight.detach().clone()
    opt = torch.optim.Adam(latent.parameters(), lr=0.1)
    latent(torch.randn(8, 50, device=device)).sum().backward()
    opt.step()
    assert not torch.equal(before, latent.weight)
    # state_dict round trip of the packed layer.
    other = BinaryLinear(50, 20).to(device)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight.words, layer.weight.words)
    half = BinaryLinear(50, 20).to(device, torch.bfloat16)
    assert half(torch.randn(3, 50, device=device, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_f_linear_routes_to_packed_kernel(device, counted_unpacks):
    lin = nn.Linear(70, 30).to(device)
    lin.weight = nn.Parameter(BinaryTensor.from_float(lin.weight.detach()))
    x = torch.randn(2, 3, 70, device=device, requires_grad=True)
    with LogUnpackOps(counted_unpacks):
        y = lin(x)  # nn.Linear -> F.linear -> W1A16, no dense weight
        y.sum().backward()
    assert counted_unpacks == []
    dense = lin.weight.dequantize().detach()
    torch.testing.assert_close(
        y, x.detach() @ dense.T + lin.bias.detach(), rtol=1e-5, atol=2.0**-18 * x.abs().sum(-1).max().item()
    )  # two TF32 terms
    torch.testing.assert_close(lin.weight.grad, y.new_ones(6, 30).T @ x.detach().reshape(6, 70))
    # Other reads still see the dense values (not routed).
    assert torch.equal(F.linear(dense, lin.weight), dense @ dense.T)


def mlp(weight_quantizer):
    return nn.Sequential(
        # No size a multiple of 16: on CUDA these share the other tests' compiled variants.
        BinaryLinear(40, 60, input_quantizer=None, weight_quantizer=weight_quantizer),
        BinaryLinear(60, 44, weight_quantizer=weight_quantizer),
        BinaryLinear(44, 10, input_quantizer="approx_sign", weight_quantizer=weight_quantizer),
    )


def run_and_grads(model, x):
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), device=x.device).view_as(y)).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize(
    "backend,weight_quantizer",
    [("aot_eager", None), ("aot_eager", "ste_sign"), ("aot_eager", "magnitude_aware_sign"), ("inductor", None)],
)
def test_compile_mlp_fullgraph(device, backend, weight_quantizer):
    # Inductor runs on the CPU (its GPU compile would spend the GPU budget on Triton codegen of
    # the elementwise ops around the custom ops, which aot_eager already traces the same way).
    device = "cpu" if backend == "inductor" else device
    torch.manual_seed(0)
    model = mlp(weight_quantizer).to(device)
    x = torch.randn(16, 40, device=device, requires_grad=True)
    y, grads = run_and_grads(model, x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y_c, grads_c = run_and_grads(compiled, x)
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_c, grads):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_f_linear_fullgraph(device):
    lin = nn.Linear(45, 10).to(device)
    lin.weight = nn.Parameter(BinaryTensor.from_float(lin.weight.detach()))
    x = torch.randn(4, 45, device=device)
    torch.testing.assert_close(torch.compile(lin, fullgraph=True, backend="aot_eager")(x), lin(x))


def test_bad_inputs(device):
    w = BinaryTensor.from_float(torch.randn(8, 40, device=device))
    x = torch.randn(3, 40, device=device)
    with pytest.raises(ValueError, match="last dimension is 41, expected in_features = 40"):
        bnnops.binary_linear(torch.randn(3, 41, device=device), w)
    with pytest.raises(ValueError, match=r"expected ceil\(K/32\) = 2 words"):
        bnnops.binary_linear(torch.zeros(3, 3, dtype=torch.int32, device=device), w)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16 .* got torch.int64"):
        bnnops.binary_linear(x.long(), w)
    with pytest.raises(TypeError, match="weight must be a BinaryTensor or a float32"):
        bnnops.binary_linear(x, torch.ones(8, 40, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"x \(torch.bfloat16\) and weight \(torch.float32\) must have the same dtype"):
        bnnops.binary_linear(x.bfloat16(), w)
    with pytest.raises(TypeError, match="bias .* and x .* must have the same dtype"):
        bnnops.binary_linear(x, w, torch.zeros(8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="x is on meta but weight is on"):
        bnnops.binary_linear(torch.randn(3, 40, device="meta"), w)
    with pytest.raises(ValueError, match=r"weight must be 2-D \(out_features, in_features\)"):
        bnnops.binary_linear(x, torch.randn(8, 40, 1, device=device))
    with pytest.raises(ValueError, match="at least one dimension"):
        bnnops.binary_linear(torch.tensor(1.0, device=device), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bnnops.binary_linear(x, w, torch.zeros(7, device=device))
    # A learnable scale is applied outside the op: scale and bias are still checked (no broadcast).
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        bnnops.binary_linear(x, w, scale=torch.ones(1, device=device, requires_grad=True))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bnnops.binary_linear(
            x, w, torch.zeros(1, device=device), scale=torch.ones(8, device=device, requires_grad=True)
        )
    # The W1A16 op takes K from x, so the layer checks in_features itself (padding bits are not weights).
    with pytest.raises(ValueError, match="last dimension is 50, expected in_features = 40"):
        F.linear(torch.randn(3, 50, device=device), w)
    with pytest.raises(ValueError, match="last dimension is 100, expected in_features = 40"):
        bnnops.binary_linear(torch.randn(3, 100, device=device), w, input_quantizer=None)
    with pytest.raises(TypeError, match="bias must be a float tensor"):
        bnnops.binary_linear(x, w, 1.0)
    with pytest.raises(ValueError, match="magnitude_aware_sign is a weight quantizer"):
        bnnops.binary_linear(x, w, input_quantizer="magnitude_aware_sign")
    with pytest.raises(ValueError, match="already binary"):
        bnnops.binary_linear(x, w, weight_quantizer="ste_sign")
    with pytest.raises(ValueError, match="unknown quantizer"):
        BinaryLinear(4, 4, input_quantizer="relu")
    with pytest.raises(ValueError, match="magnitude_aware_sign is a weight quantizer"):
        BinaryLinear(4, 4, input_quantizer="magnitude_aware_sign")
    words = w.words
    with pytest.raises(ValueError, match=r"shape \(out_features, ceil\(K/32\)\) = \(N, 2\) for K=40"):
        torch.ops.bnnops.binary_linear_w1a16(x, words[:, :1], None, None)
    with pytest.raises(TypeError, match="packed weight must be int32"):
        torch.ops.bnnops.binary_linear_w1a1(x, words.float(), 40, None, None, torch.float32)
    with pytest.raises(TypeError, match="scale must be a float32"):
        int_scale = torch.ones(8, dtype=torch.int32, device=device)
        torch.ops.bnnops.binary_linear_w1a1(x, words, 40, int_scale, None, torch.float32)
    with pytest.raises(ValueError, match=r"grad must have shape \(..., out_features = 8\)"):
        torch.ops.bnnops.binary_linear_grad_input(torch.randn(3, 9, device=device), words, 40)
    with pytest.raises(TypeError, match="out_dtype must be float32, bfloat16 or float16"):
        torch.ops.bnnops.binary_linear_w1a1(x, words, 40, None, None, torch.int32)


@pytest.mark.parametrize("iq", ["ste_sign", None])
def test_learnable_scale_output_without_grad(device, iq):
    w = BinaryTensor.from_float(torch.randn(8, 40, device=device), dtype=torch.bfloat16)
    x = torch.randn(3, 40, device=device, dtype=torch.bfloat16)
    scale = torch.rand(8, device=device, requires_grad=True)
    check_learnable_scale_output_without_grad(
        lambda: bnnops.binary_linear(x, w, scale=scale, input_quantizer=iq), scale
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("iq,wq", [(None, None), ("ste_sign", None), (None, "magnitude_aware_sign")])
def test_learnable_scale_gives_the_fixed_scale_output(device, dtype, iq, wq):
    """A scale's requires_grad never changes the output: a learnable scale multiplies the op's fp32
    product, then the bias is added, in fp32, and the sum is rounded once, which are the bits of
    the fixed scale fused in the op's epilogue. Random 16-bit inputs, biases and scales (W1A16,
    W1A1, a magnitude-aware latent weight)."""
    g = torch.Generator().manual_seed(7)
    N, K = 37, 70
    for scale_dtype in (torch.float32, dtype):
        x = torch.randn(4, 3, K, generator=g).to(dtype).to(device)
        dense = torch.randn(N, K, generator=g).to(dtype).to(device)
        w = BinaryTensor.from_float(dense) if wq is None else dense
        bias = torch.randn(N, generator=g).to(dtype).to(device)
        scale = (torch.rand(N, generator=g) * 2 + 0.1).to(scale_dtype).to(device)
        kwargs = dict(input_quantizer=iq, weight_quantizer=wq)
        fixed = bnnops.binary_linear(x, w, bias, scale=scale, **kwargs)
        learnable = bnnops.binary_linear(x, w, bias, scale=scale.clone().requires_grad_(), **kwargs)
        assert learnable.requires_grad and learnable.dtype == fixed.dtype == dtype
        assert torch.equal(learnable, fixed), (learnable != fixed).float().mean()


@pytest.mark.parametrize(
    "iq,wq,packed_x",
    [
        ("ste_sign", None, False),
        (None, None, False),
        ("ste_sign", None, True),
        ("ste_sign", "magnitude_aware_sign", False),
    ],
)
def test_inference_runs_the_op_alone(monkeypatch, device, iq, wq, packed_x):
    """With nothing to differentiate the layer calls the op without an autograd node; same output."""
    layer = BinaryLinear(40, 7, input_quantizer=iq, weight_quantizer=wq, device=device)
    x = torch.randn(2, 3, 40, device=device)
    if packed_x:
        x = pack_signs(x)
    check_inference_runs_the_op_alone(monkeypatch, layer, x, linear._BinaryLinearFunction)


def test_autocast_and_empty_features(device):
    """Under autocast the layer computes in autocast's dtype (as nn.Linear); in_features = 0 works."""
    layer = BinaryLinear(40, 5, weight_quantizer="ste_sign").to(device)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = layer(x)
        binary = nn.Linear(40, 5).to(device)
        binary.weight = nn.Parameter(BinaryTensor.from_float(binary.weight.detach()))
        assert binary(x).dtype == torch.bfloat16  # F.linear on a binary weight follows autocast too
    expected = bnnops.binary_linear(
        x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(), weight_quantizer="ste_sign"
    )
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    empty = BinaryLinear(0, 4).to(device)
    x0 = torch.randn(3, 0, device=device, requires_grad=True)
    y0 = empty(x0)
    assert torch.equal(y0, empty.bias.detach().expand(3, 4))
    y0.sum().backward()
    assert x0.grad.shape == (3, 0) and empty.weight.grad.shape == (4, 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_and_dtypes(device, dtype):
    layer = BinaryLinear(45, 12).to(device, dtype)
    x = torch.randn(45, 6, device=device, dtype=dtype).t()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)
