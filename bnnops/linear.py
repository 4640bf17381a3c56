"""``bnnops.binary_linear``: the binary linear layer as a function, with its autograd.

The forward runs one op of :mod:`bnnops.ops.linear` on the weight's words: W1A1
(``binary_linear_w1a1``) with an input quantizer or packed x, W1A16 (``binary_linear_w1a16``) for
real x. The backward gives grad_input = grad_out W through the packed-weight op
``binary_linear_grad_input``, times the input quantizer's surrogate gradient, and grad_weight =
grad_out^T sign(x) (grad_out^T x for W1A16), a dense float gradient of the weight's logical shape,
which is what Bop consumes. The dense +-1 weight is never built on the CUDA path, forward or
backward. ``F.linear`` (so ``nn.Linear``) on a BinaryTensor weight runs the W1A16 product.

With the ``ste_sign`` input quantizer a training forward packs x once, into the sign and
pass-mask words its backward keeps (:func:`bnnops.layer_common.pack_saved_input`: 2 bits per input
element, not x), and on CUDA (and in a compiled graph) runs the W1A1 product on the sign words: one
pass over float x in all (the same output bits: the dot of +-1 values is an exact integer either
way); in eager CPU code the product reads float x (its reference would unpack the words again). The backward reads the
words through the ops of :mod:`bnnops.ops.backward` (``binary_linear_grad_weight``,
``binary_linear_grad_input_masked``): on CUDA the launchers of ``bnnops.kernels.linear_backward``
(numerics as ``gemm.grad_input``, docs/design.md 4.2), on the CPU their references; a compiled
graph holds the same ops.
"""

import torch
from torch.nn import functional as F

import bnnops.ops.backward  # noqa: F401  (defines the backward ops this module calls)
from bnnops.binary_tensor import BinaryTensor, implements_torch_function, metadata
from bnnops.layer_common import (
    apply_scale_bias,
    autocast_inputs,
    binarize_weight,
    first_derivatives,
    fuses_references,
    needs_autograd,
    pack_and_multiply,
    split_epilogue,
)
from bnnops.ops import backward_reference
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError
from bnnops.ops.library import FLOAT_DTYPES, call
from bnnops.ops.linear import check_features, rows

# Re-exported for tests/test_gemm.py and bench/cases/dispatch.py, which import the references from
# here; their home is bnnops.ops.reference.
from bnnops.ops.reference import grad_input_reference, w1a1_reference, w1a16_reference  # noqa: F401
from bnnops.quantizers import SignQuantizer, get_input_quantizer, sign

__all__ = ["binary_linear"]


def _product(x, words, K, scale, bias, input_quantizer, out_dtype):
    """The forward op on 2-D x: W1A16 for real x (no input quantizer), else W1A1; y in ``out_dtype``."""
    if input_quantizer is None and x.dtype != torch.int32:
        return call(torch.ops.bnnops.binary_linear_w1a16.default, x, words, scale, bias, out_dtype)
    return call(torch.ops.bnnops.binary_linear_w1a1.default, x, words, K, scale, bias, out_dtype)


class _BinaryLinearFunction(torch.autograd.Function):
    """y = op(x, words) * scale + bias with gradients for x, the weight and bias.

    x is 2-D: float (M, K) or packed words (M, ceil(K/32)). ``weight`` is what receives the
    gradient: a BinaryTensor, or a dense latent weight whose signs are ``words``; ``weight_dtype``
    is its dtype (read once by :func:`binary_linear`). scale takes no gradient here (see
    :func:`bnnops.layer_common.split_epilogue`).

    Saved for backward (:mod:`bnnops.layer_common`): with a mask-only input quantizer
    (``ste_sign``) x's sign words if the weight needs a gradient and its pass-mask words if x
    does, no float x (on CUDA the product runs on the sign words: x is read once); packed x is its own
    sign words; otherwise x if a gradient needs it.
    """

    @staticmethod
    def forward(ctx, x, weight, words, K, weight_dtype, scale, bias, input_quantizer, weight_quantizer, out_dtype):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dense_x = sign_words = mask_words = None
        if x.dtype == torch.int32:
            y = _product(x, words, K, scale, bias, input_quantizer, out_dtype)
            sign_words = x if need_w else None
        elif input_quantizer is not None and input_quantizer.saves_mask_only:
            y, sign_words, mask_words = pack_and_multiply(
                x,
                input_quantizer.clip_value,
                None,
                need_w,
                need_x,
                lambda a: _product(a, words, K, scale, bias, input_quantizer, out_dtype),
            )
        else:
            y = _product(x, words, K, scale, bias, input_quantizer, out_dtype)
            if need_w or (need_x and input_quantizer is not None):
                dense_x = x
        latent = weight if weight_quantizer is not None else None
        ctx.save_for_backward(dense_x, sign_words, mask_words, words, scale, latent)
        ctx.K = K
        ctx.input_quantizer = input_quantizer
        ctx.weight_quantizer = weight_quantizer
        ctx.weight_dtype = weight_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, sign_words, mask_words, words, scale, latent = ctx.saved_tensors
        g = (grad_y * scale).to(grad_y.dtype) if scale is not None else grad_y
        grad_x = grad_weight = grad_bias = None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (
            need_x
            and need_w
            and mask_words is not None
            and sign_words is not None
            and fuses_references((g, words, sign_words, mask_words))
        ):
            # Plain eager CPU (where call() would skip the dispatcher): the two ops' references
            # called directly, without a call's checks of tensors this forward made (the same bits).
            # Modes, profilers and subclasses see the two ops.
            grad_x = backward_reference.linear_grad_input_reference(g, words, mask_words, ctx.K)
            grad_weight = backward_reference.linear_grad_weight_reference(g, sign_words, ctx.K, None)
            need_x = need_w = False
        if need_x:
            if mask_words is not None:
                # SteSign.grad's select, on the saved mask, inside the op.
                grad_x = call(torch.ops.bnnops.binary_linear_grad_input_masked.default, g, words, mask_words, ctx.K)
            else:
                grad_x = call(torch.ops.bnnops.binary_linear_grad_input.default, g, words, ctx.K)
                if ctx.input_quantizer is not None:
                    grad_x = ctx.input_quantizer.grad(x, grad_x)
        if need_w:
            if sign_words is not None:
                grad_weight = call(torch.ops.bnnops.binary_linear_grad_weight.default, g, sign_words, ctx.K, None)
            else:
                x_values = sign(x).to(g.dtype) if ctx.input_quantizer is not None else x.to(g.dtype)
                grad_weight = g.T @ x_values
        if grad_weight is not None:
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
        raise DtypeError(f"weight must be a BinaryTensor or a float latent weight, got {type(weight).__name__}")
    meta = metadata(weight)
    shape, dtype = meta[0], meta[1]
    if dtype not in FLOAT_DTYPES:
        raise DtypeError(f"weight must be a BinaryTensor or a float32, bfloat16 or float16 latent weight, got {dtype}")
    if len(shape) != 2:
        raise ShapeError(f"weight must be 2-D (out_features, in_features), got shape {tuple(shape)}")
    return meta


