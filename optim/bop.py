"""Bop and Bop2ndOrder: optimizers that flip binary weights (Helwegen et al., NeurIPS 2019).

Two paths give the same bits: CUDA parameters take the fused Triton kernel
(``bnnops.kernels.bop``: one pass over g, m and the words for a whole model, a few launches), CPU
parameters the pure-PyTorch reference :func:`bop_reference_` (the rounding contract is in the
``bnnops.kernels.bop`` docstring).
"""

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from bnnops import kernels
from bnnops.binary_tensor import BinaryTensor
from bnnops.packing import pack_weight

__all__ = ["Bop", "Bop2ndOrder", "bop_reference_"]

STATE_DTYPES = (torch.float32, torch.bfloat16)
# sqrt(v) + eps in Bop2ndOrder's denominator (as in larq); rounded to fp32 in both paths.
SECOND_ORDER_EPS = 1e-10


class Bop(Optimizer):
    """The Binary Optimizer: flips +-1 weights whose gradient average agrees with them.

    From "Latent Weights Do Not Exist" (Helwegen et al. 2019, arXiv 1906.02107). A binary weight
    keeps no latent real value, only an exponential moving average m of its gradient, and flips
    when m is strong enough and has w's sign (the loss grows along w)::

        input: gamma (lr), tau (threshold), weights w in {-1, +1}, objective f
        m <- 0
        for t = 1, 2, ...:
            g <- grad f(w)
            m <- m + gamma * (g - m)
            w <- -w  where  w * m > tau  (strict: equality does not flip)

    gamma is the param-group key ``"lr"``, so every ``torch.optim.lr_scheduler`` schedules it; the
    threshold has :class:`bnnops.optim.ThresholdScheduler`.

    An element whose gradient is NaN or +-inf is skipped for the step: its m (and v) and sign stay
    and it does not flip; every other element steps. This needs no host sync. With
    ``torch.amp.GradScaler`` a step with any inf/NaN gradient is skipped whole by the scaler, as for
    every torch optimizer.

    Args:
        params: iterable of parameters or param-group dicts: ``bnnops.BinaryTensor`` parameters
            (the bits of ``p.words`` flip in place; ``p.grad`` is a dense float tensor of the
            logical shape) and/or dense float parameters holding only +1 and -1 (their signs flip;
            checked when their state is created).
        lr: gamma, the adaptivity rate of m, in [0, 1] (paper: 1e-4).
        threshold: tau >= 0 (paper: 1e-8).
        state_dtype: dtype of m (per group): torch.float32 (default; the fused and reference
            paths agree bit for bit) or torch.bfloat16 (half the memory; m is computed in fp32
            and rounded to nearest-even when stored, so an increment under half a bf16 ulp of m is
            lost and m stalls near 2^8 * gamma * |g|, far above usual thresholds but biased).
        fused: True runs the Triton kernel (CUDA parameters; on CPU only under the Triton
            interpreter, ``TRITON_INTERPRET=1``, for tests); False the PyTorch reference; None
            (default) the kernel for CUDA parameters and the reference for CPU ones. Dense
            parameters whose value or gradient is not contiguous always take the reference.
        differentiable: must be False (a flip has no gradient).

    Raises:
        TypeError: a hyperparameter that is not a Python number, a ``state_dtype`` other than
            float32/bfloat16, ``fused`` not None/True/False, a parameter that is neither a
            ``BinaryTensor`` nor floating point.
        ValueError: lr outside [0, 1], a negative threshold, ``differentiable=True``,
            ``fused=True`` with non-CUDA parameters outside the interpreter; at the first step, a
            dense parameter holding values other than +-1.

    Hyperparameters are checked at construction, in :meth:`add_param_group`, and at every
    :meth:`step` (schedulers and users write the groups between steps). Sparse gradients are
    refused; parameters whose ``.grad`` is None are skipped.

    State per parameter (``optimizer.state[p]``):

    - ``"m"``: of p's logical shape in ``state_dtype``; for a BinaryTensor in the packed layout's
      element order (``m.movedim(1, -1)`` contiguous), so the kernel streams it like the words.
    - ``"flips"``: 0-d int64 on p's device, the number of p's weights that flipped at p's last step
      (counted by the kernel, no extra pass). On the fused path it is a view of a counter buffer
      that later steps overwrite in place (clone it to keep a value). :meth:`flip_ratio` is larq's
      FlipRatio metric. Reading either syncs; :meth:`step` does not.
    """

    _second_order = False

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        threshold: float = 1e-8,
        *,
        state_dtype: torch.dtype = torch.float32,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        self._init(params, dict(lr=lr, threshold=threshold), state_dtype, fused, differentiable)

    def _init(self, params, hyper, state_dtype, fused, differentiable):
        """The constructor of Bop and Bop2ndOrder: ``hyper`` holds their own hyperparameters."""
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: a sign flip has no gradient")
        defaults = dict(hyper, state_dtype=state_dtype, fused=fused, differentiable=False)
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._steppers = {}  # device -> bnnops.kernels.bop_plan.FusedBop, which keeps its launch tables

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._steppers = {}

    def _check_hyperparameters(self, group):
        name = type(self).__name__
        for key in ("lr", "threshold", "sigma"):
            if key in group and not isinstance(group[key], (float, int)):
                raise TypeError(f"{name} {key} must be a Python number, got {type(group[key]).__name__}")
        if not 0.0 <= group["lr"] <= 1.0:
            raise ValueError(f"{name} lr (gamma) must be in [0, 1], got {group['lr']}")
        if not 0.0 <= group.get("sigma", 0.0) <= 1.0:
            raise ValueError(f"{name} sigma must be in [0, 1], got {group['sigma']}")
        if not group["threshold"] >= 0.0:
            raise ValueError(f"{name} threshold must be >= 0, got {group['threshold']}")
        if group["state_dtype"] not in STATE_DTYPES:
            raise TypeError(f"{name} state_dtype must be torch.float32 or torch.bfloat16, got {group['state_dtype']}")
        if group["fused"] not in (None, True, False):
            raise TypeError(f"{name} fused must be None, True or False, got {group['fused']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group like torch, then check its hyperparameters and parameters (see Raises)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group):
        self._check_hyperparameters(group)
        for p in group["params"]:
            if not (isinstance(p, BinaryTensor) or p.is_floating_point()):
                raise TypeError(
                    f"{type(self).__name__} trains BinaryTensor parameters and dense float parameters of +-1, "
                    f"got a {p.dtype} parameter of shape {tuple(p.shape)}"
                )
            if group["fused"] and not (p.is_cuda or _interpreting()):
                raise ValueError(
                    f"{type(self).__name__}(fused=True) needs CUDA parameters (the Triton kernel), got one on "
                    f"{p.device}; use fused=None or False for the PyTorch reference"
                )

    def _init_state(self, p, group, state):
        if not isinstance(p, BinaryTensor) and not torch.all((p == 1) | (p == -1)):
            raise ValueError(
                f"{type(self).__name__} trains dense parameters that hold only +1 and -1; the parameter of shape "
                f"{tuple(p.shape)} holds other values. Binarize it first (e.g. torch.where(w < 0, -1.0, 1.0)) or make "
                "it a bnnops.BinaryTensor."
            )
        state["m"] = _new_state(p, group["state_dtype"])
        if self._second_order:
            state["v"] = _new_state(p, group["state_dtype"])
        state["flips"] = torch.zeros((), dtype=torch.int64, device=p.device)

    def _fused(self, p, g, group):
        fused = group["fused"]
        if fused is None:
            fused = p.is_cuda and kernels.triton_available()
        return fused and (isinstance(p, BinaryTensor) or (p.is_contiguous() and g.is_contiguous()))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Bop step over every parameter with a gradient; returns the closure's loss, if any.

        The fused path reads a few attributes per parameter and launches the kernel once per set
        of compile-time constants (usually once); its launch tables are rebuilt only when a weight
        or state moved or a gradient changed dtype or layout (``bnnops.kernels.bop_plan``).
        Nothing here waits for the device.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused, reference = self._gather()
        for p, g, state, group in reference:
            state["flips"] = bop_reference_(
                p, g, state["m"], group["lr"], group["threshold"], state.get("v"), group.get("sigma")
            )
        for device, batch in fused.items():
            self._fused_step(device, *batch)
        return loss

    def _gather(self):
        """The parameters to step, with state created: per device the kernel's lists, and the
        (p, g, state, group) of the reference path."""
        fused = {}  # device -> (grads, weights, ms, vs, hyper rows, states)
        reference = []
        # Plain attribute reads: BinaryTensor's __torch_function__ would otherwise run for each
        # p.grad, p.device...; the reference ops run outside this (the subclass then routes).
        with torch._C.DisableTorchFunctionSubclass():
            for h, group in enumerate(self.param_groups):
                # Schedulers and users write the groups between steps: check what this step uses.
                self._check_hyperparameters(group)
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    if g.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    state = self.state[p]
                    if not state:
                        self._init_state(p, group, state)
                    if not self._fused(p, g, group):
                        reference.append((p, g, state, group))
                        continue
                    batch = fused.get(p.device)
                    if batch is None:
                        batch = fused[p.device] = ([], [], [], [] if self._second_order else None, [], [])
                    grads, weights, ms, vs, rows, states = batch
                    grads.append(g)
                    weights.append(p.words if isinstance(p, BinaryTensor) else p)
                    ms.append(state["m"])
                    if vs is not None:
                        vs.append(state["v"])
                    rows.append(h)
                    states.append(state)
        return fused, reference

    def _fused_step(self, device, grads, weights, ms, vs, rows, states):
        stepper = self._steppers.get(device)
        if stepper is None:
            stepper = self._steppers[device] = kernels.load("bop_plan").FusedBop()
        groups = self.param_groups
        stepper.step(
            grads,
            weights,
            ms,
            [g["lr"] for g in groups],
            [g["threshold"] for g in groups],
            vs=vs,
            sigmas=[g["sigma"] for g in groups] if vs is not None else None,
            hyper_rows=rows,
        )
        for state, count in zip(states, stepper.counts):
            state["flips"] = count

    def flip_ratio(self, params: Iterable[torch.Tensor] | None = None) -> torch.Tensor | None:
        """larq's FlipRatio: flipped weights / weights over ``params`` (default: all with state).

        Counts the flips of each parameter's last step. Returns a 0-d float32 tensor on the
        parameters' device (reading it syncs), or None when no parameter has stepped.
        """
        params = [p for p in (params if params is not None else self.state) if "flips" in self.state.get(p, {})]
        if not params:
            return None
        flips = torch.stack([self.state[p]["flips"] for p in params]).sum()
        return flips.float() / sum(p.numel() for p in params)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, but keep m and v in each group's ``state_dtype`` and layout, flips int64.

        The hyperparameters (lr, threshold, sigma, state_dtype) come from the checkpoint, as for
        every torch optimizer; ``fused`` stays this optimizer's (a checkpoint from a GPU run loads
        on the CPU).

        Raises:
            ValueError: a Bop state_dict loaded into a Bop2ndOrder, or the reverse.

        torch casts every state tensor of a float parameter to the parameter's dtype, which would
        round fp32 state of a bf16 parameter and make the flip counts floats; here the saved
        tensors are copied into fresh state of the right dtype.
        """
        name = type(self).__name__
        if any(("sigma" in g) != self._second_order for g in state_dict["param_groups"]):
            other = "Bop" if self._second_order else "Bop2ndOrder"
            raise ValueError(
                f"{name} cannot load a {other} state_dict: the second moment v and sigma "
                f"{'are missing' if self._second_order else 'have no use here'}"
            )
        saved = state_dict["state"]
        # New state tensors may reuse the addresses of the old ones: rebuild the launch tables.
        self._steppers.clear()
        fused = [group["fused"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, how in zip(self.param_groups, fused):
            group["fused"] = how  # how to run is this optimizer's choice, not the checkpoint's
            self._check_group(group)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        for group in self.param_groups:
            for p in group["params"]:
                entry = saved.get(next(saved_ids))
                for key in ("m", "v"):
                    if entry is not None and key in entry:
                        self.state[p][key] = _new_state(p, group["state_dtype"]).copy_(entry[key])
                if entry is not None and "flips" in entry:
                    self.state[p]["flips"] = entry["flips"].to(p.device, torch.int64, copy=True)


class Bop2ndOrder(Bop):
    """Bop with a second-moment normalization (Suarez-Ramirez et al. 2021).

    Like :class:`Bop`, and also keeps the second moment v of the gradient (state ``"v"``, like
    ``"m"``)::

        v <- v + sigma * (g * g - v)
        w <- -w  where  w * m / (sqrt(v) + 1e-10) > tau

    Args:
        params, threshold, state_dtype, fused, differentiable: as for :class:`Bop`.
        lr: gamma, in [0, 1].
        sigma: the rate of v, in [0, 1].

    Defaults: lr (gamma) 1e-6, threshold 1e-6, sigma 1e-2. A Bop state_dict does not load into a
    Bop2ndOrder, nor the reverse.
    """

    _second_order = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-6,
        threshold: float = 1e-6,
        sigma: float = 1e-2,
        *,
        state_dtype: torch.dtype = torch.float32,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        self._init(params, dict(lr=lr, threshold=threshold, sigma=sigma), state_dtype, fused, differentiable)


def bop_reference_(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    gamma: float,
    threshold: float,
    v: torch.Tensor | None = None,
    sigma: float | None = None,
) -> torch.Tensor:
    """One Bop (or Bop2ndOrder) step on one tensor, in place, in plain PyTorch.

    Args:
        w: a ``BinaryTensor`` (its ``words`` flip) or a dense float tensor of +-1.
        g: the gradient, float32/bfloat16/float16, of w's logical shape.
        m: the gradient average, float32 or bfloat16, of w's shape (any strides).
        gamma, threshold: floats (rounded to fp32 by torch's scalar arithmetic).
        v, sigma: the second moment (like m) and its rate for Bop2ndOrder, or None.

    Returns:
        0-d int64 tensor on w's device: how many weights flipped.

    Each operation rounds to fp32 on its own (``(g - m) * gamma`` then ``+ m``), which is what the
    kernel computes with FMA contraction off. Elements with a non-finite gradient are left alone.
    """
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


def _new_state(p, dtype):
    """Zero state for parameter p: a BinaryTensor's in the packed layout's element order."""
    if isinstance(p, BinaryTensor) and p.dim() > 1:
        return torch.zeros(p.shape[0], *p.shape[2:], p.shape[1], dtype=dtype, device=p.device).movedim(-1, 1)
    if isinstance(p, BinaryTensor):
        return torch.zeros(p.shape, dtype=dtype, device=p.device)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"
