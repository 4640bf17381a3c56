"""``bnnops.binary_conv2d``: the binary 2-D convolution as a function, with its autograd.

The forward runs the op ``bnnops::binary_conv2d`` (:mod:`bnnops.ops.conv`) on the weight's words,
W1A1 with an input quantizer, W1A16 without. On top of the op it takes nn.Conv2d's arguments (a
BinaryTensor or a float latent weight, input and weight quantizers from :mod:`bnnops.quantizers`,
padding as an int, a pair, "valid" or "same", unbatched input). ``F.conv2d`` (so ``nn.Conv2d``) on
a BinaryTensor weight runs the W1A16 op.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import bnnops.ops.conv  # noqa: F401  (defines torch.ops.bnnops.binary_conv2d, which this module calls)
from bnnops import kernels
from bnnops.binary_tensor import BinaryTensor, implements_torch_function, metadata
from bnnops.layer_common import (
    apply_scale_bias,
    autocast_inputs,
    binarize_weight,
    first_derivatives,
    needs_autograd,
    pack_saved_input,
    runs_kernels,
    split_epilogue,
)
from bnnops.ops.backward_reference import unpack_conv_words
from bnnops.ops.checks import DtypeError, ShapeError
from bnnops.ops.library import FLOAT_DTYPES
from bnnops.ops.reference import output_is_channels_last
from bnnops.packing import unpack_weight
from bnnops.quantizers import SignQuantizer, get_input_quantizer, sign

__all__ = ["as_pair", "binary_conv2d", "conv_padding"]


def as_pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    """``(v, v)`` for an int, else ``tuple(v)``, as nn.Conv2d's size arguments.

    Raises:
        ShapeError: v is neither an int nor a pair of ints (``what`` names it).
    """
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ShapeError(f"{what} must be an int or a pair of ints, got {v}")
    return v


def conv_padding(
    padding: int | Sequence[int] | str,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from nn.Conv2d's ``padding``: an int, a pair, "valid" or "same".

    "same" (stride 1 only, as in PyTorch) pads d*(k-1) in all, the odd one at the bottom/right.
    kernel_size, stride and dilation are ints or pairs.

    Raises:
        ShapeError: an unknown padding string, "same" with a stride other than 1, or an argument
            that is neither an int nor a pair of ints.
    """
    kernel_size, stride, dilation = (
        as_pair(kernel_size, "kernel_size"),
        as_pair(stride, "stride"),
        as_pair(dilation, "dilation"),
    )
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ShapeError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if stride != (1, 1):
            raise ShapeError(f"padding='same' needs stride 1 (as in torch.nn.Conv2d), got stride={stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    ph, pw = as_pair(padding, "padding")
    return (ph, ph, pw, pw)


class _BinaryConv2dFunction(torch.autograd.Function):
    """y = conv(a(x), sign(weight)) * scale + bias with gradients for x, the weight and bias.

    The forward runs ``bnnops::binary_conv2d`` on the packed ``words``. ``weight`` is what receives
    the gradient: a BinaryTensor, or a dense latent weight whose signs are ``words``, of logical
    shape ``weight_shape`` and dtype ``weight_dtype`` (read once by :func:`binary_conv2d`). Padded
    positions are constants: they get no gradient, and with a pad value of +-1 they still
    contribute to grad_weight. scale takes no gradient here (see
    :func:`bnnops.layer_common.split_epilogue`). grad_input and grad_weight are in x's memory
    format (channels_last when :func:`bnnops.ops.reference.output_is_channels_last`), as
    nn.Conv2d's.

    Saved for backward (:mod:`bnnops.layer_common`): with a mask-only input quantizer
    (``ste_sign``) x's sign words (for grad_weight) and pass-mask words (for grad_input), per-group
    channels-last words, no float x; otherwise x if a gradient needs it. The backward reads the
    words: on CUDA the launchers of ``bnnops.kernels.conv2d_backward``; elsewhere cuDNN / ATen
    (``aten.convolution_backward``) on the +-1 values unpacked from the words, in x's memory
    format, and a select on the mask: bit for bit what a backward from x gives.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        words,
        weight_shape,
        weight_dtype,
        scale,
        bias,
        geometry,
        input_quantizer,
        weight_quantizer,
        out_dtype,
    ):
        y = _conv(x, words, scale, bias, geometry, input_quantizer, out_dtype)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dense_x = sign_words = mask_words = None
        if input_quantizer is not None and input_quantizer.saves_mask_only:
            sign_words, mask_words = pack_saved_input(x, input_quantizer.clip_value, geometry[3], need_w, need_x)
        elif need_w or (need_x and input_quantizer is not None):
            dense_x = x
        latent = weight if weight_quantizer is not None else None
        ctx.save_for_backward(dense_x, sign_words, mask_words, words, scale, latent)
        ctx.x_shape = tuple(x.shape)
        ctx.x_dtype = x.dtype
        ctx.channels_last = output_is_channels_last(x)
        ctx.geometry = geometry
        ctx.input_quantizer = input_quantizer
        ctx.weight_quantizer = weight_quantizer
        ctx.weight_shape = weight_shape
        ctx.weight_dtype = weight_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, sign_words, mask_words, words, scale, latent = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[6]
        grad_x = grad_weight = grad_bias = None
        if need_x or need_w:
            g = grad_y * scale.view(1, -1, 1, 1).to(grad_y.dtype) if scale is not None else grad_y
            if x is None and runs_kernels(g):
                grad_x, grad_weight = _packed_grads_kernels(ctx, g, words, sign_words, mask_words, need_x, need_w)
            else:
                grad_x, grad_weight = _grads_aten(ctx, g, x, words, sign_words, mask_words, need_x, need_w)
            fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
            if need_x:
                # In x's memory format, as nn.Conv2d's (the crop of the padded gradient is a strided view).
                grad_x = grad_x.to(ctx.x_dtype).contiguous(memory_format=fmt)
            if need_w:
                if latent is not None:
                    # The surrogate's elementwise ops follow the latent weight's format.
                    grad_weight = ctx.weight_quantizer.grad(latent, grad_weight)
                grad_weight = grad_weight.to(ctx.weight_dtype).contiguous(memory_format=fmt)
        if need_b:
            grad_bias = grad_y.sum((0, 2, 3))
        grad_x, grad_weight = first_derivatives("binary_conv2d", grad_y, grad_x, grad_weight)
        return grad_x, grad_weight, None, None, None, None, grad_bias, None, None, None, None


def _packed_grads_kernels(ctx, g, words, sign_words, mask_words, need_x, need_w):
    """(grad_x, grad_weight) from the saved words by the Triton launchers, in g's dtype."""
    stride, padding, dilation, groups, pad_value = ctx.geometry
    launchers = kernels.load("conv2d_backward")
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, channels_last=ctx.channels_last)
    grad_x = grad_weight = None
    if need_x:
        grad_x = launchers.grad_input(g, words.contiguous(), mask_words, ctx.x_shape, out_dtype=ctx.x_dtype, **geometry)
    if need_w:
        grad_weight = launchers.grad_weight(g, sign_words, ctx.weight_shape, pad_value=pad_value, **geometry)
    return grad_x, grad_weight


