"""``bnnops.binary_conv1d``: the binary 1-D convolution, on the 2-D one.

A 1-D convolution of x (N, C, L) with a weight (O, C/groups, k) is the 2-D convolution of
x (N, C, 1, L) with the weight (O, C/groups, 1, k), stride, padding and dilation acting on the last
axis only. The words of a packed weight are the same in both shapes (:mod:`bnnops.packing`
packs dim 1: (O, k, words_per_row) for 1-D, (O, 1, k, words_per_row) for 2-D), so a
:class:`bnnops.BinaryTensor` weight is read in place, and its gradient comes back (O, C/groups, k).
Everything else (kernels, quantizers, saved activations, autocast) is
:func:`bnnops.binary_conv2d`'s.
"""

from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from bnnops.binary_tensor import BinaryTensor, metadata
from bnnops.conv import binary_conv2d, conv_padding
from bnnops.ops.checks import DtypeError, ShapeError
from bnnops.ops.library import FLOAT_DTYPES
from bnnops.quantizers import SignQuantizer
from bnnops.weight_cache import _cacheable

__all__ = ["as_single", "binary_conv1d", "clear_words_views", "conv1d_geometry", "conv1d_padding"]


def as_single(v: int | Sequence[int], what: str) -> int:
    """``v`` for an int, ``v[0]`` for a 1-tuple, as nn.Conv1d's size arguments.

    Raises:
        ShapeError: v is neither an int nor a sequence of one int (``what`` names it).
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    v = tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else (v,)
    if len(v) != 1 or not isinstance(v[0], int) or isinstance(v[0], bool):
        raise ShapeError(f"{what} must be an int or a 1-tuple of an int, got {v}")
    return v[0]


def conv1d_padding(padding: int | Sequence[int] | str) -> tuple[int, int] | str:
    """nn.Conv1d's ``padding`` (an int, a 1-tuple, "valid" or "same") as the 2-D padding of the
    (N, C, 1, L) view: ``(0, p)``, or the string as it is (:func:`bnnops.conv.conv_padding`
    resolves it; "same" pads only the last axis, as the kernel's height is 1).

    Raises:
        ShapeError: anything else.
    """
    if isinstance(padding, str):
        return padding
    return (0, as_single(padding, "padding"))


# words (O, k, words_per_row) -> a 4-D tensor (O, 1, k, words_per_row) on the same memory, one per
# words object, so that every call passes the same 4-D words: the CPU dense-weight cache
# (bnnops.weight_cache) is keyed by the words tensor object. Keyed by identity, weakly (an entry
# dies with its words); the value shares the words' storage without being an autograd view of
# them (a view would hold the words, the key, alive for good).
_WORDS_4D: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _words_4d(words: torch.Tensor) -> torch.Tensor:
    """``words.unsqueeze(1)``'s elements as a tensor on the same memory, the same object while it
    still matches ``words`` (storage, offset, shape and strides: ``words.data = other`` or an
    in-place resize makes a new one). Words the dense-weight cache does not keep (CUDA words,
    subclasses, inference mode, under ``torch.compile``, the cache off...) get
    ``words.unsqueeze(1)`` itself."""
    expected = words.unsqueeze(1)
    if not _cacheable(words):
        return expected
    kept = _WORDS_4D.get(words)
    if (
        kept is None
        or kept.untyped_storage().data_ptr() != words.untyped_storage().data_ptr()
        or kept.data_ptr() != expected.data_ptr()
        or kept.shape != expected.shape
        or kept.stride() != expected.stride()
    ):
        kept = words.new_empty(0).set_(
            words.untyped_storage(), expected.storage_offset(), expected.shape, expected.stride()
        )
        _WORDS_4D[words] = kept
    return kept


def clear_words_views() -> None:
    """Drop the kept 4-D views of BinaryConv1d weights' words, and so the weak references to the
    words (``torch.utils.swap_tensors`` refuses tensors with weak references; call this and
    :func:`bnnops.weight_cache.clear_dense_signs` before swapping them)."""
    _WORDS_4D.clear()


def conv1d_geometry(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
) -> tuple[int, tuple[int, int], int]:
    """(stride, (left, right) padding, dilation) of a 1-D convolution from nn.Conv1d's arguments,
    checked in 1-D terms (the 2-D op would name the (N, C, 1, L) view's pairs). "same" pads
    d*(k-1) in all, the odd one on the right, as :func:`bnnops.conv.conv_padding`.

    Raises:
        ShapeError: an argument that is neither an int nor a 1-tuple (padding: nor "valid" /
            "same"), "same" with a stride other than 1, a kernel size, stride or dilation < 1, a
            negative padding.
    """
    k, s, d = as_single(kernel_size, "kernel_size"), as_single(stride, "stride"), as_single(dilation, "dilation")
    if isinstance(padding, str) and padding not in ("valid", "same"):
        raise ShapeError(f"padding must be an int, a 1-tuple, 'valid' or 'same', got {padding!r}")
    if padding == "same" and s != 1:
        raise ShapeError(f"padding='same' needs stride 1 (as in torch.nn.Conv1d), got stride={s}")
    p = padding if isinstance(padding, str) else as_single(padding, "padding")
    if k < 1 or s < 1 or d < 1 or (isinstance(p, int) and p < 0):
        raise ShapeError(
            f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got kernel_size={k}, stride={s}, "
            f"padding={p}, dilation={d}"
        )
    _, _, left, right = conv_padding((0, p) if isinstance(p, int) else p, (1, k), (1, s), (1, d))
    return s, (left, right), d


class _Unsqueeze2(torch.autograd.Function):
    """A BinaryTensor (O, C, k) seen as (O, C, 1, k), its words shared (the same view object at
    every call: :func:`_words_4d`); the gradient of the 4-D weight flows back to the 3-D one (so
    Bop finds it in the parameter's ``.grad``)."""

    @staticmethod
    def forward(ctx, weight):
        return BinaryTensor(_words_4d(weight.words), (*weight.shape[:2], 1, weight.shape[2]), weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.squeeze(2)


def _as_2d_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (O, C/groups, 1, k) weight of the 2-D convolution; gradients reach ``weight``."""
    return _Unsqueeze2.apply(weight) if isinstance(weight, BinaryTensor) else weight.unsqueeze(2)


def binary_conv1d(
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
    """Binary 1-D convolution: ``conv1d(pad(q(x), pad_value), sign(W)) * scale + bias``.

    Args:
        x: (N, C, L) or unbatched (C, L), float32 / bfloat16 / float16 (dtype rules as
            :func:`bnnops.binary_conv2d`). Binarized inside the op with an input quantizer (W1A1),
            real with ``input_quantizer=None`` (W1A16: a first layer).
        weight: a :class:`bnnops.BinaryTensor` (O, C/groups, k), read packed; or a dense float
            latent weight of that shape, binarized by ``weight_quantizer`` every call.
        bias, scale: optional (O,) float tensors, as :func:`bnnops.binary_conv2d`.
        stride, dilation: an int or a 1-tuple; groups: as :func:`torch.nn.functional.conv1d`.
        padding: an int, a 1-tuple, "valid" or "same" (stride 1), as :class:`torch.nn.Conv1d`.
        pad_value: 0.0 (zero padding) or +1.0 / -1.0 (larq's pad_values).
        input_quantizer, weight_quantizer: as :func:`bnnops.binary_conv2d`.

    Returns:
        (N, O, OL) (or (O, OL) for unbatched x) in x's dtype, OL as torch.nn.functional.conv1d's.

    Raises:
        DtypeError: as :func:`bnnops.binary_conv2d` (x or weight not a float tensor...).
        ShapeError: x not 2-D or 3-D, a weight not 3-D, channels that do not match the weight and
            groups, a bad geometry (:func:`conv1d_geometry`), a dilated kernel longer than the padded
            input; the messages name the 1-D shapes and arguments.
        DeviceError, ValueError: as :func:`bnnops.binary_conv2d`.

    Gradients: those of :func:`bnnops.binary_conv2d` on the (N, C, 1, L) view; the weight's is
    (O, C/groups, k).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DtypeError(f"binary_conv1d input must be a float32, bfloat16 or float16 tensor, got {got}")
    if not isinstance(weight, torch.Tensor) or metadata(weight)[1] not in FLOAT_DTYPES:
        got = metadata(weight)[1] if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise DtypeError(
            f"binary_conv1d weight must be a BinaryTensor or a float latent weight (O, C/groups, k), got {got}"
        )
    if weight.dim() != 3:
        raise ShapeError(f"binary_conv1d weight must be 3-D (O, C/groups, k), got shape {tuple(weight.shape)}")
    if x.dim() not in (2, 3):
        raise ShapeError(f"binary_conv1d input must be (N, C, L) or unbatched (C, L), got shape {tuple(x.shape)}")
    k = weight.shape[2]
    stride, (left, right), dilation = conv1d_geometry(k, stride, padding, dilation)
    if isinstance(groups, int) and weight.shape[1] * groups != x.shape[-2]:
        raise ShapeError(
            f"the input has {x.shape[-2]} channels but the weight {tuple(weight.shape)} with groups={groups} "
            f"expects {weight.shape[1] * groups}"
        )
    if x.shape[-1] + left + right < dilation * (k - 1) + 1:
        raise ShapeError(
            f"kernel {k} (dilation {dilation}) is larger than the padded input of length {x.shape[-1] + left + right}"
        )
    y = binary_conv2d(
        x.unsqueeze(-2),
        _as_2d_weight(weight),
        bias,
        (1, stride),
        conv1d_padding(padding),
        (1, dilation),
        groups,
        pad_value=pad_value,
        input_quantizer=input_quantizer,
        scale=scale,
        weight_quantizer=weight_quantizer,
    )
    return y.squeeze(-2)
