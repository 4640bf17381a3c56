"""``bnnops.convert``: a trained model's binary layers as packed bnnops layers, for inference.

In the spirit of torchao's ``quantize_(model, config, filter_fn)``, with one difference: conversion
never changes what the model computes. A layer converts only when a bnnops layer computes its eval
output: its weight must be ``alpha * sign(W)`` per output channel, and its converted input is
binarized exactly when its source binarized it. Everything else (batch norm, pooling, activations,
residual adds, real layers) is kept as it is.

What converts (each a *candidate*; ``filter_fn`` picks among them):

- **bnnops latent layers**: :class:`bnnops.nn.BinaryLinear` / ``BinaryConv1d`` / ``BinaryConv2d`` with a
  ``weight_quantizer`` (a dense float latent weight binarized every forward) become the same layer
  with a packed :class:`bnnops.BinaryTensor` weight of the same signs (the pack op's: ``w < 0`` is
  -1, NaN is +1, as the forward packs) and the same input quantizer; magnitude_aware_sign's alpha
  (the per-channel mean |w| of the latent weight, float32) becomes the fixed ``scale`` of a
  :mod:`bnnops.scaled` layer. **Bit for bit**: the converted layer runs the same op on the same words
  with the same scale and bias.
- **plain** ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` (the torch classes themselves, also with
  ``torch.nn.utils.parametrize`` parametrizations, whose weight is read as the forward sees it) whose
  weight is +-alpha in every output channel (alpha >= 0, one per channel): a W1A16 bnnops layer
  (input not binarized, as the source does not binarize it), scale alpha (none when every alpha is 1).
  Not bit for bit: the source sums ``x * (+-alpha)``, the bnnops layer sums ``x * (+-1)`` in fp32 in
  another order and multiplies by alpha once; each output differs from the exact value by at most
  ~``(K + 2) u sum_k |x_k| alpha`` (K the reduction length, u the unit roundoff of the accumulation,
  2^-24 in fp32), and so does the source.
- **declared latent layers**: a user's subclass of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
  whose forward binarizes (``F.conv2d(sign(x), sign(self.weight))``) cannot be read from its code:
  ``latent_fn(module, fqn)`` returns a :class:`LatentLayer` saying which quantizers it applies. Its
  conversion is the bnnops layer with those quantizers and the signs of ``module.weight``. W1A1 in
  fp32 is bit for bit wherever the source's convolution sums the +-1 products exactly (integers
  below 2^24) and adds the bias with one rounding, as torch's CPU kernels do (tested); W1A16 and
  magnitude_aware_sign are bounded as the plain case.

**First and last layers.** A converted layer binarizes its input exactly when its source did, so the
first layer (which sees the real image) and a last layer on real features keep real inputs (W1A16)
or stay untouched (a real weight); the default filter needs no first/last rule.

The default filter (:func:`default_filter`) converts every bnnops latent layer and every plain layer
whose weight is +-alpha per channel (at least 2 weights and a nonzero alpha per channel); other plain layers (real layers: Bi-Real Net's stem, shortcuts
and classifier) stay as they are. Declared latent layers always convert (``latent_fn`` selects them). A user ``filter_fn`` that
selects a layer which cannot be converted gets an error, never a silent skip.

Not converted: already-packed bnnops layers (kept), forward hooks and pre-hooks registered on a
converted layer (dropped with the old module). Activations are never touched: a real activation
between two binary layers (ReLU, PReLU, a residual add) keeps its real values, since every
converted layer binarizes its own input as its source did.

The converted model saves with ``torch.save(model.state_dict())`` and loads with
``torch.load(path, weights_only=True)`` (``import bnnops`` first: the packed weights are
:class:`bnnops.BinaryTensor` entries).
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from bnnops.binary_tensor import BinaryTensor
from bnnops.nn import BinaryConv1d, BinaryConv2d, BinaryLinear
from bnnops.packing import pack_weight
from bnnops.quantizers import MagnitudeAwareSign, SignQuantizer, get_input_quantizer, get_quantizer
from bnnops.scaled import ScaledBinaryConv1d, ScaledBinaryConv2d, ScaledBinaryLinear

__all__ = ["ConversionError", "LatentLayer", "convert", "default_filter", "is_binary_weight"]

PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
BNNOPS_LAYERS = (BinaryLinear, BinaryConv1d, BinaryConv2d)
# The packed layer taking a layer's place, by its kind: (without a scale, with one).
_TARGETS = {
    "linear": (BinaryLinear, ScaledBinaryLinear),
    "conv1d": (BinaryConv1d, ScaledBinaryConv1d),
    "conv2d": (BinaryConv2d, ScaledBinaryConv2d),
}

FilterFn = Callable[[nn.Module, str], bool]


class ConversionError(ValueError):
    """A layer :func:`convert` was asked to convert cannot be computed by a bnnops layer."""


@dataclass(frozen=True)
class LatentLayer:
    """What a user's latent-weight layer (a subclass of ``nn.Linear`` / ``nn.Conv1d`` /
    ``nn.Conv2d``) applies in its forward, returned by :func:`convert`'s ``latent_fn``.

    Attributes:
        input_quantizer: the sign quantizer its forward applies to its input (a name or a
            :class:`bnnops.quantizers.SignQuantizer`; at inference only the sign matters, and a sign
            applied twice is the sign, so a layer right after a sign activation may say so too), or
            None for a layer that reads its input as it is (W1A16).
        weight_quantizer: the one it applies to ``self.weight``: a sign quantizer, or
            ``"magnitude_aware_sign"`` for ``alpha * sign(W)`` with alpha the per-channel mean |W|.
    """

    input_quantizer: SignQuantizer | str | None = "ste_sign"
    weight_quantizer: SignQuantizer | str = "ste_sign"


def _plain_class(module: nn.Module) -> type[nn.Module] | None:
    """The torch layer class whose forward ``module`` runs (nn.Linear, nn.Conv1d, nn.Conv2d, also under
    a parametrization), or None for anything else (a subclass with its own forward included)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls if cls in PLAIN_LAYERS else None


