"""Binary conv2d: the ``bnnops::binary_conv2d`` op and its reference, ``binary_conv2d`` and ``BinaryConv2d``.

``torch.ops.bnnops.binary_conv2d(x, weight, bias, scale, stride, padding, dilation, groups,
pad_value, binarize)`` computes, for ``x`` (N, C, H, W) and the packed words ``weight``
(O, kh, kw, ceil(Cg/32)) of a logical +-1 weight (O, Cg, kh, kw), Cg = C / groups
(layout: :mod:`bnnops.packing`),

    y = scale * conv2d(pad(a(x), padding, pad_value), w, stride, dilation, groups) + bias

per output channel, where a = sign (W1A1, ``binarize=True``; sign(0) = +1, the convolution is an exact
integer) or the identity (W1A16, ``binarize=False``), and ``pad`` pads with ``pad_value``: 0 is zero
padding; +1 / -1 (larq's ``pad_values``) keep every input of a binary layer exactly +-1. ``padding``
is (top, bottom, left, right). The output has x's dtype, is computed in fp32 (one rounding at the
end), and is channels_last when x is. CPU tensors run the reference below, CUDA tensors the Triton
implicit-GEMM kernel of ``bnnops.kernels.conv2d``, which reads the packed weight.

:func:`binary_conv2d` adds autograd and the nn.Conv2d-style arguments on top (a BinaryTensor or a
float latent weight, input and weight quantizers from :mod:`bnnops.quantizers`, padding "same"), and
:class:`BinaryConv2d` is the layer. ``F.conv2d`` (so ``nn.Conv2d``) on a BinaryTensor weight runs
the W1A16 op.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnnops import kernels
from bnnops.binary_tensor import TORCH_FUNCTIONS, BinaryTensor, metadata, pack_dense_state_entries
from bnnops.library import check_channel_vectors, contiguous, define, first_derivatives, needs_autograd, split_epilogue
from bnnops.packing import FLOAT_DTYPES, packed_length, unpack_signs_reference, unpack_weight
from bnnops.quantizers import autocast_inputs, binarize_weight, get_input_quantizer, get_quantizer, sign

__all__ = ["BinaryConv2d", "binary_conv2d", "binary_conv2d_reference", "conv_padding", "output_shape"]

PAD_VALUES = (0.0, 1.0, -1.0)


# The kernel launcher (bnnops.kernels.conv2d) states the output's shape and memory format too; it
# cannot be imported without triton, and the CPU path must work without it.
def _output_is_channels_last(x):
    # channels_last when x is channels_last-contiguous but not contiguous (as F.conv2d on CUDA).
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def output_shape(x_shape, weight_shape, stride, padding, dilation):
    """(N, O, OH, OW) of a conv of ``x_shape`` (N, C, H, W) with packed words of ``weight_shape``."""
    N, _, H, W = x_shape
    O, KH, KW, _ = weight_shape
    OH = (H + padding[0] + padding[1] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return N, O, OH, OW


def _check(x, weight, bias, scale, stride, padding, dilation, groups, pad_value):
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"binary_conv2d input must be a float32, bfloat16 or float16 tensor, got {got}")
    if x.dim() != 4:
        raise ValueError(f"binary_conv2d input must have rank 4 (N, C, H, W), got shape {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int32 or weight.dim() != 4:
        got = (weight.dtype, tuple(weight.shape)) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"binary_conv2d weight must be int32 packed words (O, kh, kw, ceil(Cg/32)), got {got}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError(
            f"stride and dilation need 2 values and padding 4 (top, bottom, left, right), got "
            f"stride={list(stride)}, padding={list(padding)}, dilation={list(dilation)}"
        )
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={list(stride)}, "
            f"padding={list(padding)}, dilation={list(dilation)}"
        )
    N, C, H, W = x.shape
    O, KH, KW, n_words = weight.shape
    if groups < 1 or C % groups or O % groups:
        raise ValueError(
            f"groups={groups} must be >= 1 and divide both the input channels ({C}) and the output channels ({O})"
        )
    Cg = C // groups
    if n_words != packed_length(Cg):
        raise ValueError(
            f"packed weight of shape {tuple(weight.shape)} holds {n_words} words per tap, but the input "
            f"has {C} channels in {groups} group(s): {Cg} per group needs {packed_length(Cg)} words"
        )
    if (
        H + padding[0] + padding[1] < dilation[0] * (KH - 1) + 1
        or W + padding[2] + padding[3] < dilation[1] * (KW - 1) + 1
    ):
        raise ValueError(
            f"kernel {KH}x{KW} (dilation {list(dilation)}) is larger than the padded input "
            f"{H + padding[0] + padding[1]}x{W + padding[2] + padding[3]}"
        )
    if pad_value not in PAD_VALUES:
        raise ValueError(f"pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")
    check_channel_vectors(O, x.device, bias=bias, scale=scale)
    if weight.device != x.device:
        raise ValueError(f"binary_conv2d weight is on {weight.device} but the input is on {x.device}")


def binary_conv2d_reference(
    x,
    weight,
    bias=None,
    scale=None,
    stride=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    groups=1,
    pad_value=0.0,
    binarize=True,
):
    """Pure-PyTorch ``bnnops::binary_conv2d`` (see the module docstring): F.conv2d in fp32 on the
    +-1 weight that ``weight``'s words hold, after padding with ``pad_value`` explicitly."""
    O, KH, KW, _ = weight.shape
    Cg = x.shape[1] // groups
    w = unpack_signs_reference(weight, Cg, torch.float32).permute(0, 3, 1, 2)
    a = torch.where(x < 0, -1.0, 1.0) if binarize else x.float()
    a = F.pad(a, (padding[2], padding[3], padding[0], padding[1]), value=pad_value)
    y = F.conv2d(a, w, None, stride, 0, dilation, groups)
    if scale is not None:
        y = y * scale.float().view(1, O, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, O, 1, 1)
    fmt = torch.channels_last if _output_is_channels_last(x) else torch.contiguous_format
    return y.to(x.dtype).contiguous(memory_format=fmt)


