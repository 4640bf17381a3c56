"""Binary quantizers: sign in the forward pass, a surrogate gradient in the backward pass.

Modelled on larq's ``larq/quantizers.py`` (the Keras library of the Bop paper's authors). Every
quantizer binarizes with ``x < 0 -> -1, else +1``: sign(0) = +1, and NaN (for which ``x < 0`` is
false) maps to +1, exactly like the bnnops packing format, so binarizing then packing, or packing
directly, give the same bits.

A quantizer is a :class:`SignQuantizer`: its surrogate derivative ``q.derivative(x)`` is a plain
function of the input, and ``q.grad(x, grad_out)`` is the one place it is applied. Calling the
quantizer (``ste_sign(x)``) runs an autograd function built on ``grad``; the fused binary linear
(:func:`bnnops.binary_linear`) binarizes its input inside the kernel and calls the same ``grad`` in
its backward, so both share one gradient code path (so do :func:`bnnops.binary_conv2d` and the
layers of :mod:`bnnops.nn`).

Quantizers are looked up by name with :func:`get_quantizer` (``"ste_sign"``, ``"approx_sign"``,
``"swish_sign"``, ``"magnitude_aware_sign"``) or passed as objects, e.g. ``SwishSign(beta=10)``.
"""

import math
from typing import ClassVar

import torch

__all__ = [
    "ApproxSign",
    "MagnitudeAwareSign",
    "SignQuantizer",
    "SteSign",
    "SwishSign",
    "approx_sign",
    "get_input_quantizer",
    "get_quantizer",
    "magnitude_aware_sign",
    "sign",
    "ste_sign",
    "swish_sign",
]


def sign(x: torch.Tensor) -> torch.Tensor:
    """Binarize: -1 where ``x < 0``, else +1 (sign(0) = +1), in x's dtype, no gradient."""
    # The 0-dim one carries x's dtype into the result without a full tensor of ones: a compare and a
    # select move 6 bytes per bf16 value, 10 with ones_like. (``torch.where(x < 0, -1.0, 1.0).to(x.dtype)``
    # would be fp32 first, and returns its fp32 input itself for fp32 x: torch 2.11's torch.compile
    # then traces a zero gradient for _SurrogateSign, whose forward returns it.)
    return torch.where(x < 0, -1.0, x.new_ones(()))


class _SurrogateSign(torch.autograd.Function):
    """sign(x) forward, ``quantizer.grad(x, grad_out)`` backward."""

    @staticmethod
    def forward(ctx, x, quantizer):
        ctx.save_for_backward(x)
        ctx.quantizer = quantizer
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return ctx.quantizer.grad(x, grad_out), None