def _grads_aten(ctx, g, x, words, sign_words, mask_words, need_x, need_w):
    """(grad_x, grad_weight) by ``aten.convolution_backward`` on the +-1 weight and a(x), in g's dtype.

    a(x) comes from the sign words, or from x (sign(x) with an input quantizer, x for W1A16); a
    gradient for x alone needs no input values (zeros of x's shape and format stand in). The
    input quantizer's surrogate is applied: the saved mask's select, or ``quantizer.grad(x, .)``.
    """
    stride, (pt, pb, pl, pr), dilation, groups, pad_value = ctx.geometry
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    if sign_words is not None:
        a = unpack_conv_words(sign_words, ctx.x_shape[1], groups, g.dtype).contiguous(memory_format=fmt)
    elif x is not None:
        a = sign(x).to(g.dtype) if ctx.input_quantizer is not None else x.to(g.dtype)
    else:
        a = g.new_zeros(ctx.x_shape).contiguous(memory_format=fmt)
    # The weight in the input's memory format: cuDNN would copy a mismatched one over to it.
    # grad_weight comes back in it too, as nn.Conv2d's does.
    w = unpack_weight(words, ctx.weight_shape, g.dtype, fmt)
    if pad_value == 0.0 and pt == pb and pl == pr:
        cudnn_padding, crop = [pt, pl], False
    else:
        # The padding holds the constant pad_value: pad explicitly, then drop its gradient.
        a = F.pad(a, (pl, pr, pt, pb), value=pad_value)
        cudnn_padding, crop = [0, 0], True
    grad_a, grad_weight, _ = torch.ops.aten.convolution_backward(
        g, a, w, None, list(stride), cudnn_padding, list(dilation), False, [0, 0], groups, [need_x, need_w, False]
    )
    grad_x = None
    if need_x:
        H, W = ctx.x_shape[2:]
        grad_x = grad_a[:, :, pt : pt + H, pl : pl + W] if crop else grad_a
        if mask_words is not None:
            # SteSign.grad's select, on the saved mask: the same values.
            passes = unpack_conv_words(mask_words, ctx.x_shape[1], groups, torch.float32) < 0
            grad_x = torch.where(passes, grad_x, 0)
        elif ctx.input_quantizer is not None:
            grad_x = ctx.input_quantizer.grad(x, grad_x)
    return grad_x, grad_weight