def _conv2d_cuda(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize):
    # The kernel reads words, bias and scale with unit stride along their last dimension.
    return kernels.load("conv2d").conv2d(
        x,
        weight.contiguous(),
        bias=contiguous(bias),
        scale=contiguous(scale),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
        binarize=binarize,
    )


def _conv2d_fake(x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize):
    fmt = torch.channels_last if _output_is_channels_last(x) else torch.contiguous_format
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


define(
    "binary_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, int[] stride, int[] padding, "
    "int[] dilation, int groups, float pad_value, bool binarize) -> Tensor",
    check=lambda x, weight, bias, scale, stride, padding, dilation, groups, pad_value, binarize: _check(
        x, weight, bias, scale, stride, padding, dilation, groups, pad_value
    ),
    reference=binary_conv2d_reference,
    cuda=_conv2d_cuda,
    fake=_conv2d_fake,
)


# ----------------------------------------------------------------------------- autograd and API


def _pair(v, what):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{what} must be an int or a pair of ints, got {v}")
    return v


def conv_padding(padding, kernel_size, stride, dilation):
    """(top, bottom, left, right) from nn.Conv2d's ``padding``: an int, a pair, "valid" or "same".

    "same" (stride 1 only, as in PyTorch) pads d*(k-1) in all, the odd one at the bottom/right.
    kernel_size, stride and dilation are ints or pairs.
    """
    kernel_size, stride, dilation = (
        _pair(kernel_size, "kernel_size"),
        _pair(stride, "stride"),
        _pair(dilation, "dilation"),
    )
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in torch.nn.Conv2d), got stride={stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    ph, pw = _pair(padding, "padding")
    return (ph, ph, pw, pw)


class _BinaryConv2dFunction(torch.autograd.Function):
    """y = conv(a(x), sign(weight)) * scale + bias with gradients for x, the weight and bias.

    The forward runs ``bnnops::binary_conv2d`` on the packed ``words``. ``weight`` is what receives
    the gradient: a BinaryTensor, or a dense latent weight whose signs are ``words``, of logical
    shape ``weight_shape`` and dtype ``weight_dtype`` (read once by :func:`binary_conv2d`). The backward
    runs cuDNN (``aten.convolution_backward``) on the +-1 values: grad_input (then the input
    quantizer's surrogate, as in :func:`bnnops.binary_linear`) and a dense float grad_weight, which
    is what Bop consumes. Padded positions are constants: they get no gradient, and with a pad value
    of +-1 they still contribute to grad_weight. scale takes no gradient here.
    """

    @staticmethod
    def forward(
        ctx, x, weight, words, weight_shape, weight_dtype, scale, bias, geometry, input_quantizer, weight_quantizer
    ):
        y = _conv(x, words, scale, bias, geometry, input_quantizer)
        latent = weight if weight_quantizer is not None else None
        ctx.save_for_backward(x, words, scale, latent)
        ctx.geometry = geometry
        ctx.input_quantizer = input_quantizer
        ctx.weight_quantizer = weight_quantizer
        ctx.weight_shape = weight_shape
        ctx.weight_dtype = weight_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, words, scale, latent = ctx.saved_tensors
        stride, (pt, pb, pl, pr), dilation, groups, pad_value = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[6]
        grad_x = grad_weight = grad_bias = None
        if need_x or need_w:
            g = grad_y * scale.view(1, -1, 1, 1).to(grad_y.dtype) if scale is not None else grad_y
            a = sign(x).to(g.dtype) if ctx.input_quantizer is not None else x.to(g.dtype)
            # The weight in the input's memory format: cuDNN would copy a mismatched one over to it.
            fmt = torch.channels_last if _output_is_channels_last(x) else torch.contiguous_format
            w = unpack_weight(words, ctx.weight_shape, g.dtype, fmt)
            if pad_value == 0.0 and pt == pb and pl == pr:
                cudnn_padding, crop = [pt, pl], False
            else:
                # The padding holds the constant pad_value: pad explicitly, then drop its gradient.
                a = F.pad(a, (pl, pr, pt, pb), value=pad_value)
                cudnn_padding, crop = [0, 0], True
            grad_a, grad_weight, _ = torch.ops.aten.convolution_backward(
                g,
                a,
                w,
                None,
                list(stride),
                cudnn_padding,
                list(dilation),
                False,
                [0, 0],
                groups,
                [need_x, need_w, False],
            )
            if need_x:
                grad_x = grad_a[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]] if crop else grad_a
                if ctx.input_quantizer is not None:
                    grad_x = ctx.input_quantizer.grad(x, grad_x)
                grad_x = grad_x.to(x.dtype)
            if need_w:
                if latent is not None:
                    grad_weight = ctx.weight_quantizer.grad(latent, grad_weight)
                grad_weight = grad_weight.to(ctx.weight_dtype)
        if need_b:
            grad_bias = grad_y.sum((0, 2, 3))
        grad_x, grad_weight = first_derivatives("binary_conv2d", grad_y, grad_x, grad_weight)
        return grad_x, grad_weight, None, None, None, None, grad_bias, None, None, None


