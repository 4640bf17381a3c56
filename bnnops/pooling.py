"""Max pooling that keeps one byte per output for backward: :class:`MaxPool2d` / :func:`max_pool2d`.

``torch.nn.functional.max_pool2d`` keeps its float input and int64 indices for backward. When the
windows do not overlap (kernel_size == stride, no padding, dilation 1; ``ceil_mode`` only where
it adds no partial window) the gradient needs only which position of its window each output came
from: this module keeps that position as uint8 (row-major within the window, so windows of at
most 256 positions), one byte per output, and the input's shape and memory format as plain
attributes. Every other configuration, and every call with nothing to differentiate, runs
``torch.nn.functional.max_pool2d`` itself (which then keeps what torch keeps).

Exactness: output and input gradient equal ``torch.nn.functional.max_pool2d``'s bit for bit, as
its CPU and CUDA kernels define them: a window scans in row-major order and takes a value when it
is greater than the maximum so far or is NaN. So of tied maxima (+0.0 and -0.0 tie) the first is
taken, a window of -inf picks its first position, and a window holding NaN outputs its *last*
NaN and routes the gradient there. A NaN output is that NaN of the input; torch's kernels pass
reduced precision through float32 and may canonicalize a NaN's payload (differently on CPU and
CUDA), so NaN outputs equal torch's as NaN, not bit for bit. The ragged bottom/right edge that
floor mode crops gets a zero gradient. The gradient of an output lands on one input as ``0 + g``
(torch accumulates into zeros), so an upstream -0.0 arrives as +0.0. Output and gradient take
the input's memory format (channels_last or contiguous, decided from its strides by torch's own
rule, ``torch._prims_common.suggest_memory_format``); an unbatched (C, H, W) input gives
contiguous ones. The backward is itself differentiable (a scatter of the upstream gradient), so
double backward works as torch's does. The forward's transient memory is a copy of the windows
(the input's size) and a byte mask of it, freed on return.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.autograd import forward_ad

__all__ = ["MaxPool2d", "max_pool2d"]

# The largest window whose positions fit in a uint8.
MAX_WINDOW_POSITIONS = 256


def _pair(value: int | Sequence[int]) -> tuple[int, int] | None:
    """(h, w) of an int or a 1- or 2-sequence as torch reads them; None for anything else."""
    if isinstance(value, int):
        return value, value
    pair = tuple(value)
    return (pair[0], pair[0]) if len(pair) == 1 else pair if len(pair) == 2 else None


def _windows(x: torch.Tensor, kernel: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """The non-overlapping windows of 4-D ``x`` cropped to ``out_size`` windows: a view
    (N, C, OH, kh, OW, kw) of x's storage."""
    (kh, kw), (oh, ow) = kernel, out_size
    return x[:, :, : oh * kh, : ow * kw].unflatten(3, (ow, kw)).unflatten(2, (oh, kh))


def _window_argmax(windows: torch.Tensor) -> torch.Tensor:
    """Position (int64) in each window of (N, C, OH, OW, K) of the value torch's max pool takes:
    the last NaN in a window holding one, else the first maximum (argmax returns the first)."""
    k = windows.shape[-1]
    nan = windows.isnan()
    last_nan = (k - 1) - nan.flip(-1).to(torch.uint8).argmax(-1)
    return torch.where(nan.any(-1), last_nan, windows.argmax(-1))


