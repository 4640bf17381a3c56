"""Binary linear layers: the ``bnnops::binary_linear_*`` ops, their autograd, and ``BinaryLinear``.

Two products with a packed +-1 weight W (out_features N, in_features K), stored as int32 words
(N, ceil(K/32)) in the layout of :mod:`bnnops.packing`:

- **W1A1** ``torch.ops.bnnops.binary_linear_w1a1(x, weight, K, scale, bias, out_dtype)``:
  y = sign(x) W^T * scale + bias. x is float (..., K), binarized x < 0 -> -1 else +1, or int32
  sign words (..., ceil(K/32)). The dot product is an exact integer.
- **W1A16** ``torch.ops.bnnops.binary_linear_w1a16(x, weight, scale, bias)``: y = x W^T * scale +
  bias for real x (..., K), fp32 accumulation, y in x's dtype.
- ``torch.ops.bnnops.binary_linear_grad_input(grad, weight, K)``: grad W, (..., N) -> (..., K),
  the input gradient of both, reading W packed.

scale and bias are optional per-output-channel (N,) float tensors (XNOR-Net's alpha, a bias).
Each op's default (CPU) body is the pure-PyTorch reference below; CUDA tensors run the Triton
kernels of ``bnnops.kernels.gemm``.

:func:`binary_linear` adds autograd on top: grad_input = grad_out W through the packed-weight
kernel, times the input quantizer's surrogate gradient; grad_weight = grad_out^T sign(x) (or
grad_out^T x for W1A16), a dense float gradient of the weight's logical shape, which is what Bop
consumes. The dense +-1 weight is never built on the CUDA path, forward or backward.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from bnnops import kernels
from bnnops.binary_tensor import TORCH_FUNCTIONS, BinaryTensor, metadata, pack_dense_state_entries
from bnnops.library import (
    check_channel_vectors,
    contiguous,
    define,
    first_derivatives,
    needs_autograd,
    split_epilogue,
    type_name,
)
from bnnops.packing import FLOAT_DTYPES, packed_length, unpack_signs_reference
from bnnops.quantizers import autocast_inputs, binarize_weight, get_input_quantizer, get_quantizer, sign

__all__ = [
    "BinaryLinear",
    "binary_linear",
    "grad_input_reference",
    "w1a1_reference",
    "w1a16_reference",
]


# ----------------------------------------------------------------------------- references


def _epilogue(y, scale, bias):
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y


def w1a1_reference(x, weight, K, scale=None, bias=None, out_dtype=torch.float32):
    """sign(x) @ W^T * scale + bias in fp32 (exact: integer sums below 2^24), cast to out_dtype."""
    xs = unpack_signs_reference(x, K, torch.float32) if x.dtype == torch.int32 else sign(x.float())
    y = xs @ unpack_signs_reference(weight, K, torch.float32).T
    return _epilogue(y, scale, bias).to(out_dtype)


def w1a16_reference(x, weight, scale=None, bias=None):
    """x @ W^T * scale + bias with fp32 accumulation, in x's dtype."""
    y = x.float() @ unpack_signs_reference(weight, x.shape[-1], torch.float32).T
    return _epilogue(y, scale, bias).to(x.dtype)


def grad_input_reference(grad, weight, K):
    """grad @ W with fp32 accumulation, in grad's dtype: (..., N) -> (..., K)."""
    return (grad.float() @ unpack_signs_reference(weight, K, torch.float32)).to(grad.dtype)


# ----------------------------------------------------------------------------- checks


def _check_words(weight, K):
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int32:
        raise TypeError(f"the packed weight must be int32 words, got {type_name(weight)}")
    if weight.dim() != 2 or weight.shape[1] != packed_length(K):
        raise ValueError(
            f"the packed weight must have shape (out_features, ceil(K/32)) = (N, {packed_length(K)}) "
            f"for K={K}, got {tuple(weight.shape)}"
        )


