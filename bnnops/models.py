"""Reference binarized networks built from bnnops layers.

Every model takes ``weight_quantizer``: ``None`` (default) gives packed
:class:`bnnops.BinaryTensor` weights, trained by Bop; ``"ste_sign"`` gives float latent
weights binarized in every forward, the usual latent-weight training with Adam that the paper
compares Bop against. The architecture is the same either way. Each model carries
``input_shape`` (one sample, no batch dimension), so ``bnnops.summary(model)`` needs no shape.

- :func:`binarynet`: the CIFAR-10 VGG-style BinaryNet trained in the paper (Helwegen et al.
  2019, section 5.2; the layers of its code, ``bnn_optimization/models/binarynet.py``): six
  3x3 convolutions (128, 128, 256, 256, 512, 512 channels) and three dense layers (1024, 1024,
  classes), all with binary weights and no bias, each followed by batch norm without a scale
  (Keras ``scale=False``: only the shift trains). The first convolution sees the real image
  (W1A16) and has no padding; every other layer binarizes its input with ``ste_sign``,
  including the last dense layer, whose batch-normed output is the logits.
- :func:`birealnet18`: Bi-Real Net-18 (Liu et al. 2018, the paper's ImageNet model): a real
  7x7 stem, sixteen binary 3x3 convolutions each with batch norm and a real identity shortcut
  around it (downsampling shortcuts: 2x2 average pool, real 1x1 conv, batch norm), global
  average pool and a real linear classifier.
- :func:`small_bnn`: a BinaryNet-style network sized for 8x8 images (scikit-learn's digits).
- :func:`binary_mlp`: binary-weight MLP; with one hidden layer it is the teacher-student task's
  architecture (:func:`bnnops.data.teacher_student`), which it represents exactly.
- :func:`mnist1d_cnn`, :func:`mnist1d_mlp`: a BinaryNet-style 1-D CNN and a binary MLP for
  MNIST-1D (:func:`bnnops.data.mnist1d`), each with a width; :func:`mnist1d_float_cnn` and
  :func:`mnist1d_float_mlp` are the MNIST-1D paper's float CNN and MLP (greydanus/mnist1d), the
  float baselines (no binary weights, no ``weight_quantizer``; not in :data:`MODELS`).
"""

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnnops.nn import BinaryConv1d, BinaryConv2d, BinaryLinear, MaxPool2d

__all__ = [
    "MODELS",
    "binary_mlp",
    "binarynet",
    "birealnet18",
    "build",
    "mnist1d_cnn",
    "mnist1d_float_cnn",
    "mnist1d_float_mlp",
    "mnist1d_mlp",
    "small_bnn",
]


# Keras' BatchNormalization defaults (momentum 0.99 of the old average, epsilon 1e-3), in torch's
# terms, as the paper's code and larq-zoo build their models; larq-zoo's Bi-Real Net passes 0.8.
KERAS_BN = dict(momentum=0.01, eps=1e-3)
BIREAL_BN = dict(momentum=0.2, eps=1e-3)


def _bn(dims: int, channels: int, scale: bool, bn: dict[str, float] | None = None) -> nn.Module:
    """Batch norm after a binary layer, with ``bn`` (momentum, eps) or torch's defaults.
    ``scale=False`` is Keras' BatchNormalization(scale=False) of the paper's code: the scale stays 1
    (frozen), only the shift trains."""
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels, **(bn or {}))
    if not scale:
        bn.weight.requires_grad_(False)
    return bn