def _conv(x, words, scale, bias, geometry, input_quantizer):
    """The forward op: W1A1 with an input quantizer, else W1A16."""
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
    )


def binary_conv2d(
    x,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    pad_value=0.0,
    input_quantizer="ste_sign",
    scale=None,
    weight_quantizer=None,
):
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
            fused in the epilogue; learnable when it requires grad.
        weight_quantizer: for a dense latent weight: a quantizer (default ``"ste_sign"``);
            ``"magnitude_aware_sign"`` multiplies ``scale`` by its per-channel mean |w|. Must be
            None for a BinaryTensor weight.

    Returns:
        (N, O, OH, OW) (or (O, OH, OW) for unbatched x) in x's dtype.

    Gradients: x gets the transposed convolution of grad_out with the +-1 weight (padded positions
    get none) times the input quantizer's surrogate; the weight gets a dense float gradient of its
    logical shape (the convolution of q(x), padded with pad_value, with grad_out); bias the sum of
    grad_out.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"binary_conv2d input must be a float32, bfloat16 or float16 tensor, got {got}")
    weight_shape, weight_dtype, _, weight_requires_grad = (
        metadata(weight) if isinstance(weight, torch.Tensor) else [None] * 4
    )
    if weight_dtype not in FLOAT_DTYPES or len(weight_shape) != 4:
        got = (weight_dtype, tuple(weight_shape)) if weight_shape is not None else type(weight).__name__
        raise TypeError(
            f"binary_conv2d weight must be a BinaryTensor or a float latent weight (O, C/groups, kh, kw), got {got}"
        )
    if x.dim() not in (3, 4):
        raise ValueError(f"binary_conv2d input must be (N, C, H, W) or unbatched (C, H, W), got shape {tuple(x.shape)}")
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
        raise ValueError(
            f"the input has {x.shape[1]} channels but the weight {tuple(weight_shape)} with "
            f"groups={groups} expects {weight_shape[1] * groups}"
        )
    iq = get_input_quantizer(input_quantizer)
    wq, words, scale = binarize_weight(weight, weight_quantizer, scale)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    geometry = (
        stride,
        conv_padding(padding, tuple(weight_shape[2:]), stride, dilation),
        dilation,
        groups,
        float(pad_value),
    )
    outside, op_scale, op_bias = split_epilogue(scale, bias, weight_shape[0], x.device)
    if needs_autograd(x, weight_requires_grad, op_bias):
        y = _BinaryConv2dFunction.apply(
            x, weight, words, weight_shape, weight_dtype, op_scale, op_bias, geometry, iq, wq
        )
    else:
        # Nothing to differentiate through the convolution (inference): the op alone, no autograd node.
        y = _conv(x, words, op_scale, op_bias, geometry, iq)
    if not outside:
        return y
    y = y.float() * scale.float().view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    return y.to(x.dtype)