class SignQuantizer:
    """Base of the binary quantizers: forward sign(x), backward ``grad_out * derivative(x)``.

    Subclasses define :meth:`derivative`, the surrogate for the derivative of sign, as a function
    of the quantizer's input. Instances are callable and compare equal when their type and
    parameters match.
    """

    name: ClassVar[str | None] = None

    @property
    def saves_mask_only(self) -> bool:
        """Whether the surrogate gradient depends on x only through a 0/1 pass mask.

        True: a binary layer keeps 2 bits per input element for its backward (sign(x) and the
        mask, packed; :mod:`bnnops.layer_common`) and the gradients are the same values. False
        (the base, and every quantizer whose derivative needs |x|): the layer keeps x itself.
        """
        return False

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate derivative d sign(x) / dx, elementwise, in x's dtype."""
        raise NotImplementedError

    def grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The input gradient given ``grad_out``, the gradient with respect to sign(x)."""
        return grad_out * self.derivative(x).to(grad_out.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _SurrogateSign.apply(x, self)

    def _params(self):
        return tuple(sorted(vars(self).items()))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self), self._params()))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params())
        return f"{type(self).__name__}({params})"


class SteSign(SignQuantizer):
    r"""Sign with the straight-through estimator: gradient 1 where ``|x| <= clip_value``, else 0.

    Source: larq ``ste_sign``; Courbariaux et al., "Binarized Neural Networks: Training Deep
    Neural Networks with Weights and Activations Constrained to +1 or -1" (arXiv 1602.02830).
    """

    name = "ste_sign"

    def __init__(self, clip_value: float | None = 1.0):
        # None: no clipping (larq's ste_sign(clip_value=None)), the gradient passes everywhere.
        self.clip_value = math.inf if clip_value is None else float(clip_value)

    @property
    def saves_mask_only(self) -> bool:
        """True: the gradient passes where |x| <= clip_value, a mask a layer keeps packed (1 bit
        per element). A subclass with its own surrogate (``derivative`` or ``grad``) keeps x."""
        return type(self).derivative is SteSign.derivative and type(self).grad is SteSign.grad

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        return (x.abs() <= self.clip_value).to(x.dtype)

    def grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        if type(self).derivative is not SteSign.derivative:  # a subclass with its own surrogate
            return super().grad(x, grad_out)
        # A select instead of a multiply by the 0/1 derivative: one kernel and one cast fewer in
        # every binary layer's backward. (Blocked positions get 0 even where grad_out is inf or NaN.)
        return torch.where(x.abs() <= self.clip_value, grad_out, 0)


class ApproxSign(SignQuantizer):
    r"""Sign with Bi-Real Net's ApproxSign gradient: ``2 - 2|x|`` for ``|x| <= 1``, else 0.

    The derivative of the piecewise-quadratic approximation of sign. Source: larq
    ``approx_sign``; Liu et al., "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With
    Improved Representational Capability and Advanced Training Algorithm" (arXiv 1808.00278).
    """

    name = "approx_sign"

    # saves_mask_only is False: the derivative 2 - 2|x| needs |x|, so a layer keeps x itself.

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(2 - 2 * x.abs(), min=0)


class SwishSign(SignQuantizer):
    r"""Sign with the SignSwish gradient: ``beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``.

    The derivative of ``2 sigmoid(beta x)(1 + beta x (1 - sigmoid(beta x))) - 1``; larger beta is
    closer to sign. Source: larq ``swish_sign`` (beta = 5); Darabi et al., "BNN+: Improved Binary
    Network Training" (arXiv 1812.11800).
    """

    name = "swish_sign"

    def __init__(self, beta: float = 5.0):
        self.beta = float(beta)

    # saves_mask_only is False: the derivative is a smooth function of x, so a layer keeps x itself.

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        # At least fp32: cosh overflows fp16 early (the result is then 0, as it should be). |beta x|
        # is capped at 200, where cosh overflows fp32 and fp64 gives below 1e-80: the derivative
        # there is 0, also at x = +-inf (uncapped, inf / inf = NaN).
        bx = (self.beta * x.to(torch.promote_types(x.dtype, torch.float32))).clamp(-200, 200)
        d = self.beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx))
        return d.to(x.dtype)


class MagnitudeAwareSign(SteSign):
    r"""XNOR-Net / Bi-Real Net weight binarizer: ``alpha * sign(w)`` with alpha the mean ``|w|``.

    alpha is taken per output channel: over every dimension but 0 of a PyTorch weight (out, in,
    ...) (larq reduces over all but the last axis of a Keras kernel, which is the same channel).
    alpha is under stop-gradient and the sign uses the straight-through estimator, so the gradient
    is ``alpha * grad_out`` where ``|w| <= clip_value``, else 0. Source: larq
    ``magnitude_aware_sign``; Rastegari et al., "XNOR-Net" (arXiv 1603.05279) for alpha; Liu et
    al., "Bi-Real Net" (arXiv 1808.00278).

    In :func:`bnnops.binary_linear` and :func:`bnnops.binary_conv2d` the sign is packed and alpha
    goes to the op's per-output-channel scale.
    """

    name = "magnitude_aware_sign"

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """alpha, the detached per-output-channel mean |w|: float32 of shape (out,) ((1,) for 1-D w).

        A channel with no weights (in_features or in_channels 0) gets 0, not the NaN of an empty
        mean: its output is an empty sum, 0 whatever alpha multiplies it (NaN would poison it).
        """
        magnitude = w.detach().abs().float()
        if w.numel() == 0:
            return magnitude.new_zeros(w.shape[0] if w.dim() > 1 else 1)
        return magnitude.flatten(1).mean(1) if w.dim() > 1 else magnitude.mean().reshape(1)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        alpha = self.scale(w).to(w.dtype)
        return alpha.view(-1, *([1] * (w.dim() - 1))) * super().__call__(w)


ste_sign = SteSign()
approx_sign = ApproxSign()
swish_sign = SwishSign()
magnitude_aware_sign = MagnitudeAwareSign()

_BY_NAME = {q.name: q for q in (ste_sign, approx_sign, swish_sign, magnitude_aware_sign)}


def get_quantizer(quantizer: SignQuantizer | str | None) -> SignQuantizer | None:
    """A :class:`SignQuantizer` from a name (see the module docstring) or an instance; None stays None.

    Raises:
        ValueError: an unknown name, or neither a name nor a SignQuantizer.
    """
    if quantizer is None or isinstance(quantizer, SignQuantizer):
        return quantizer
    if isinstance(quantizer, str) and quantizer in _BY_NAME:
        return _BY_NAME[quantizer]
    raise ValueError(f"unknown quantizer {quantizer!r}; expected one of {sorted(_BY_NAME)} or a SignQuantizer")


def get_input_quantizer(quantizer: SignQuantizer | str | None) -> SignQuantizer | None:
    """:func:`get_quantizer` for activations.

    Raises:
        ValueError: as :func:`get_quantizer`, or for magnitude_aware_sign, a weight quantizer.
    """
    q = get_quantizer(quantizer)
    if isinstance(q, MagnitudeAwareSign):
        raise ValueError(
            "magnitude_aware_sign is a weight quantizer; use ste_sign, approx_sign or swish_sign for inputs"
        )
    return q
