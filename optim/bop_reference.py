"""The Bop rule on one tensor in plain PyTorch: the CPU path, and what the fused kernel equals.

The rounding contract (every operation rounds to fp32 on its own, bf16 state rounds to
nearest-even) is in the ``bnnops.kernels.bop`` docstring.
"""

import math

import torch

from bnnops.binary_tensor import BinaryTensor
from bnnops.packing import pack_weight

__all__ = ["SECOND_ORDER_EPS", "bop_reference_"]

# sqrt(v) + eps in Bop2ndOrder's denominator (as in larq); rounded to fp32 in both paths.
SECOND_ORDER_EPS = 1e-10


def bop_reference_(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    gamma: float | torch.Tensor,
    threshold: float | torch.Tensor,
    v: torch.Tensor | None = None,
    sigma: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One Bop (or Bop2ndOrder) step on one tensor, in place, in plain PyTorch.

    Args:
        w: a ``BinaryTensor`` (its ``words`` flip) or a dense float tensor of +-1.
        g: the gradient, a floating-point tensor of w's logical shape (read as fp32).
        m: the gradient average, float32 or bfloat16, of w's shape (any strides).
        gamma, threshold: Python numbers or 1-element floating-point tensors, rounded to fp32
            (as torch rounds a Python scalar against an fp32 tensor).
        v, sigma: the second moment (like m) and its rate for Bop2ndOrder, or None.

    Returns:
        0-d int64 tensor on w's device: how many weights flipped.

    Each operation rounds to fp32 on its own (``(g - m) * gamma`` then ``+ m``), which is what the
    kernel computes with FMA contraction off. Elements with a non-finite gradient are left alone.
    """
    gamma, threshold, sigma = (_scalar(x, m.device) for x in (gamma, threshold, sigma))
    g = g.float()
    finite = g.abs() < math.inf  # isfinite (NaN compares false), and faster than torch.isfinite on CPU
    m_hat = _moving_average_(m, g, gamma, finite)
    if v is not None:
        m_hat = m_hat / (_moving_average_(v, g * g, sigma, finite).sqrt() + SECOND_ORDER_EPS)
    negative = (w.dequantize() if isinstance(w, BinaryTensor) else w) < 0
    flip = finite & (torch.where(negative, -m_hat, m_hat) > threshold)  # w * m > threshold
    if isinstance(w, BinaryTensor):
        w.words.bitwise_xor_(pack_weight(flip))
    else:
        w.copy_(torch.where(flip, -w, w))
    return flip.sum(dtype=torch.int64)


def _moving_average_(state, target, rate, finite):
    """state <- state + rate * (target - state) where ``finite``: fp32, one rounding per operation."""
    old = state.float()
    new = old + (target - old) * rate
    state.copy_(torch.where(finite, new, old))  # rounds to nearest-even into bf16 state
    return state.float()


def _scalar(x, device):
    """A hyperparameter as an operand: a number as is; a tensor as a 0-d fp32 tensor usable on
    ``device`` (a CPU one stays there: ops on CUDA tensors read a 0-d CPU tensor without a sync)."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.reshape(()).to(torch.float32)
    return x if x.device == device or x.device.type == "cpu" else x.to(device)