def _latent_bnnops(module: nn.Module) -> bool:
    return isinstance(module, BNNOPS_LAYERS) and module.weight_quantizer is not None


def _alphas(weight: torch.Tensor) -> torch.Tensor | None:
    """Per-output-channel alpha (float32 (out,)) of a weight that is +-alpha in every output channel,
    else None (a NaN or infinite entry, or two magnitudes in one channel)."""
    magnitude = weight.detach().abs().flatten(1)
    if not torch.isfinite(magnitude).all():
        return None
    alpha = magnitude.amax(1) if magnitude.shape[1] else magnitude.new_zeros(magnitude.shape[0])
    return alpha.float() if bool((magnitude == alpha[:, None]).all()) else None


def is_binary_weight(weight: torch.Tensor) -> bool:
    """Whether a dense weight (out, ...) is +-alpha in every output channel (one alpha >= 0 per
    channel, every entry finite): what a plain layer's weight must be for :func:`convert`."""
    return _alphas(weight) is not None


def default_filter(module: nn.Module, fqn: str) -> bool:
    """:func:`convert`'s default: every bnnops latent layer; a plain layer when its weight is +-alpha
    per output channel (:func:`is_binary_weight`) with at least 2 weights and a nonzero alpha in
    every output channel. One weight per channel (``nn.Linear(1, n)``, a 1x1 depthwise conv) or a
    zero channel is +-alpha trivially, not evidence of a binary layer: such layers stay real (a
    ``filter_fn`` that selects them converts them). Real plain layers, and subclasses of the torch
    layers with a forward of their own that ``latent_fn`` does not declare, are left as they are."""
    if _plain_class(module) is not None:
        weight = module.weight
        if weight.dim() < 2 or weight[0].numel() < 2:
            return False
        alpha = _alphas(weight)
        return alpha is not None and bool((alpha > 0).all())
    return isinstance(module, BNNOPS_LAYERS)


def _conversion_target(module: nn.Module, fqn: str, latent_fn: Callable | None) -> tuple[str, LatentLayer | None]:
    """(kind, spec): kind "bnnops" (a bnnops latent layer), "declared" (``latent_fn`` said how it
    binarizes), "plain" (a torch layer), "custom" (a subclass of one with its own forward, not
    declared), or "" (not a candidate)."""
    if isinstance(module, BNNOPS_LAYERS):
        return ("bnnops" if _latent_bnnops(module) else ""), None
    if not isinstance(module, PLAIN_LAYERS):
        return "", None
    spec = latent_fn(module, fqn) if latent_fn is not None else None
    if spec is not None:
        if not isinstance(spec, LatentLayer):
            raise TypeError(f"latent_fn must return a LatentLayer or None, got {type(spec).__name__} for {fqn!r}")
        return "declared", spec
    return ("plain" if _plain_class(module) is not None else "custom"), None


