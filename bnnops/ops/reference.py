"""Pure-PyTorch references of the linear and conv ops: the CPU body of each op, and what the Triton
kernels are tested against.

Weights are int32 words in the layout of :mod:`bnnops.packing` (bit 1 means -1): (N, ceil(K/32))
for a linear weight (N, K), (O, kh, kw, ceil(Cg/32)) for a conv weight (O, Cg, kh, kw). Each
reference unpacks them to a dense +-1 weight (kept between calls while the words do not change:
:mod:`bnnops.weight_cache`), computes in fp32 and casts once at the end (with CPU autocast off around that math:
:func:`without_cpu_autocast`). The references of ``pack_signs`` / ``unpack_signs`` are in :mod:`bnnops.packing`.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bnnops.packing import sign_values, unpack_signs_reference
from bnnops.weight_cache import dense_signs

__all__ = [
    "binary_conv2d_reference",
    "grad_input_reference",
    "output_is_channels_last",
    "w1a1_reference",
    "w1a16_reference",
    "without_cpu_autocast",
]


def without_cpu_autocast(reference: Callable) -> Callable:
    """``reference`` run with CPU autocast off when it is on.

    The references compute in fp32. A CPU op's kernel runs with the caller's autocast state, so
    under ``torch.autocast("cpu")`` their fp32 products and convolutions would drop to autocast's
    dtype (an error of up to 0.25 on a 1000-term W1A16 sum in bf16); the layer casts its inputs to
    autocast's dtype before the op, so the op's result is then the bits of the same layer run in
    that dtype. Queried first: entering the context on every call would add host time."""

    @functools.wraps(reference)
    def run(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return reference(*args, **kwargs)
        return reference(*args, **kwargs)

    return run


def _epilogue(y, scale, bias, out_dtype):
    """fp32 ``y * scale + bias`` (each optional) rounded once to ``out_dtype``."""
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y if y.dtype == out_dtype else y.to(out_dtype)


@without_cpu_autocast
def w1a1_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    K: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``bnnops::binary_linear_w1a1``: sign(x) @ W^T * scale + bias, (..., K) -> (..., N).

    x is float (..., K) (x < 0 -> -1, else +1) or int32 sign words (..., ceil(K/32)). Computed in
    fp32 (exact: integer sums below 2^24), cast to ``out_dtype``.
    """
    xs = unpack_signs_reference(x, K, torch.float32) if x.dtype == torch.int32 else sign_values(x)
    y = xs @ dense_signs(weight, K).T
    return _epilogue(y, scale, bias, out_dtype)


@without_cpu_autocast
def w1a16_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``bnnops::binary_linear_w1a16``: x @ W^T * scale + bias for real x (..., K), fp32
    accumulation, in ``out_dtype`` (None: x's dtype)."""
    y = x.float() @ dense_signs(weight, x.shape[-1]).T
    return _epilogue(y, scale, bias, out_dtype or x.dtype)


@without_cpu_autocast
def grad_input_reference(grad: torch.Tensor, weight: torch.Tensor, K: int) -> torch.Tensor:
    """``bnnops::binary_linear_grad_input``: grad @ W, (..., N) -> (..., K), fp32 accumulation, in
    grad's dtype."""
    return (grad.float() @ dense_signs(weight, K)).to(grad.dtype)


def output_is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``bnnops::binary_conv2d`` returns a channels_last output for input ``x``: when x is
    channels_last-contiguous but not contiguous, as F.conv2d on CUDA decides.

    The kernel launcher (``bnnops.kernels.conv2d``) applies the same rule; it is stated here too
    because the CPU path must work without Triton.
    """
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@without_cpu_autocast
def binary_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    pad_value: float = 0.0,
    binarize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``bnnops::binary_conv2d`` (contract: :mod:`bnnops.ops.conv`): F.conv2d in fp32 on the +-1
    weight that ``weight``'s words hold, after padding (top, bottom, left, right) with
    ``pad_value`` explicitly; x binarized (x < 0 -> -1, else +1) when ``binarize``. The output has
    ``out_dtype`` (None: x's dtype) and is channels_last when :func:`output_is_channels_last`."""
    O, KH, KW, _ = weight.shape
    Cg = x.shape[1] // groups
    w = dense_signs(weight, Cg).permute(0, 3, 1, 2)
    a = sign_values(x) if binarize else x.float()
    conv_padding = (0, 0)
    if binarize and pad_value == 0.0 and padding[0] == padding[1] and padding[2] == padding[3] and Cg > 0:
        # Zero padding left to F.conv2d (one op fewer): the same exact integer sums.
        conv_padding = (padding[0], padding[2])
    else:
        a = F.pad(a, (padding[2], padding[3], padding[0], padding[1]), value=pad_value)
    if Cg == 0:
        # Every sum is empty: 0 at each of the O output channels. (F.conv2d on the CPU returns
        # (N, 0, OH, OW) for zero input channels.)
        OH = (a.shape[2] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
        OW = (a.shape[3] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
        y = a.new_zeros(a.shape[0], O, OH, OW)
    else:
        y = F.conv2d(a, w, None, stride, conv_padding, dilation, groups)
    if scale is not None:
        y = y * scale.float().view(1, O, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, O, 1, 1)
    dtype = out_dtype or x.dtype
    y = y if y.dtype == dtype else y.to(dtype)
    if output_is_channels_last(x):
        return y.contiguous(memory_format=torch.channels_last)
    return y if y.is_contiguous() else y.contiguous()