def _check_features(x, K):
    """x (..., K) float, or (..., ceil(K/32)) packed words."""
    if x.dim() == 0:
        raise ValueError("input must have at least one dimension (..., in_features), got a scalar")
    features = packed_length(K) if x.dtype == torch.int32 else K
    if x.shape[-1] != features:
        what = f"ceil(K/32) = {features} words" if x.dtype == torch.int32 else f"in_features = {K}"
        raise ValueError(f"input's last dimension is {x.shape[-1]}, expected {what}")


def _check_op(x, weight, K, scale, bias, *, packed_ok):
    kinds = "float32, bfloat16 or float16" + (" (or int32 packed sign words)" if packed_ok else "")
    if not isinstance(x, torch.Tensor) or not (x.dtype in FLOAT_DTYPES or (packed_ok and x.dtype == torch.int32)):
        raise TypeError(f"input must be {kinds}, got {type_name(x)}")
    _check_words(weight, K)
    _check_features(x, K)
    if weight.device != x.device:
        raise ValueError(f"the weight is on {weight.device} but the input is on {x.device}")
    check_channel_vectors(weight.shape[0], x.device, scale=scale, bias=bias)


def _rows(x):
    # flatten, not reshape(-1, K): that cannot infer -1 when K = 0.
    return x.flatten(0, -2) if x.dim() > 1 else x[None]


# ----------------------------------------------------------------------------- ops


def _w1a1_check(x, weight, K, scale, bias, out_dtype):
    _check_op(x, weight, K, scale, bias, packed_ok=True)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _w1a16_check(x, weight, scale, bias):
    _check_op(x, weight, x.shape[-1] if x.dim() else 0, scale, bias, packed_ok=False)


