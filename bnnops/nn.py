"""Binary layers (``bnnops.nn``): drop-in modules that run the bnnops ops.

- :class:`BinaryLinear`: binary (or binary-weight) linear layer, on :func:`bnnops.binary_linear`.
- :class:`BinaryConv1d`: binary (or binary-weight) 1-D convolution, on :func:`bnnops.binary_conv1d`.
- :class:`BinaryConv2d`: binary (or binary-weight) 2-D convolution, on :func:`bnnops.binary_conv2d`.
- :class:`MaxPool2d`: ``torch.nn.MaxPool2d`` bit for bit, keeping one uint8 per output for
  backward when the windows do not overlap (:mod:`bnnops.pooling`).

Without a weight quantizer the weight is a packed :class:`bnnops.BinaryTensor` parameter, trained
by Bop (:mod:`bnnops.optim`); with one (e.g. ``"ste_sign"``) it is a float latent parameter
binarized every forward (latent-weight training with a torch optimizer), still on the binary ops.
Either layer loads a state dict holding a dense float weight by packing its signs.

Both follow torch's module conventions: factory kwargs (``device``, ``dtype``), ``reset_parameters``
(so a layer built on the meta device, then ``to_empty``, initializes as FSDP does),
``state_dict`` / pickling, ``to()``, memory formats (the output and the gradients follow the
input's), and errors that are RuntimeErrors where ``nn.Linear`` / ``nn.Conv2d`` raise one
(:mod:`bnnops.ops.checks`); tests/test_module_conventions.py checks each on every constructor
argument.
"""

from collections.abc import Sequence

import torch
from torch import nn

from bnnops.binary_tensor import BinaryTensor, pack_dense_state_entries
from bnnops.conv import as_pair, binary_conv2d, conv_padding
from bnnops.conv1d import as_single, binary_conv1d, conv1d_geometry
from bnnops.layer_common import reset_weight_and_bias
from bnnops.linear import binary_linear
from bnnops.ops.checks import ShapeError
from bnnops.ops.conv import PAD_VALUES
from bnnops.packing import packed_weight_shape
from bnnops.pooling import MaxPool2d
from bnnops.quantizers import SignQuantizer, get_input_quantizer, get_quantizer

__all__ = ["BinaryConv1d", "BinaryConv2d", "BinaryLinear", "MaxPool2d"]