def binary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    input_quantizer: SignQuantizer | str | None = "ste_sign",
    scale: torch.Tensor | None = None,
    weight_quantizer: SignQuantizer | str | None = None,
) -> torch.Tensor:
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
            alpha), fused in the epilogue; learnable when it requires grad (then applied after
            the op, to its fp32 product: the same output bits either way).
        weight_quantizer: for a dense latent weight: a quantizer (default ``"ste_sign"``);
            ``"magnitude_aware_sign"`` multiplies ``scale`` by its per-channel mean |w|. Must be
            None for a BinaryTensor weight.

    Returns:
        (..., out_features) in x's dtype (float32 for packed x).

    Raises:
        DtypeError (a TypeError and a RuntimeError): a wrong type or dtype (x, weight, bias,
            scale), or x and weight (or bias) in different dtypes outside autocast.
        ShapeError (a ValueError and a RuntimeError): a shape that does not match (in_features,
            bias or scale not (out_features,)), or a weight that is not 2-D.
        DeviceError (a ValueError and a RuntimeError): x, weight, bias or scale on different devices.
        ValueError: an unknown quantizer, or a weight quantizer for a BinaryTensor.

    Gradients: x gets grad_out W (W read packed) times the input quantizer's surrogate; the
    weight gets a dense grad_out^T sign(x) (grad_out^T x for W1A16) of its logical shape and dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise DtypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES and x.dtype != torch.int32:
        raise DtypeError(f"x must be float32, bfloat16 or float16 (or int32 packed sign words), got {x.dtype}")
    (N, K), weight_dtype, weight_device, weight_requires_grad = _check_weight(weight)
    # The ops check these too, but the W1A16 op takes K from x: a wrong in_features must fail here.
    check_features(x, K)
    x, bias = autocast_inputs(x, weight_dtype, bias)
    if weight_device != x.device:
        raise DeviceError(f"x is on {x.device} but weight is on {weight_device}")
    iq = get_input_quantizer(input_quantizer)
    wq, words, scale = binarize_weight(weight, weight_quantizer, scale)
    out_dtype = x.dtype if x.dtype in FLOAT_DTYPES else torch.float32

    outside, op_scale, op_bias = split_epilogue(scale, bias, N, x.device)
    op_dtype = torch.float32 if outside else out_dtype
    x2d = rows(x)
    if needs_autograd(x, weight_requires_grad, op_bias):
        y = _BinaryLinearFunction.apply(x2d, weight, words, K, weight_dtype, op_scale, op_bias, iq, wq, op_dtype)
    else:
        # Nothing to differentiate through the product (inference): the op alone, no autograd node.
        y = _product(x2d, words, K, op_scale, op_bias, iq, op_dtype)
    if outside:
        y = apply_scale_bias(y, scale, bias, out_dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


@implements_torch_function(F.linear)
def _f_linear(input, weight, bias=None):
    """``F.linear(x, binary_weight)`` (so also ``nn.Linear``): the W1A16 product, weight read packed."""
    if not isinstance(weight, BinaryTensor) or isinstance(input, BinaryTensor) or isinstance(bias, BinaryTensor):
        return NotImplemented
    return binary_linear(input, weight, bias, input_quantizer=None)
