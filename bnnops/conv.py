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

import bnnops.ops.backward  # defines the backward ops this module calls
import bnnops.ops.conv  # noqa: F401  (defines torch.ops.bnnops.binary_conv2d, which this module calls)
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
from bnnops.ops.checks import DtypeError, ShapeError
from bnnops.ops.library import FLOAT_DTYPES, call
from bnnops.ops.reference import output_is_channels_last
from bnnops.packing import packed_length, unpack_weight
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

    x is float (N, C, H, W), or int32 sign words (N, H, W, groups * ceil(Cg/32)) of a logical
    input ``x_shape`` (then no gradient for x, channels_last results).

    Saved for backward (:mod:`bnnops.layer_common`): with a mask-only input quantizer
    (``ste_sign``) x's sign words (for grad_weight) and pass-mask words (for grad_input), per-group
    channels-last words, no float x: on CUDA (and in a compiled graph) the forward packs x once and
    convolves its sign words (``bnnops::binary_conv2d_packed``, the same output bits), so float x
    is read once; in eager CPU code it convolves float x (``bnnops::binary_conv2d``: the packed route's reference would unpack the
    words again) and packs the words it keeps. Packed x
    is its own sign words. Otherwise x if a gradient needs it. The backward reads the words
    through the ops of :mod:`bnnops.ops.backward` (CUDA: the launchers of
    ``bnnops.kernels.conv2d_backward``; CPU: their references), x through cuDNN / ATen
    (``aten.convolution_backward``).
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
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dense_x = sign_words = mask_words = None
        channels = weight_shape[1] * geometry[3]
        if x.dtype == torch.int32:
            y = _conv(x, words, scale, bias, geometry, input_quantizer, out_dtype, channels)
            sign_words = x if need_w else None
            ctx.x_shape, ctx.channels_last = (x.shape[0], channels, x.shape[1], x.shape[2]), True
        else:
            ctx.x_shape, ctx.channels_last = tuple(x.shape), output_is_channels_last(x)
            if input_quantizer is not None and input_quantizer.saves_mask_only:
                y, sign_words, mask_words = pack_and_multiply(
                    x,
                    input_quantizer.clip_value,
                    geometry[3],
                    need_w,
                    need_x,
                    lambda a: _conv(
                        a, words, scale, bias, geometry, input_quantizer, out_dtype, channels, ctx.channels_last
                    ),
                )
            else:
                y = _conv(x, words, scale, bias, geometry, input_quantizer, out_dtype)
                if need_w or (need_x and input_quantizer is not None):
                    dense_x = x
        latent = weight if weight_quantizer is not None else None
        ctx.save_for_backward(dense_x, sign_words, mask_words, words, scale, latent)
        ctx.x_dtype = x.dtype
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
            if x is None:
                grad_x, grad_weight = _packed_grads(ctx, g, words, sign_words, mask_words, need_x, need_w)
            else:
                grad_x, grad_weight = _grads_aten(ctx, g, x, words, need_x, need_w)
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


def _packed_grads(ctx, g, words, sign_words, mask_words, need_x, need_w):
    """(grad_x, grad_weight) from the saved words by the ops of :mod:`bnnops.ops.backward` (in eager
    CPU code, both at once: their references in one call); grad_x in x's dtype and memory format,
    grad_weight in g's dtype. With no mask words (W1A16 with a frozen weight: no input values
    needed) grad_x is unmasked."""
    stride, padding, dilation, groups, pad_value = ctx.geometry
    geometry = (list(stride), list(padding), list(dilation), groups)
    if need_x and need_w and fuses_references((g, words, sign_words, mask_words)):
        # Plain eager CPU (where call() would skip the dispatcher): both references' products in one
        # aten.convolution_backward (the same bits). Modes, profilers and subclasses see the two ops.
        return backward_reference.conv2d_grads_reference(
            g, words, sign_words, mask_words, list(ctx.x_shape), *geometry, pad_value, ctx.x_dtype, ctx.channels_last
        )
    grad_x = grad_weight = None
    if need_x:
        grad_x = call(
            torch.ops.bnnops.binary_conv2d_grad_input.default,
            g,
            words,
            mask_words,
            list(ctx.x_shape),
            *geometry,
            ctx.x_dtype,
            ctx.channels_last,
        )
    if need_w:
        grad_weight = call(
            torch.ops.bnnops.binary_conv2d_grad_weight.default,
            g,
            sign_words,
            list(ctx.weight_shape),
            *geometry,
            pad_value,
            None,
            ctx.channels_last,
        )
    return grad_x, grad_weight