def _vgg_bnn(
    input_shape: Sequence[int],
    convs: Sequence[tuple[int, bool]],
    dense: Sequence[int],
    num_classes: int,
    first_padding: int,
    weight_quantizer: str | None,
    bn: dict[str, float] | None = None,
    first_kernel: int = 3,
    real_first: bool = False,
) -> nn.Sequential:
    """conv -> [maxpool 2] -> BN blocks, flatten, dense -> BN blocks; all weights binary; ``bn``:
    the batch norms' (momentum, eps) settings, torch's defaults if None. Images (C, H, W) get 3x3
    :class:`bnnops.nn.BinaryConv2d` and 2x2 :class:`bnnops.nn.MaxPool2d` pools (torch's output and
    gradient, one byte per output kept); signals (C, L) get size-3 :class:`bnnops.nn.BinaryConv1d`
    and ``nn.MaxPool1d(2)``.

    ``convs`` lists (out_channels, pool) per convolution; the first (size ``first_kernel``) sees
    real inputs with ``first_padding`` (and has real weights, a torch conv, with ``real_first``),
    the others (size 3) binarize their inputs and pad by 1 ('same').
    """
    dims = len(input_shape) - 1
    conv, pool_layer = (BinaryConv1d, nn.MaxPool1d) if dims == 1 else (BinaryConv2d, MaxPool2d)
    channels, size = input_shape[0], input_shape[1]
    layers = OrderedDict()
    for i, (out, pool) in enumerate(convs, 1):
        first = i == 1
        kernel = first_kernel if first else 3
        if first and real_first:
            real_conv = nn.Conv1d if dims == 1 else nn.Conv2d
            layers[f"conv{i}"] = real_conv(channels, out, kernel, padding=first_padding, bias=False)
        else:
            layers[f"conv{i}"] = conv(
                channels,
                out,
                kernel,
                padding=first_padding if first else 1,
                bias=False,
                input_quantizer=None if first else "ste_sign",
                weight_quantizer=weight_quantizer,
            )
        size = size - (kernel - 1) + 2 * (first_padding if first else 1)
        if pool:
            layers[f"pool{i}"] = pool_layer(2)
            size //= 2
        layers[f"bn{i}"] = _bn(2 if dims == 2 else 1, out, scale=False, bn=bn)
        channels = out
    layers["flatten"] = nn.Flatten()
    features = channels * size**dims
    for j, out in enumerate((*dense, num_classes), len(convs) + 1):
        layers[f"fc{j}"] = BinaryLinear(features, out, bias=False, weight_quantizer=weight_quantizer)
        layers[f"bn{j}"] = _bn(1, out, scale=False, bn=bn)
        features = out
    model = nn.Sequential(layers)
    model.input_shape = tuple(input_shape)
    return model


def binarynet(
    num_classes: int = 10,
    input_shape: Sequence[int] = (3, 32, 32),
    filters: int = 128,
    dense_units: int = 1024,
    weight_quantizer: str | None = None,
) -> nn.Sequential:
    """BinaryNet for CIFAR-10 as trained in the paper (module docstring); 10.4M binary weights at
    the defaults; batch norm with Keras' defaults, as in the paper's code. Input (N, 3, 32, 32) ->
    logits (N, num_classes). Weights start from nn.Conv2d / nn.Linear's init, not Keras' Glorot
    (under Bop only the signs matter, and both are symmetric)."""
    convs = [
        (filters, False),
        (filters, True),
        (2 * filters, False),
        (2 * filters, True),
        (4 * filters, False),
        (4 * filters, True),
    ]
    return _vgg_bnn(input_shape, convs, (dense_units, dense_units), num_classes, 0, weight_quantizer, KERAS_BN)


def small_bnn(
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 8, 8),
    filters: int = 32,
    dense_units: int = 128,
    weight_quantizer: str | None = None,
) -> nn.Sequential:
    """A BinaryNet-style network for 8x8 images: three 3x3 convolutions (filters, filters,
    2*filters; the first on the real image, padded 'same') with two 2x2 max pools, then dense
    layers (dense_units, classes); every weight binary, batch norm after every layer."""
    convs = [(filters, False), (filters, True), (2 * filters, True)]
    return _vgg_bnn(input_shape, convs, (dense_units,), num_classes, 1, weight_quantizer)


