"""The rules :func:`bnnops.binary_linear` and :func:`bnnops.binary_conv2d` share: the dtype they
compute in, how a weight becomes words, when a call needs an autograd node, what a call keeps for
its backward, where scale and bias are applied, first-derivative-only backward results, and how
the layers of :mod:`bnnops.nn` initialize their parameters.

What a binary layer keeps for backward (its "saved input"), by input quantizer:

- one whose surrogate gradient is a 0/1 pass mask (``quantizer.saves_mask_only``: ``ste_sign``,
  any clip value): two int32 word tensors in the :mod:`bnnops.packing` format, packed along the
  reduction dimension like the weight (:func:`pack_saved_input`): ``sign_words`` (bit 1 where
  x < 0) if the weight takes a gradient, ``mask_words`` (bit 1 where |x| <= clip) if x does.
  2 bits per element instead of x's 16 or 32; the gradients are the same values (a select on the
  mask, sign(x) from the words);
- one whose surrogate needs |x| (``approx_sign``, ``swish_sign``): x itself;
- none (W1A16): x itself if the weight takes a gradient (grad_W = g^T x), else nothing.

Output channels are dim 1 of a layer's output here: (M, N) rows for linear, (N, O, OH, OW) for conv.
"""

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnnops import kernels
from bnnops.binary_tensor import BinaryTensor, metadata
from bnnops.ops import backward_reference, library
from bnnops.ops.checks import DtypeError, check_channel_vectors
from bnnops.ops.library import FLOAT_DTYPES, refuse_backward
from bnnops.packing import negative, pack_bits, pack_weight
from bnnops.quantizers import MagnitudeAwareSign, SignQuantizer, get_quantizer

__all__ = [
    "apply_scale_bias",
    "autocast_inputs",
    "binarize_weight",
    "first_derivatives",
    "needs_autograd",
    "pack_and_multiply",
    "pack_saved_input",
    "packs_before_product",
    "reset_weight_and_bias",
    "runs_kernels",
    "split_epilogue",
]