class BinaryLinear(nn.Module):
    """A linear layer with +-1 weights (and, by default, +-1 inputs) on the binary GEMM kernels.

    Args:
        in_features, out_features, bias: as :class:`torch.nn.Linear`.
        input_quantizer: binarizes the input (a name or SignQuantizer); None keeps real inputs
            (W1A16: first/last layers, binary-weight networks).
        weight_quantizer: None (default): the weight is a packed :class:`bnnops.BinaryTensor`
            parameter. A quantizer: the weight is a float latent parameter (see the module
            docstring).
        device, dtype: as :class:`torch.nn.Linear`.

    Init: :meth:`reset_parameters`, as :class:`torch.nn.Linear`'s (Kaiming-uniform weight, uniform
    bias; the same draws for the same seed); the binary weight holds the signs of that init.

    Raises:
        ValueError: an unknown quantizer, or a weight quantizer as the input quantizer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_quantizer: SignQuantizer | str | None = "ste_sign",
        weight_quantizer: SignQuantizer | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        _init_weight_and_bias(self, (out_features, in_features), bias, input_quantizer, weight_quantizer, device, dtype)

    def reset_parameters(self) -> None:
        """Initialize weight and bias in place as :meth:`torch.nn.Linear.reset_parameters` does
        (:func:`bnnops.layer_common.reset_weight_and_bias`); a binary weight takes the signs."""
        reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`bnnops.binary_linear` of x (..., in_features) -> (..., out_features)."""
        return binary_linear(
            x,
            self.weight,
            self.bias,
            input_quantizer=self.input_quantizer,
            scale=self._buffers.get("scale"),
            weight_quantizer=self.weight_quantizer,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"input_quantizer={self.input_quantizer}, weight_quantizer={self.weight_quantizer}"
        )


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
            parameter. A quantizer: the weight is a float latent parameter (see the module
            docstring).

    Init: :meth:`reset_parameters`, as :class:`torch.nn.Conv2d`'s (Kaiming-uniform weight, uniform
    bias; the same draws for the same seed); the binary weight holds the signs of that init.

    Raises:
        ShapeError (a ValueError): groups that do not divide both channel counts, a bad kernel
            size, stride, dilation or padding (as :func:`bnnops.conv.conv_padding`).
        ValueError: a padding_mode other than "zeros", a pad_value other than 0, +1, -1, an
            unknown quantizer, or a weight quantizer as the input quantizer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        pad_value: float = 0.0,
        input_quantizer: SignQuantizer | str | None = "ste_sign",
        weight_quantizer: SignQuantizer | str | None = None,
    ):
        super().__init__()
        _check_conv_arguments("BinaryConv2d", in_channels, out_channels, groups, padding_mode, pad_value)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride, self.dilation = as_pair(stride, "stride"), as_pair(dilation, "dilation")
        conv_padding(padding, self.kernel_size, self.stride, self.dilation)  # refuse a bad padding at construction
        self.padding, self.groups, self.pad_value = padding, groups, float(pad_value)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        _init_weight_and_bias(self, shape, bias, input_quantizer, weight_quantizer, device, dtype)

    def reset_parameters(self) -> None:
        """Initialize weight and bias in place as :meth:`torch.nn.Conv2d.reset_parameters` does
        (:func:`bnnops.layer_common.reset_weight_and_bias`); a binary weight takes the signs."""
        reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`bnnops.binary_conv2d` of x (N, C, H, W) or (C, H, W) with the layer's settings."""
        return _convolve(self, binary_conv2d, x)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, pad_value={self.pad_value}, "
            f"input_quantizer={self.input_quantizer}, weight_quantizer={self.weight_quantizer}"
        )


def _empty_weight(
    shape: tuple[int, ...], binary: bool, device: torch.device | str | None, dtype: torch.dtype | None
) -> nn.Parameter:
    """An uninitialized weight parameter of logical ``shape``: a :class:`BinaryTensor` (``binary``)
    or a float latent weight, on ``device`` in ``dtype`` (torch's defaults for None, as the
    factory kwargs of nn layers); ``reset_parameters`` fills it."""
    dtype = dtype or torch.get_default_dtype()
    if not binary:
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    words = torch.empty(packed_weight_shape(shape), dtype=torch.int32, device=device)
    return nn.Parameter(BinaryTensor(words, shape, dtype))


def _init_weight_and_bias(
    layer: nn.Module,
    shape: tuple[int, ...],
    bias: bool,
    input_quantizer: SignQuantizer | str | None,
    weight_quantizer: SignQuantizer | str | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> None:
    """What every binary layer's constructor ends with: its quantizers, an uninitialized weight of
    logical ``shape`` (packed or latent, :func:`_empty_weight`), the hook that packs a dense state
    dict weight, the bias (shape[0],) or None, then ``reset_parameters``."""
    layer.input_quantizer = get_input_quantizer(input_quantizer)
    layer.weight_quantizer = get_quantizer(weight_quantizer)
    layer.weight = _empty_weight(shape, layer.weight_quantizer is None, device, dtype)
    layer.register_load_state_dict_pre_hook(pack_dense_state_entries)
    if bias:
        layer.bias = nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype))
    else:
        layer.register_parameter("bias", None)
    layer.reset_parameters()


def _convolve(layer: nn.Module, convolution, x: torch.Tensor) -> torch.Tensor:
    """``convolution`` (:func:`bnnops.binary_conv1d` / :func:`bnnops.binary_conv2d`) of x with a conv
    layer's settings, and its ``scale`` buffer where it has one (:mod:`bnnops.scaled`)."""
    return convolution(
        x,
        layer.weight,
        layer.bias,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        pad_value=layer.pad_value,
        input_quantizer=layer.input_quantizer,
        scale=layer._buffers.get("scale"),
        weight_quantizer=layer.weight_quantizer,
    )