def binary_mlp(
    num_classes: int = 4,
    input_shape: Sequence[int] = (32,),
    hidden: Sequence[int] = (32,),
    weight_quantizer: str | None = None,
) -> nn.Sequential:
    """Binary-weight MLP: flatten, then per hidden width a bias-free binary linear layer and batch
    norm; the first layer sees the real input (W1A16), the others binarize theirs (ste_sign).

    The defaults are the teacher-student task's sizes. Batch norm here keeps its scale: with one
    hidden layer the model then represents the teacher ``argmax(W2 sign(W1 x))`` of
    :func:`bnnops.data.teacher_student` exactly (the first batch norm can move its sign
    threshold back to 0, the last can scale every logit alike).
    """
    features = math.prod(input_shape)
    layers = OrderedDict(flatten=nn.Flatten())
    for i, out in enumerate((*hidden, num_classes), 1):
        layers[f"fc{i}"] = BinaryLinear(
            features, out, bias=False, input_quantizer=None if i == 1 else "ste_sign", weight_quantizer=weight_quantizer
        )
        layers[f"bn{i}"] = _bn(1, out, scale=True)
        features = out
    model = nn.Sequential(layers)
    model.input_shape = tuple(input_shape)
    return model


class _BiRealBlock(nn.Module):
    """Binary 3x3 conv -> batch norm, plus a real shortcut (identity, or 2x2 average pool ->
    real 1x1 conv -> batch norm when the width doubles and the resolution halves)."""

    def __init__(
        self, in_channels: int, out_channels: int, input_quantizer: str | None, weight_quantizer: str | None
    ) -> None:
        super().__init__()
        stride = 1 if in_channels == out_channels else 2
        self.conv = BinaryConv2d(
            in_channels,
            out_channels,
            3,
            stride=stride,
            padding=1,
            bias=False,
            input_quantizer=input_quantizer,
            weight_quantizer=weight_quantizer,
        )
        self.bn = nn.BatchNorm2d(out_channels, **BIREAL_BN)
        self.shortcut = nn.Identity()
        if stride != 1:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(2, ceil_mode=True),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels, **BIREAL_BN),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.shortcut(x)


def birealnet18(
    num_classes: int = 1000,
    input_shape: Sequence[int] = (3, 224, 224),
    filters: int = 64,
    input_quantizer: str | None = "approx_sign",
    weight_quantizer: str | None = None,
) -> nn.Sequential:
    """Bi-Real Net-18 (module docstring). ``input_quantizer`` of the binary convolutions:
    Bi-Real Net's ``approx_sign`` by default. Input (N, 3, H, W) -> logits (N, num_classes).

    Differences from larq-zoo's ``BiRealNet``, which change nothing in the shapes: stride-2 layers
    pad symmetrically (torch) where TF's "same" pads one more at the bottom/right, so ported
    weights would see a grid shifted by one pixel; real layers start from torch's init, not
    Glorot; a latent-weight baseline takes ``weight_quantizer`` as given (larq-zoo uses
    magnitude_aware_sign)."""
    layers = OrderedDict(
        stem=nn.Conv2d(input_shape[0], filters, 7, stride=2, padding=3, bias=False),
        stem_bn=nn.BatchNorm2d(filters, **BIREAL_BN),
        stem_pool=nn.MaxPool2d(3, stride=2, padding=1),
    )
    widths = [filters] * 4 + [w for k in (2, 4, 8) for w in [k * filters] * 4]
    for i, (cin, cout) in enumerate(zip([filters] + widths[:-1], widths), 1):
        layers[f"block{i}"] = _BiRealBlock(cin, cout, input_quantizer, weight_quantizer)
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(widths[-1], num_classes))
    model = nn.Sequential(layers)
    model.input_shape = tuple(input_shape)
    return model