def _grads_aten(ctx, g, x, words, need_x, need_w):
    """(grad_x, grad_weight) by ``aten.convolution_backward`` on the +-1 weight and a(x), in g's dtype.

    a(x) is sign(x) with an input quantizer, x for W1A16; the input quantizer's surrogate
    (``quantizer.grad(x, .)``) is applied to grad_x.
    """
    stride, (pt, pb, pl, pr), dilation, groups, pad_value = ctx.geometry
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    a = sign(x).to(g.dtype) if ctx.input_quantizer is not None else x.to(g.dtype)
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
        if ctx.input_quantizer is not None:
            grad_x = ctx.input_quantizer.grad(x, grad_x)
    return grad_x, grad_weight


# (stride, padding, dilation, kernel size) -> (stride, (top, bottom, left, right), dilation): the
# normalized geometry of every call whose arguments are ints, strings and tuples of ints (the
# argument types are part of the key, so a call that must fail never hits an entry).
_GEOMETRY: dict[tuple, tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]] = {}


def _exact(v: object) -> bool:
    """Whether v can be part of a geometry cache key: an int, a str or a tuple of ints (exact
    types: not a bool, a float or a list, whose equal values could stand for a call that fails)."""
    t = type(v)
    if t is int or t is str:
        return True
    return t is tuple and all(type(e) is int for e in v)


def _geometry(stride, padding, dilation, kernel_size):
    """(stride pair, (top, bottom, left, right), dilation pair) from nn.Conv2d's arguments (as
    :func:`as_pair` and :func:`conv_padding`, which raise on bad ones), cached per argument values;
    ``kernel_size`` is the weight's (a tuple of ints)."""
    key = (stride, padding, dilation, kernel_size)
    cacheable = _exact(stride) and _exact(padding) and _exact(dilation)
    geometry = _GEOMETRY.get(key) if cacheable else None
    if geometry is None:
        stride, dilation = as_pair(stride, "stride"), as_pair(dilation, "dilation")
        geometry = (stride, conv_padding(padding, kernel_size, stride, dilation), dilation)
        if cacheable and len(_GEOMETRY) < 4096:
            _GEOMETRY[key] = geometry
    return geometry