def _check_conv_arguments(
    layer: str, in_channels: int, out_channels: int, groups: int, padding_mode: str, pad_value: float
) -> None:
    """Refuse a padding_mode other than "zeros", groups that do not divide both channel counts,
    and a pad_value other than 0, +1, -1 (ShapeError for groups, else ValueError)."""
    if padding_mode != "zeros":
        raise ValueError(
            f"{layer} supports padding_mode='zeros' only, with the padding's value set by "
            f"pad_value (0, +1 or -1); got padding_mode={padding_mode!r}"
        )
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ShapeError(f"groups={groups} must divide in_channels ({in_channels}) and out_channels ({out_channels})")
    if float(pad_value) not in PAD_VALUES:
        raise ValueError(f"pad_value must be 0.0, 1.0 or -1.0, got {pad_value}")


class BinaryConv1d(nn.Module):
    """A 1-D convolution with +-1 weights (and, by default, +-1 inputs), on :func:`bnnops.binary_conv1d`
    (the binary conv kernel on the (N, C, 1, L) view), larq's ``QuantConv1D``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device,
            dtype: as :class:`torch.nn.Conv1d` (padding may be "same" or "valid"); size arguments
            are stored as 1-tuples, as nn.Conv1d's.
        padding_mode: only "zeros"; the padding's value is ``pad_value``.
        pad_value: 0.0 (zero padding) or +1.0 / -1.0 (larq's pad_values).
        input_quantizer: binarizes the input (a name or SignQuantizer); None keeps real inputs
            (W1A16: a first layer).
        weight_quantizer: None (default): the weight is a packed :class:`bnnops.BinaryTensor`
            parameter (O, C/groups, k). A quantizer: the weight is a float latent parameter.

    Init: :meth:`reset_parameters`, as :class:`torch.nn.Conv1d`'s (the same draws for the same
    seed); the binary weight holds the signs of that init. A state dict with a dense float weight
    (an ``nn.Conv1d``'s, a latent-weight layer's) loads by packing its signs.

    Raises:
        ShapeError (a ValueError): groups that do not divide both channel counts, a bad kernel
            size, stride, dilation or padding.
        ValueError: a padding_mode other than "zeros", a pad_value other than 0, +1, -1, an
            unknown quantizer, or a weight quantizer as the input quantizer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        pad_value: float = 0.0,
        input_quantizer: SignQuantizer | str | None = "ste_sign",
        weight_quantizer: SignQuantizer | str | None = None,
    ):
        super().__init__()
        _check_conv_arguments("BinaryConv1d", in_channels, out_channels, groups, padding_mode, pad_value)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (as_single(kernel_size, "kernel_size"),)
        self.stride, self.dilation = (as_single(stride, "stride"),), (as_single(dilation, "dilation"),)
        # Refuse a bad padding at construction.
        conv1d_geometry(self.kernel_size, self.stride, padding, self.dilation)
        self.padding = padding if isinstance(padding, str) else (as_single(padding, "padding"),)
        self.groups, self.pad_value = groups, float(pad_value)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        _init_weight_and_bias(self, shape, bias, input_quantizer, weight_quantizer, device, dtype)

    def reset_parameters(self) -> None:
        """Initialize weight and bias in place as :meth:`torch.nn.Conv1d.reset_parameters` does
        (:func:`bnnops.layer_common.reset_weight_and_bias`); a binary weight takes the signs."""
        reset_weight_and_bias(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`bnnops.binary_conv1d` of x (N, C, L) or (C, L) with the layer's settings."""
        return _convolve(self, binary_conv1d, x)

    extra_repr = BinaryConv2d.extra_repr  # the same attributes, 1-tuples for the sizes