def autocast_inputs(
    x: torch.Tensor, weight_dtype: torch.dtype, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, bias) in the dtype a binary layer computes in.

    Under ``torch.autocast`` for x's device, x and bias are cast to autocast's dtype, as
    ``nn.Linear`` and ``nn.Conv2d`` compute there (a +-1 weight is exact in every float dtype, so
    it needs no cast; gradients still reach each input in its own dtype). Otherwise float x must
    have the weight's dtype ``weight_dtype``, as ``F.linear`` asks. Int32 x (sign words) passes.

    Raises:
        DtypeError: bias is not a tensor; float x's dtype is not the weight's (outside autocast);
            bias's dtype is not float x's.
    """
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise DtypeError(f"bias must be a float tensor (one value per output channel), got {type(bias).__name__}")
    device = x.device.type
    if x.dtype in FLOAT_DTYPES and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x = x.to(dtype)
        if bias is not None and bias.is_floating_point():
            bias = bias.to(dtype)
    elif x.dtype in FLOAT_DTYPES and x.dtype != weight_dtype:
        raise DtypeError(
            f"x ({x.dtype}) and weight ({weight_dtype}) must have the same dtype (or run under torch.autocast)"
        )
    if bias is not None and x.dtype in FLOAT_DTYPES and bias.dtype != x.dtype:
        raise DtypeError(f"bias ({bias.dtype}) and x ({x.dtype}) must have the same dtype")
    return x, bias


def binarize_weight(
    weight: torch.Tensor, weight_quantizer: SignQuantizer | str | None, scale: torch.Tensor | None
) -> tuple[SignQuantizer | None, torch.Tensor, torch.Tensor | None]:
    """(weight quantizer or None, words, scale) for a layer's weight.

    A :class:`bnnops.BinaryTensor` is already binary: its words as they are (``weight_quantizer``
    must be None). A dense float latent weight is binarized by ``weight_quantizer`` (default
    ste_sign) and packed in the weight layout of :mod:`bnnops.packing`; magnitude_aware_sign also
    multiplies ``scale`` by its per-output-channel mean |w|.

    Raises:
        DtypeError: scale is not a float tensor.
        ValueError: a weight quantizer for a BinaryTensor, or an unknown quantizer name.
    """
    if scale is not None and (not isinstance(scale, torch.Tensor) or scale.dtype not in FLOAT_DTYPES):
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise DtypeError(
            f"scale must be a float32, bfloat16 or float16 tensor (one value per output channel), got {got}"
        )
    if isinstance(weight, BinaryTensor):
        if weight_quantizer is not None:
            raise ValueError("a BinaryTensor weight is already binary: weight_quantizer must be None")
        return None, weight.words, scale
    wq = get_quantizer(weight_quantizer if weight_quantizer is not None else "ste_sign")
    if isinstance(wq, MagnitudeAwareSign):
        alpha = wq.scale(weight)
        scale = alpha if scale is None else scale * alpha.to(scale.dtype)
    return wq, pack_weight(weight.detach()), scale


def needs_autograd(x: torch.Tensor, weight_requires_grad: bool, bias: torch.Tensor | None) -> bool:
    """Whether a binary layer's call needs its autograd function: grad mode on and x, the weight
    or the bias the op gets requiring grad. Otherwise (inference) the op runs alone, no node."""
    return torch.is_grad_enabled() and (
        weight_requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
    )


def runs_kernels(x: torch.Tensor) -> bool:
    """Whether a layer's saved-input packing (:func:`pack_saved_input`) runs the Triton launcher
    (eager CUDA tensors) or the pure-PyTorch references of :mod:`bnnops.ops.backward_reference`
    (CPU, and any graph ``torch.compile`` traces: the launchers are plain Python, not ops a graph
    can hold). The ops choose their own route by the dispatcher's device key. One of the two
    places a layer picks its route by device, with :func:`packs_before_product`
    (``bench/stubbed_launches.py`` switches both to time the CUDA path's host work on a CPU)."""
    return x.device.type == "cuda" and not torch.compiler.is_compiling()


def packs_before_product(x: torch.Tensor) -> bool:
    """Whether a training forward with a mask-only input quantizer packs x first and runs the
    product on its sign words (any device but the CPU, and any graph ``torch.compile`` traces), or
    runs the product on float x and packs only the words kept (eager CPU code): see
    :func:`pack_and_multiply`."""
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def fuses_references(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a layer's backward may run its two backward ops' references as one computation:
    on the references' route (not :func:`runs_kernels` for the first tensor) where
    :func:`bnnops.ops.library.call` would run them without the dispatcher
    (:func:`bnnops.ops.library.skips_dispatcher`), so that modes, profilers and subclasses still
    see each op."""
    return not runs_kernels(tensors[0]) and library.skips_dispatcher(tensors)


def pack_saved_input(
    x: torch.Tensor, clip_value: float, groups: int | None, need_sign: bool, need_mask: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sign_words, mask_words) of a binary layer's float input x, None for one not needed.

    sign_words: bit 1 where x < 0; mask_words: bit 1 where |x| <= ``clip_value`` (compared in x's
    dtype, as ``SteSign`` compares). ``groups`` None: linear x (..., K) -> int32 (..., ceil(K/32))
    each; else conv x (N, C, H, W) -> int32 (N, H, W, groups * ceil(Cg/32)) each, every group
    starting a new word (layouts: :mod:`bnnops.ops.backward_reference`). One pass over x on CUDA
    (``bnnops.kernels.saved_activations``); on the CPU one ``pack_bits`` of the bits needed (both
    together when both are), so a words tensor never holds bits nobody asked for.
    """
    if not (need_sign or need_mask):
        return None, None
    if runs_kernels(x):
        saved = kernels.load("saved_activations")
        if groups is None:
            sign_words, mask_words = saved.pack_sign_and_mask(x, clip_value)
        else:
            sign_words, mask_words = saved.pack_sign_and_mask_conv(x, clip_value, groups)
        return (sign_words if need_sign else None), (mask_words if need_mask else None)
    if need_sign and need_mask:
        if groups is None:
            return backward_reference.pack_sign_and_mask_reference(x, clip_value)
        return backward_reference.pack_sign_and_mask_conv_reference(x, clip_value, groups)
    bits = negative(x) if need_sign else backward_reference.pass_mask(x, clip_value)
    words = pack_bits(bits) if groups is None else backward_reference.pack_conv_bits(bits, groups)
    return (words, None) if need_sign else (None, words)


def pack_and_multiply(
    x: torch.Tensor,
    clip_value: float,
    groups: int | None,
    need_sign: bool,
    need_mask: bool,
    product: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, sign_words, mask_words) of a training forward with a mask-only input quantizer: y =
    ``product(a)`` (the layer's W1A1 op on a = float x or its int32 sign words), and the words
    :func:`pack_saved_input` gives for ``need_sign`` / ``need_mask`` (arguments as there).

    On CUDA, and in any graph ``torch.compile`` traces, x is packed once and the product runs on
    the sign words (x is read once). In eager CPU code the product reads float x (its reference
    would unpack the words it was just given) and only the words kept are packed. The same output
    bits either way: the dot of +-1 values is an exact integer.
    """
    if packs_before_product(x):
        sign_words, mask_words = pack_saved_input(x, clip_value, groups, True, need_mask)
        return product(sign_words), (sign_words if need_sign else None), mask_words
    return product(x), *pack_saved_input(x, clip_value, groups, need_sign, need_mask)


def split_epilogue(
    scale: torch.Tensor | None, bias: torch.Tensor | None, n: int, device: torch.device
) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """Where a binary layer applies its per-output-channel ``scale`` and ``bias``: (outside,
    op_scale, op_bias).

    Normally the op fuses both into its epilogue. A learnable scale (requires_grad) needs the
    product before scale and bias, so both are applied outside the op, after it, by
    :func:`apply_scale_bias` (the op then gets None for them and does not check them: they are
    checked here, against ``n`` channels on ``device``). Outside, the op returns its fp32 product
    (``out_dtype=torch.float32``) and :func:`apply_scale_bias` repeats the op's epilogue, so the
    result has the bits of the fused call: a scale's requires_grad never changes the output. The
    split depends on the scale alone, not on grad mode, so a call under no_grad gives the same
    values as with grad.
    """
    if scale is not None and scale.requires_grad:
        check_channel_vectors(n, device, scale=scale, bias=bias)
        return True, None, None
    return False, scale, bias


def apply_scale_bias(
    y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``y * scale + bias`` per output channel (dim 1 of y) in fp32, cast to ``dtype``: the
    epilogue that :func:`split_epilogue` moves outside the op, on the op's fp32 product ``y``
    (a multiply, then an add, then one rounding, as the op's epilogue)."""
    shape = (-1,) + (1,) * (y.dim() - 2)
    y = y.float() * scale.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    return y.to(dtype)


def first_derivatives(name: str, grad_y: torch.Tensor, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """A binary layer's backward results (None kept), each refusing a second derivative: with
    ``create_graph`` they would be differentiable only in part (the +-1 weight and sign(x) are
    constants there), so a backward through them raises instead (:func:`bnnops.ops.library.refuse_backward`)."""
    return tuple(None if g is None else refuse_backward(name, g, (grad_y,)) for g in grads)


def reset_weight_and_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Initialize a binary layer's parameters in place as ``nn.Linear`` / ``nn.Conv2d``'s
    ``reset_parameters`` does: a Kaiming-uniform weight (a = sqrt(5)), then a bias uniform in
    +-1/sqrt(fan_in), drawn from the default generator of the weight's device in that order.

    A :class:`bnnops.BinaryTensor` weight takes the signs of a Kaiming-uniform draw in its logical
    dtype on its device (``copy_``: its words are rewritten in place, so this works after
    ``Module.to_empty``); a float latent weight takes the draw itself. fan_in is the product of the
    weight's dimensions after the first (0 gives a zero bias, as in torch).
    """
    shape, dtype, device, _ = metadata(weight)
    with torch.no_grad():
        if isinstance(weight, BinaryTensor):
            w = torch.empty(shape, dtype=dtype, device=device)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            weight.copy_(BinaryTensor.from_float(w))
        else:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias is not None:
            fan_in = math.prod(shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(bias, -bound, bound)