def _geometry(module: nn.Module, fqn: str) -> tuple[str, dict]:
    """(kind, constructor arguments) of the bnnops layer that takes ``module``'s place (no quantizers):
    kind "linear", "conv1d" or "conv2d"."""
    if isinstance(module, (nn.Linear, BinaryLinear)):
        return "linear", dict(in_features=module.in_features, out_features=module.out_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        raise ConversionError(
            f"{fqn!r} ({type(module).__name__}, padding_mode={module.padding_mode!r}): a bnnops convolution "
            "pads with a constant (0 or +-1), not by reflection, replication or wrapping"
        )
    kind = "conv1d" if isinstance(module, (nn.Conv1d, BinaryConv1d)) else "conv2d"
    return kind, dict(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        pad_value=getattr(module, "pad_value", 0.0),
    )


def _binary_layer(
    kind: str,
    geometry: dict,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_quantizer: SignQuantizer | None,
    scale: torch.Tensor | None,
    training: bool,
) -> nn.Module:
    """The packed bnnops layer of ``kind`` and ``geometry`` holding the signs of ``weight`` (packed as
    the forward of a latent layer packs them), ``bias`` and ``scale`` (a :mod:`bnnops.scaled` layer if
    not None). Built on the meta device, so no initialization runs and no random number is drawn."""
    cls = _TARGETS[kind][scale is not None]
    layer = cls(**geometry, bias=bias is not None, input_quantizer=input_quantizer, device="meta", dtype=weight.dtype)
    weight = weight.detach()
    layer.weight = nn.Parameter(BinaryTensor(pack_weight(weight), weight.shape, weight.dtype))
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    if scale is not None:
        layer.scale = scale.to(weight.device, torch.float32)
    return layer.train(training)


def _convert_one(module: nn.Module, fqn: str, kind: str, spec: LatentLayer | None) -> nn.Module:
    """The bnnops layer that computes ``module``'s output (module docstring), or ConversionError."""
    kind_of_layer, geometry = _geometry(module, fqn)
    weight = module.weight
    if kind == "bnnops":
        iq, wq = module.input_quantizer, module.weight_quantizer
        scale = wq.scale(weight) if isinstance(wq, MagnitudeAwareSign) else None
    elif kind == "declared":
        iq, wq = get_input_quantizer(spec.input_quantizer), get_quantizer(spec.weight_quantizer)
        if wq is None:
            raise ConversionError(f"{fqn!r}: LatentLayer.weight_quantizer must be a sign quantizer, got None")
        scale = wq.scale(weight) if isinstance(wq, MagnitudeAwareSign) else None
    else:
        alpha = _alphas(weight)
        if alpha is None:
            raise ConversionError(
                f"{fqn!r} ({type(module).__name__}): its weight is not +-alpha in every output channel, so no "
                "binary layer computes it: a real layer between binary layers keeps its real values. Leave it "
                "out of filter_fn, or, if its forward binarizes the weight (a latent-weight layer), say how "
                "with latent_fn"
            )
        iq, scale = None, None if bool((alpha == 1).all()) else alpha
        weight = weight.detach()
    return _binary_layer(kind_of_layer, geometry, weight, module.bias, iq, scale, module.training)


def convert(
    model: nn.Module,
    *,
    filter_fn: FilterFn | None = None,
    inplace: bool = False,
    latent_fn: Callable[[nn.Module, str], LatentLayer | None] | None = None,
) -> nn.Module:
    """``model`` with its binary layers as packed bnnops layers that compute the same eval output
    (which layers, and how exactly: module docstring).

    Args:
        model: any module (nn.Sequential, nested modules, a single layer), on any device.
        filter_fn: ``filter_fn(module, fqn) -> bool`` for each candidate layer (bnnops latent layers,
            nn.Linear / nn.Conv1d / nn.Conv2d and their subclasses), fqn its name in ``model`` ("" for
            the model itself): True converts it or raises. Default :func:`default_filter`. Layers
            ``latent_fn`` declares are converted without asking it (``latent_fn`` is their filter).
        inplace: convert ``model`` itself (its layers replaced) instead of a deep copy.
        latent_fn: ``latent_fn(module, fqn) -> LatentLayer | None`` for each nn.Linear / nn.Conv1d /
            nn.Conv2d instance (subclasses included) that is not a bnnops layer: a
            :class:`LatentLayer` declares that its forward binarizes, and how.

    Returns:
        The converted model: ``model`` itself when ``inplace`` (unless ``model`` is itself a layer
        that converts, whose replacement is returned), else a new module. The training / eval mode
        of every layer is kept.

    Raises:
        TypeError: model is not an nn.Module, or latent_fn returns something else than a LatentLayer
            or None.
        ConversionError (a ValueError): a selected layer no bnnops layer computes: a plain layer whose
            weight is not +-alpha per channel, a subclass with its own forward not declared by
            latent_fn, a padding_mode other than "zeros".
        ValueError: a LatentLayer naming an unknown quantizer (or magnitude_aware_sign for inputs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    filter_fn = filter_fn or default_filter
    if not inplace:
        model = copy.deepcopy(model)
    replaced: list[str] = []
    root = model
    for fqn, module in list(model.named_modules()):
        if any(fqn.startswith(done + ".") or not done for done in replaced):
            continue  # inside a layer already replaced (a parametrization's modules)
        kind, spec = _conversion_target(module, fqn, latent_fn)
        if not kind or (kind != "declared" and not filter_fn(module, fqn)):
            continue
        if kind == "custom":
            raise ConversionError(
                f"{fqn!r} ({type(module).__name__}) runs a forward of its own, which convert cannot read: "
                "declare how it binarizes with latent_fn"
            )
        new = _convert_one(module, fqn, kind, spec)
        replaced.append(fqn)
        if not fqn:
            root = new
        else:
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return root