def _conv(x, words, scale, bias, geometry, input_quantizer, out_dtype):
    """The forward op: W1A1 with an input quantizer, else W1A16; y in ``out_dtype``."""
    stride, padding, dilation, groups, pad_value = geometry
    return torch.ops.bnnops.binary_conv2d(
        x,
        words,
        bias,
        scale,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        pad_value,
        input_quantizer is not None,
        out_dtype,
    )


def binary_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    pad_value: float = 0.0,
    input_quantizer: SignQuantizer | str | None = "ste_sign",
    scale: torch.Tensor | None = None,
    weight_quantizer: SignQuantizer | str | None = None,
) -> torch.Tensor:
    """Binary 2-D convolution: ``conv2d(pad(q(x), pad_value), sign(W)) * scale + bias``.

    Args:
        x: (N, C, H, W) or unbatched (C, H, W), float32 / bfloat16 / float16, NCHW or
            channels_last (the output follows); the weight's dtype, or any float dtype under
            ``torch.autocast`` (x and bias are then cast to autocast's dtype, as nn.Conv2d does).
            With an input quantizer it is binarized inside the op (W1A1: exact integer sums); with
            ``input_quantizer=None`` it stays real (W1A16: e.g. a first layer).
        weight: a :class:`bnnops.BinaryTensor` (O, C/groups, kh, kw), read packed; or a dense
            float latent weight of that shape, binarized by ``weight_quantizer`` every call.
        bias: optional (O,) float tensor, added in the kernel's epilogue.
        stride, dilation, groups: as :func:`torch.nn.functional.conv2d`.
        padding: an int, a pair, "valid" or "same" (stride 1), as :class:`torch.nn.Conv2d`.
        pad_value: what the padding holds: 0.0 (zero padding) or +1.0 / -1.0 (larq's pad_values,
            which keep a binary layer's inputs exactly +-1).
        input_quantizer: a quantizer name or :class:`bnnops.quantizers.SignQuantizer`, or None
            for real inputs. Its surrogate gradient shapes grad_input.
        scale: optional (O,) float tensor multiplying each output channel (XNOR-Net's alpha),
            fused in the epilogue; learnable when it requires grad (then applied after the op, to
            its fp32 product: the same output bits either way).
        weight_quantizer: for a dense latent weight: a quantizer (default ``"ste_sign"``);
            ``"magnitude_aware_sign"`` multiplies ``scale`` by its per-channel mean |w|. Must be
            None for a BinaryTensor weight.

    Returns:
        (N, O, OH, OW) (or (O, OH, OW) for unbatched x) in x's dtype.

    Raises:
        DtypeError (a TypeError and a RuntimeError): a wrong type or dtype (x, weight, bias,
            scale), or x and weight (or bias) in different dtypes outside autocast.
        ShapeError (a ValueError and a RuntimeError): x not 3-D or 4-D, a weight not 4-D,
            channels that do not match the weight and groups, a bad geometry, bias or scale not (O,).
        DeviceError (a ValueError and a RuntimeError): tensors on different devices.
        ValueError: a bad pad value, an unknown quantizer, or a weight quantizer for a BinaryTensor.

    Gradients: x gets the transposed convolution of grad_out with the +-1 weight (padded positions
    get none) times the input quantizer's surrogate; the weight gets a dense float gradient of its
    logical shape (the convolution of q(x), padded with pad_value, with grad_out); bias the sum of
    grad_out.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DtypeError(f"binary_conv2d input must be a float32, bfloat16 or float16 tensor, got {got}")
    weight_shape, weight_dtype, _, weight_requires_grad = (
        metadata(weight) if isinstance(weight, torch.Tensor) else [None] * 4
    )
    if weight_dtype not in FLOAT_DTYPES:
        got = weight_dtype if weight_shape is not None else type(weight).__name__
        raise DtypeError(
            f"binary_conv2d weight must be a BinaryTensor or a float latent weight (O, C/groups, kh, kw), got {got}"
        )
    if len(weight_shape) != 4:
        raise ShapeError(f"binary_conv2d weight must be 4-D (O, C/groups, kh, kw), got shape {tuple(weight_shape)}")
    if x.dim() not in (3, 4):
        raise ShapeError(f"binary_conv2d input must be (N, C, H, W) or unbatched (C, H, W), got shape {tuple(x.shape)}")
    x, bias = autocast_inputs(x, weight_dtype, bias)
    if x.dim() == 3:
        # Unbatched (C, H, W), as nn.Conv2d takes it.
        return binary_conv2d(
            x[None],
            weight,
            bias,
            stride,
            padding,
            dilation,
            groups,
            pad_value=pad_value,
            input_quantizer=input_quantizer,
            scale=scale,
            weight_quantizer=weight_quantizer,
        )[0]
    if weight_shape[1] * groups != x.shape[1]:
        raise ShapeError(
            f"the input has {x.shape[1]} channels but the weight {tuple(weight_shape)} with "
            f"groups={groups} expects {weight_shape[1] * groups}"
        )
    iq = get_input_quantizer(input_quantizer)
    wq, words, scale = binarize_weight(weight, weight_quantizer, scale)
    stride, dilation = as_pair(stride, "stride"), as_pair(dilation, "dilation")
    geometry = (
        stride,
        conv_padding(padding, tuple(weight_shape[2:]), stride, dilation),
        dilation,
        groups,
        float(pad_value),
    )
    outside, op_scale, op_bias = split_epilogue(scale, bias, weight_shape[0], x.device)
    op_dtype = torch.float32 if outside else x.dtype
    if needs_autograd(x, weight_requires_grad, op_bias):
        y = _BinaryConv2dFunction.apply(
            x, weight, words, weight_shape, weight_dtype, op_scale, op_bias, geometry, iq, wq, op_dtype
        )
    else:
        # Nothing to differentiate through the convolution (inference): the op alone, no autograd node.
        y = _conv(x, words, op_scale, op_bias, geometry, iq, op_dtype)
    return apply_scale_bias(y, scale, bias, x.dtype) if outside else y


@implements_torch_function(F.conv2d)
def _f_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(x, binary_weight)`` (so also ``nn.Conv2d``): the W1A16 conv, weight read packed."""
    if not isinstance(weight, BinaryTensor) or isinstance(input, BinaryTensor) or isinstance(bias, BinaryTensor):
        return NotImplemented
    return binary_conv2d(input, weight, bias, stride, padding, dilation, groups, input_quantizer=None)