def _conv(x, words, scale, bias, geometry, input_quantizer, out_dtype, channels=None, channels_last=True):
    """The forward op: W1A1 with an input quantizer, else W1A16; y in ``out_dtype``. int32 x is sign
    words of ``channels`` input channels (W1A1, ``bnnops::binary_conv2d_packed``), the output
    channels_last when ``channels_last``."""
    stride, padding, dilation, groups, pad_value = geometry
    shape = (list(stride), list(padding), list(dilation), groups, pad_value)
    if x.dtype == torch.int32:
        op = torch.ops.bnnops.binary_conv2d_packed.default
        return call(op, x, words, channels, bias, scale, *shape, channels_last, out_dtype)
    return call(
        torch.ops.bnnops.binary_conv2d.default, x, words, bias, scale, *shape, input_quantizer is not None, out_dtype
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
            ``input_quantizer=None`` it stays real (W1A16: e.g. a first layer). int32 x is taken as
            packed sign words (N, H, W, groups * ceil(Cg/32)) (or unbatched (H, W, ...)), Cg =
            C / groups, each group starting a new word: word [n, h, w, g * ceil(Cg/32) + v] bit j
            holds the sign of channel g * Cg + 32 v + j (bit 1: -1; the layout of
            ``bnnops.kernels.saved_activations.pack_sign_and_mask_conv``). The channel count
            comes from the weight and groups; the product is W1A1 whatever the input quantizer,
            x gets no gradient, and the output is float32 and channels_last.
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
        (N, O, OH, OW) (or (O, OH, OW) for unbatched x) in x's dtype (float32 for packed x).

    Raises:
        DtypeError (a TypeError and a RuntimeError): a wrong type or dtype (x, weight, bias,
            scale), or x and weight (or bias) in different dtypes outside autocast.
        ShapeError (a ValueError and a RuntimeError): x not 3-D or 4-D, a weight not 4-D,
            channels (or, for packed x, words per pixel) that do not match the weight and groups,
            a bad geometry, bias or scale not (O,).
        DeviceError (a ValueError and a RuntimeError): tensors on different devices.
        ValueError: a bad pad value, an unknown quantizer, or a weight quantizer for a BinaryTensor.

    Gradients: x gets the transposed convolution of grad_out with the +-1 weight (padded positions
    get none) times the input quantizer's surrogate; the weight gets a dense float gradient of its
    logical shape (the convolution of q(x), padded with pad_value, with grad_out); bias the sum of
    grad_out.
    """
    if not isinstance(x, torch.Tensor) or (x.dtype not in FLOAT_DTYPES and x.dtype != torch.int32):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DtypeError(
            f"binary_conv2d input must be a float32, bfloat16 or float16 tensor (or int32 packed sign words), got {got}"
        )
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
    unbatched = x.dim() == 3
    if unbatched:
        # Unbatched (C, H, W), as nn.Conv2d takes it: a batch of one, the batch dim dropped at the end.
        x = x[None]
    if x.dtype == torch.int32:
        words_per_pixel = groups * packed_length(weight_shape[1])
        if x.shape[-1] != words_per_pixel:
            raise ShapeError(
                f"packed input (N, H, W, words) = {tuple(x.shape)} holds {x.shape[-1]} words per pixel, but the "
                f"weight {tuple(weight_shape)} with groups={groups} needs groups * ceil(C/groups/32) = "
                f"{words_per_pixel} (each group starts a word; pass 0/1 or +-1 values as floats)"
            )
    elif weight_shape[1] * groups != x.shape[1]:
        raise ShapeError(
            f"the input has {x.shape[1]} channels but the weight {tuple(weight_shape)} with "
            f"groups={groups} expects {weight_shape[1] * groups}"
        )
    iq = get_input_quantizer(input_quantizer)
    wq, words, scale = binarize_weight(weight, weight_quantizer, scale)
    geometry = (*_geometry(stride, padding, dilation, tuple(weight_shape[2:])), groups, float(pad_value))
    out_dtype = x.dtype if x.dtype in FLOAT_DTYPES else torch.float32
    outside, op_scale, op_bias = split_epilogue(scale, bias, weight_shape[0], x.device)
    op_dtype = torch.float32 if outside else out_dtype
    if needs_autograd(x, weight_requires_grad, op_bias):
        y = _BinaryConv2dFunction.apply(
            x, weight, words, weight_shape, weight_dtype, op_scale, op_bias, geometry, iq, wq, op_dtype
        )
    else:
        # Nothing to differentiate through the convolution (inference): the op alone, no autograd node.
        y = _conv(x, words, op_scale, op_bias, geometry, iq, op_dtype, weight_shape[1] * groups)
    if outside:
        y = apply_scale_bias(y, scale, bias, out_dtype)
    return y[0] if unbatched else y


@implements_torch_function(F.conv2d)
def _f_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(x, binary_weight)`` (so also ``nn.Conv2d``): the W1A16 conv, weight read packed."""
    if not isinstance(weight, BinaryTensor) or isinstance(input, BinaryTensor) or isinstance(bias, BinaryTensor):
        return NotImplemented
    return binary_conv2d(input, weight, bias, stride, padding, dilation, groups, input_quantizer=None)