def _f_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(x, binary_weight)`` (so also ``nn.Conv2d``): the W1A16 conv, weight read packed."""
    if not isinstance(weight, BinaryTensor) or isinstance(input, BinaryTensor) or isinstance(bias, BinaryTensor):
        return NotImplemented
    return binary_conv2d(input, weight, bias, stride, padding, dilation, groups, input_quantizer=None)


TORCH_FUNCTIONS[F.conv2d] = _f_conv2d


class BinaryConv2d(nn.Module):
    """A 2-D convolution with +-1 weights (and, by default, +-1 inputs) on the binary conv kernel.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device,
            dtype: as :class:`torch.nn.Conv2d` (padding may be "same" or "valid").
        padding_mode: only "zeros"; the padding's value is ``pad_value``.
        pad_value: 0.0 (zero padding) or +1.0 / -1.0 (larq's pad_values: the padding is a binary
            value, so every input of a binary layer stays exactly +-1).
        input_quantizer: binarizes the input (a name or SignQuantizer); None keeps real inputs
            (W1A16: a first layer).
        weight_quantizer: None (default): the weight is a packed :class:`bnnops.BinaryTensor`
            parameter, trained by Bop (:mod:`bnnops.optim`). A quantizer (e.g. ``"ste_sign"``):
            the weight is a float latent parameter binarized every forward (latent-weight training
            with a torch optimizer), still running the binary kernel.

    Init: like :class:`torch.nn.Conv2d` (Kaiming-uniform weight, uniform bias); the binary weight
    holds the signs of that init.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        device=None,
        dtype=None,
        *,
        pad_value=0.0,
        input_quantizer="ste_sign",
        weight_quantizer=None,
    ):
        super().__init__()
        if padding_mode != "zeros":
            raise ValueError(
                f"BinaryConv2d supports padding_mode='zeros' only, with the padding's value set by "
                f"pad_value (0, +1 or -1); got padding_mode={padding_mode!r}"
            )
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        if float(pad_value) not in PAD_VALUES:
            raise ValueError(f"pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        conv_padding(padding, self.kernel_size, self.stride, self.dilation)  # refuse bad padding now
        self.padding, self.groups, self.pad_value = padding, groups, float(pad_value)
        self.input_quantizer = get_input_quantizer(input_quantizer)
        self.weight_quantizer = get_quantizer(weight_quantizer)
        factory = dict(device=device, dtype=dtype)
        w = torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight = nn.Parameter(w if self.weight_quantizer is not None else BinaryTensor.from_float(w))
        self.register_load_state_dict_pre_hook(pack_dense_state_entries)
        if bias:
            fan_in = w[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_channels, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return binary_conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            pad_value=self.pad_value,
            input_quantizer=self.input_quantizer,
            weight_quantizer=self.weight_quantizer,
        )

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, pad_value={self.pad_value}, "
            f"input_quantizer={self.input_quantizer}, weight_quantizer={self.weight_quantizer}"
        )