class _NonOverlappingMaxPool(torch.autograd.Function):
    """Max pool of 4-D x over non-overlapping (kh, kw) windows (stride = kernel); saves the uint8
    window position of each output and the input's shape and memory format."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        kernel: tuple[int, int],
        out_size: tuple[int, int],
        memory_format: torch.memory_format,
    ) -> torch.Tensor:
        # (N, C, OH, OW, kh*kw): a copy of the windows' values, one window per row.
        windows = _windows(x, kernel, out_size).permute(0, 1, 2, 4, 3, 5).flatten(4)
        position = _window_argmax(windows)
        out = windows.gather(-1, position.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(position.to(torch.uint8))
        ctx.input_shape, ctx.kernel, ctx.memory_format = x.shape, kernel, memory_format
        # Allocated as torch allocates its output, so even the strides of size-1 dims agree.
        result = torch.empty(out.shape, dtype=out.dtype, device=out.device, memory_format=memory_format)
        return result.copy_(out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (position,) = ctx.saved_tensors
        n, c, oh, ow = grad_out.shape
        kh, kw = ctx.kernel
        per_window = torch.zeros(n, c, oh, ow, kh * kw, dtype=grad_out.dtype, device=grad_out.device)
        # scatter_add into zeros: 0 + g, as torch's backward accumulates (-0.0 arrives as +0.0).
        per_window = per_window.scatter_add(-1, position.long().unsqueeze(-1), grad_out.unsqueeze(-1))
        options = dict(dtype=grad_out.dtype, device=grad_out.device, memory_format=ctx.memory_format)
        grad_in = torch.empty(ctx.input_shape, **options).zero_()
        _windows(grad_in, ctx.kernel, (oh, ow)).copy_(per_window.unflatten(4, (kh, kw)).permute(0, 1, 2, 4, 3, 5))
        return grad_in, None, None, None


def _pooled_size(size: int, kernel: int, ceil_mode: bool) -> int | None:
    """Windows along one side, or None where a window would be partial (ceil mode) or there is
    no whole window."""
    if ceil_mode and size % kernel:
        return None
    return size // kernel or None


def _non_overlapping_windows(
    x: torch.Tensor,
    kernel: tuple[int, int] | None,
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
) -> tuple[int, int] | None:
    """(OH, OW) where the uint8 path applies to x and these arguments, else None (torch's max
    pool runs, and raises its own errors for invalid ones)."""
    if stride is not None and not (not isinstance(stride, int) and len(stride) == 0) and _pair(stride) != kernel:
        return None
    if kernel is None or min(kernel) < 1 or kernel[0] * kernel[1] > MAX_WINDOW_POSITIONS:
        return None
    if _pair(padding) != (0, 0) or _pair(dilation) != (1, 1):
        return None
    if x.dim() not in (3, 4) or not x.is_floating_point() or x.numel() == 0:
        return None
    oh, ow = _pooled_size(x.shape[-2], kernel[0], ceil_mode), _pooled_size(x.shape[-1], kernel[1], ceil_mode)
    return None if oh is None or ow is None else (oh, ow)


def _transformed(x: torch.Tensor) -> bool:
    """Whether x is under a torch.func transform (vmap, grad) or carries a forward-mode tangent: the
    autograd function here defines only a backward, so those run torch's max pool instead. Under
    torch.compile the answer is False: the compiler traces the function itself (and cannot trace these
    queries)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._are_functorch_transforms_active():
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(x).tangent is not None


def max_pool2d(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.max_pool2d(x, ...)`` (no ``return_indices``), bit for bit, keeping one
    uint8 per output for backward where the windows do not overlap (module docstring).

    x: (N, C, H, W) or (C, H, W), float; output (N, C, OH, OW) or (C, OH, OW) in x's memory format.
    Raises what ``torch.nn.functional.max_pool2d`` raises for invalid arguments or shapes.
    """
    kernel = _pair(kernel_size)
    out_size = None
    if x.requires_grad and torch.is_grad_enabled() and not _transformed(x):
        out_size = _non_overlapping_windows(x, kernel, stride, padding, dilation, ceil_mode)
    if out_size is None:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if x.dim() == 3:
        return _NonOverlappingMaxPool.apply(x.unsqueeze(0), kernel, out_size, torch.contiguous_format).squeeze(0)
    return _NonOverlappingMaxPool.apply(x, kernel, out_size, suggest_memory_format(x))


class MaxPool2d(nn.MaxPool2d):
    """Drop-in for :class:`torch.nn.MaxPool2d` (same arguments, same output and gradient bit for
    bit) that keeps one uint8 per output for backward when kernel_size == stride, padding 0 and
    dilation 1 (:mod:`bnnops.pooling`); any other configuration runs torch's max pool.

    Raises:
        ValueError: ``return_indices=True`` (the int64 indices are what this layer does not keep;
            use torch.nn.MaxPool2d).
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        if return_indices:
            raise ValueError(
                "bnnops.nn.MaxPool2d does not return indices (it keeps uint8 window positions instead); "
                "use torch.nn.MaxPool2d for return_indices=True"
            )
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