def _w1a1_cuda(x, weight, K, scale, bias, out_dtype):
    y = kernels.load("gemm").w1a1(
        _rows(x), weight.contiguous(), K, scale=contiguous(scale), bias=contiguous(bias), out_dtype=out_dtype
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _w1a16_cuda(x, weight, scale, bias):
    y = kernels.load("gemm").w1a16(_rows(x), weight.contiguous(), scale=contiguous(scale), bias=contiguous(bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


define(
    "binary_linear_w1a1(Tensor x, Tensor weight, SymInt K, Tensor? scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    check=_w1a1_check,
    reference=w1a1_reference,
    cuda=_w1a1_cuda,
    fake=lambda x, weight, K, scale, bias, out_dtype: x.new_empty(*x.shape[:-1], weight.shape[0], dtype=out_dtype),
)
define(
    "binary_linear_w1a16(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor",
    check=_w1a16_check,
    reference=w1a16_reference,
    cuda=_w1a16_cuda,
    fake=lambda x, weight, scale, bias: x.new_empty(*x.shape[:-1], weight.shape[0]),
)


def _check_grad_input(grad, weight, K):
    _check_words(weight, K)
    if not isinstance(grad, torch.Tensor) or grad.dtype not in FLOAT_DTYPES:
        raise TypeError(f"grad must be float32, bfloat16 or float16, got {type_name(grad)}")
    if grad.dim() == 0 or grad.shape[-1] != weight.shape[0]:
        raise ValueError(f"grad must have shape (..., out_features = {weight.shape[0]}), got {tuple(grad.shape)}")
    if grad.device != weight.device:
        raise ValueError(f"the weight is on {weight.device} but grad is on {grad.device}")


def _grad_input_cuda(grad, weight, K):
    return kernels.load("gemm").grad_input(_rows(grad), weight.contiguous(), K).reshape(*grad.shape[:-1], K)


define(
    "binary_linear_grad_input(Tensor grad, Tensor weight, SymInt K) -> Tensor",
    check=_check_grad_input,
    reference=grad_input_reference,
    cuda=_grad_input_cuda,
    fake=lambda grad, weight, K: grad.new_empty(*grad.shape[:-1], K),
)


# ----------------------------------------------------------------------------- autograd


def _product(x, words, K, scale, bias, input_quantizer, out_dtype):
    """The forward op on 2-D x: W1A16 for real x (no input quantizer), else W1A1."""
    if input_quantizer is None and x.dtype != torch.int32:
        return torch.ops.bnnops.binary_linear_w1a16(x, words, scale, bias)
    return torch.ops.bnnops.binary_linear_w1a1(x, words, K, scale, bias, out_dtype)


class _BinaryLinearFunction(torch.autograd.Function):
    """y = op(x, words) * scale + bias with gradients for x, the weight and bias.

    x is 2-D: float (M, K) or packed words (M, ceil(K/32)). ``weight`` is what receives the
    gradient: a BinaryTensor, or a dense latent weight whose signs are ``words``; ``weight_dtype``
    is its dtype (read once by :func:`binary_linear`). scale takes no gradient here (see
    :func:`binary_linear`).
    """

    @staticmethod
    def forward(ctx, x, weight, words, K, weight_dtype, scale, bias, input_quantizer, weight_quantizer, out_dtype):
        y = _product(x, words, K, scale, bias, input_quantizer, out_dtype)
        latent = weight if weight_quantizer is not None else None
        ctx.save_for_backward(x, words, scale, latent)
        ctx.K = K
        ctx.input_quantizer = input_quantizer
        ctx.weight_quantizer = weight_quantizer
        ctx.weight_dtype = weight_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, words, scale, latent = ctx.saved_tensors
        g = (grad_y * scale).to(grad_y.dtype) if scale is not None else grad_y
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.bnnops.binary_linear_grad_input(g, words, ctx.K)
            if ctx.input_quantizer is not None:
                grad_x = ctx.input_quantizer.grad(x, grad_x)
        if ctx.needs_input_grad[1]:
            if x.dtype == torch.int32:
                x_values = torch.ops.bnnops.unpack_signs(x, ctx.K, g.dtype)
            elif ctx.input_quantizer is not None:
                x_values = sign(x).to(g.dtype)
            else:
                x_values = x.to(g.dtype)
            grad_weight = g.T @ x_values
            if latent is not None:
                grad_weight = ctx.weight_quantizer.grad(latent, grad_weight)
            grad_weight = grad_weight.to(ctx.weight_dtype)
        if ctx.needs_input_grad[6]:
            grad_bias = grad_y.sum(0)
        grad_x, grad_weight = first_derivatives("binary_linear", grad_y, grad_x, grad_weight)
        return grad_x, grad_weight, None, None, None, None, grad_bias, None, None, None


def _check_weight(weight):
    """The weight's (shape, dtype, device, requires_grad), after checking it is a 2-D float tensor."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a BinaryTensor or a float latent weight, got {type(weight).__name__}")
    meta = metadata(weight)
    shape, dtype = meta[0], meta[1]
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a BinaryTensor or a float32, bfloat16 or float16 latent weight, got {dtype}")
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(shape)}")
    return meta


def binary_linear(x, weight, bias=None, *, input_quantizer="ste_sign", scale=None, weight_quantizer=None):
    """Binary linear layer: ``q(x) @ W^T * scale + bias`` with W a +-1 weight.

    Args:
        x: (..., in_features) float32 / bfloat16 / float16, any strides. With an input quantizer
            it is binarized inside the kernel (W1A1, exact integer dot); with
            ``input_quantizer=None`` it stays real (W1A16, fp32 accumulation). int32 x is taken as
            packed sign words (..., ceil(in_features/32)) (W1A1, no gradient for x). Float x has
            the weight's dtype, or any float dtype under ``torch.autocast`` (x and bias are then
            cast to autocast's dtype, as nn.Linear does). On CUDA, W1A16 turns an infinite x
            into NaN outputs (the reference gives +-inf).
        weight: a :class:`bnnops.BinaryTensor` (out_features, in_features), read packed; or a
            dense float latent weight of that shape, binarized by ``weight_quantizer`` every call
            (its signs are packed by the pack op; its gradient is the quantizer's surrogate).
        bias: optional (out_features,) float tensor, added in the kernel's epilogue.
        input_quantizer: a quantizer name or :class:`bnnops.quantizers.SignQuantizer` for x, or
            None for real activations. Its surrogate gradient shapes grad_input.
        scale: optional (out_features,) float tensor multiplying each output channel (XNOR-Net's
            alpha), fused in the epilogue; learnable when it requires grad.
        weight_quantizer: for a dense latent weight: a quantizer (default ``"ste_sign"``);
            ``"magnitude_aware_sign"`` adds its per-channel mean |w| to ``scale``. Must be None
            for a BinaryTensor weight.

    Returns:
        (..., out_features) in x's dtype (float32 for packed x).

    Gradients: x gets grad_out W (W read packed) times the input quantizer's surrogate; the
    weight gets a dense grad_out^T sign(x) (grad_out^T x for W1A16) of its logical shape and dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES and x.dtype != torch.int32:
        raise TypeError(f"x must be float32, bfloat16 or float16 (or int32 packed sign words), got {x.dtype}")
    (N, K), weight_dtype, weight_device, weight_requires_grad = _check_weight(weight)
    # The ops check these too, but the W1A16 op takes K from x: a wrong in_features must fail here.
    _check_features(x, K)
    x, bias = autocast_inputs(x, weight_dtype, bias)
    if weight_device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight_device}")
    iq = get_input_quantizer(input_quantizer)
    wq, words, scale = binarize_weight(weight, weight_quantizer, scale)
    out_dtype = x.dtype if x.dtype in FLOAT_DTYPES else torch.float32

    outside, op_scale, op_bias = split_epilogue(scale, bias, N, x.device)
    op_dtype = torch.float32 if outside else out_dtype
    x2d = _rows(x)
    if needs_autograd(x, weight_requires_grad, op_bias):
        y = _BinaryLinearFunction.apply(x2d, weight, words, K, weight_dtype, op_scale, op_bias, iq, wq, op_dtype)
    else:
        # Nothing to differentiate through the product (inference): the op alone, no autograd node.
        y = _product(x2d, words, K, op_scale, op_bias, iq, op_dtype)
    if outside:
        y = _epilogue(y, scale, bias).to(out_dtype)
    return y.reshape(*x.shape[:-1], N)


def _f_linear(input, weight, bias=None):
    """``F.linear(x, binary_weight)`` (so also ``nn.Linear``): the W1A16 product, weight read packed."""
    if not isinstance(weight, BinaryTensor) or isinstance(input, BinaryTensor) or isinstance(bias, BinaryTensor):
        return NotImplemented
    return binary_linear(input, weight, bias, input_quantizer=None)


TORCH_FUNCTIONS[F.linear] = _f_linear


class BinaryLinear(nn.Module):
    """A linear layer with +-1 weights (and, by default, +-1 inputs) on the binary GEMM kernels.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        input_quantizer: binarizes the input (a name or SignQuantizer); None keeps real inputs
            (W1A16: first/last layers, binary-weight networks).
        weight_quantizer: None (default): the weight is a packed :class:`bnnops.BinaryTensor`
            parameter, trained by Bop (:mod:`bnnops.optim`). A quantizer (e.g. ``"ste_sign"``):
            the weight is a float latent parameter binarized every forward (latent-weight training
            with a torch optimizer), still running the binary kernels.
        device, dtype: as :class:`torch.nn.Linear`.

    Init: like :class:`torch.nn.Linear` (Kaiming-uniform weight, uniform bias); the binary weight
    holds the signs of that init.
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        input_quantizer="ste_sign",
        weight_quantizer=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.input_quantizer = get_input_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)
        factory = dict(device=device, dtype=dtype)
        w = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight = nn.Parameter(w if self.weight_quantizer is not None else BinaryTensor.from_float(w))
        self.register_load_state_dict_pre_hook(pack_dense_state_entries)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return binary_linear(
            x, self.weight, self.bias, input_quantizer=self.input_quantizer, weight_quantizer=self.weight_quantizer
        )

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_quantizer={self.input_quantizer}, weight_quantizer={self.weight_quantizer}"
        )