def mnist1d_cnn(
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 40),
    width: int = 64,
    dense_units: Sequence[int] = (),
    weight_quantizer: str | None = None,
) -> nn.Sequential:
    """A BinaryNet-style 1-D CNN for MNIST-1D (signals (1, 40)): a real size-5 convolution of the
    real signal (an ``nn.Conv1d``, no bias), then three size-3 binary convolutions (W1A1), all of
    ``width`` channels, a max pool of 2 after the second and the fourth convolution (40 -> 20 ->
    10 positions), batch norm (shift only) after each; then the binary dense layers
    ``dense_units`` and the binary classifier, each with batch norm. ``9 w^2 + 10 w classes``
    binary weights and ``5 w`` real ones for width w without dense layers.

    The first layer is real (as XNOR-Net and Bi-Real Net keep theirs): with one input channel, a
    binary size-k filter is one of 2^k sign patterns, and on the validation split a binary first
    layer (size 3 or 9) trained far slower (bench/results/mnist1d/README.md)."""
    convs = [(width, False), (width, True), (width, False), (width, True)]
    return _vgg_bnn(
        input_shape, convs, tuple(dense_units), num_classes, 2, weight_quantizer, first_kernel=5, real_first=True
    )


def mnist1d_mlp(
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 40),
    width: int = 256,
    weight_quantizer: str | None = None,
) -> nn.Sequential:
    """A binary MLP for MNIST-1D: :func:`binary_mlp` with two hidden layers of ``width`` (the
    MNIST-1D paper's MLP has two hidden layers of 100, real): real input, binary weights, binary
    hidden activations, batch norm after each layer."""
    return binary_mlp(num_classes, input_shape, (width, width), weight_quantizer)


def mnist1d_float_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 40), width: int = 25) -> nn.Sequential:
    """The MNIST-1D paper's float CNN (``ConvBase`` of greydanus/mnist1d, 94% in the paper at
    width 25): Conv1d(1, w, 5, stride 2, padding 1) -> ReLU -> twice Conv1d(w, w, 3, stride 2,
    padding 1) -> ReLU, flatten, Linear(w * 5, classes) (length 40 -> 19 -> 10 -> 5)."""
    length = input_shape[-1]
    layers = OrderedDict()
    channels = input_shape[0]
    for i, (k, name) in enumerate(((5, "conv1"), (3, "conv2"), (3, "conv3"))):
        layers[name] = nn.Conv1d(channels, width, k, stride=2, padding=1)
        layers[f"relu{i + 1}"] = nn.ReLU()
        length = (length + 2 - k) // 2 + 1
        channels = width
    layers.update(flatten=nn.Flatten(), fc=nn.Linear(width * length, num_classes))
    model = nn.Sequential(layers)
    model.input_shape = tuple(input_shape)
    return model


def mnist1d_float_mlp(num_classes: int = 10, input_shape: Sequence[int] = (1, 40), width: int = 100) -> nn.Sequential:
    """The MNIST-1D paper's float MLP (``MLPBase``, 68% in the paper): flatten, Linear(40, w) ->
    ReLU -> Linear(w, w) -> ReLU -> Linear(w, classes)."""
    model = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(math.prod(input_shape), width),
            relu1=nn.ReLU(),
            fc2=nn.Linear(width, width),
            relu2=nn.ReLU(),
            fc3=nn.Linear(width, num_classes),
        )
    )
    model.input_shape = tuple(input_shape)
    return model


# Each model's one name, in Python and on the command line (``--model``): its function's name.
MODELS: dict[str, Callable[..., nn.Sequential]] = {
    f.__name__: f for f in (binarynet, birealnet18, small_bnn, binary_mlp, mnist1d_cnn, mnist1d_mlp)
}


def build(
    name: str, input_shape: Sequence[int], num_classes: int, weight_quantizer: str | None = None
) -> nn.Sequential:
    """The model called ``name`` (a key of :data:`MODELS`) for inputs of ``input_shape`` (one
    sample) and ``num_classes`` classes, at its default width."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape), weight_quantizer=weight_quantizer)
