"""Bop and Bop2ndOrder: optimizers that flip binary weights (Helwegen et al., NeurIPS 2019).

"Latent Weights Do Not Exist" (arXiv 1906.02107): a binary weight w in {-1, +1} keeps only an
exponential moving average m of its gradient g and flips when m is strong enough and points the
same way as w::

    m <- m + gamma * (g - m)
    flip w where w * m > threshold          (strict: equality does not flip)

Bop2ndOrder (Suarez-Ramirez et al. 2021) also keeps the second moment v and normalizes m by it::

    v <- v + sigma * (g^2 - v)
    flip w where w * m / (sqrt(v) + 1e-10) > threshold

gamma is the param-group key ``"lr"``, so every ``torch.optim.lr_scheduler`` schedules it; the
threshold has :class:`bnnops.optim.ThresholdScheduler`.

Parameters: ``bnnops.BinaryTensor`` parameters (the bits of ``p.words`` flip in place; ``p.grad``
is a dense float tensor of the logical shape) and dense float parameters holding only +1 and -1
(their signs flip; checked once, when their state is created).

Paths: CUDA parameters take the fused Triton kernel (``bnnops.kernels.bop``: one pass over g, m
and the packed words for a whole model, a few launches), CPU parameters the pure-PyTorch
reference below. Both give the same bits: see the rounding notes in ``bnnops.kernels.bop``.

Non-finite gradients: an element whose gradient is NaN or +-inf is skipped for the step (its m, v
and sign are unchanged and it does not flip); every other element steps normally. No host sync is
needed for this. With ``torch.amp.GradScaler`` a step with any inf/NaN gradient is skipped whole
by the scaler, as for every torch optimizer.

Flip statistics: after ``step``, ``optimizer.state[p]["flips"]`` is a 0-d int64 tensor on p's
device, the number of p's weights that flipped at p's last step (counted by the kernel, no extra
pass). On the fused path it is a view of a counter buffer that later steps overwrite in place
(clone it to keep a value). :meth:`Bop.flip_ratio` is larq's FlipRatio metric. Reading them syncs;
``step`` does not.

State per parameter: ``m`` (and ``v``) of the logical shape in ``state_dtype``: float32 by default
(the fused and reference paths agree bit for bit), or bfloat16 (half the memory; m is computed in
fp32 and rounded to nearest-even when stored, so increments smaller than half a bf16 ulp of m are
lost: m then stalls near 2^8 * gamma * |g| instead of tracking g, which is still far above the
usual thresholds but biases the average). For a BinaryTensor, m is stored in the packed layout's
element order (``m.movedim(1, -1)`` is contiguous) so the kernel streams it like the words.
"""

import math
import os

import torch
from torch.optim.optimizer import Optimizer

from bnnops import kernels
from bnnops.binary_tensor import BinaryTensor
from bnnops.packing import pack_weight

__all__ = ["Bop", "Bop2ndOrder", "bop_reference_"]

STATE_DTYPES = (torch.float32, torch.bfloat16)
# sqrt(v) + eps in Bop2ndOrder's denominator (as in larq); rounded to fp32 in both paths.
SECOND_ORDER_EPS = 1e-10


def _moving_average_(state, target, rate, finite):
    """state <- state + rate * (target - state) where ``finite``: fp32, one rounding per operation."""
    old = state.float()
    new = old + (target - old) * rate
    state.copy_(torch.where(finite, new, old))  # rounds to nearest-even into bf16 state
    return state.float()


def bop_reference_(w, g, m, gamma, threshold, v=None, sigma=None):
    """One Bop step on one tensor, in place, in plain PyTorch (the rule of the module docstring).

    Args:
        w: a ``BinaryTensor`` (its ``packed`` words flip) or a dense float tensor of +-1.
        g: the gradient, float32/bfloat16/float16, of w's logical shape.
        m: the gradient average, float32 or bfloat16, of w's shape (any strides).
        gamma, threshold: floats (rounded to fp32 by torch's scalar arithmetic).
        v, sigma: the second moment and its rate for Bop2ndOrder, or None.

    Returns:
        0-d int64 tensor on w's device: how many weights flipped.

    Each operation rounds to fp32 on its own (``(g - m) * gamma`` then ``+ m``), which is what the
    kernel computes with FMA contraction off. Elements with a non-finite gradient are left alone.
    """
    g = g.float()
    finite = g.abs() < math.inf  # isfinite (NaN compares false), in two passes torch's CPU runs 3x faster
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


def _new_state(p, dtype):
    """Zero state for parameter p: a BinaryTensor's in the packed layout's element order."""
    if isinstance(p, BinaryTensor) and p.dim() > 1:
        return torch.zeros(p.shape[0], *p.shape[2:], p.shape[1], dtype=dtype, device=p.device).movedim(-1, 1)
    if isinstance(p, BinaryTensor):
        return torch.zeros(p.shape, dtype=dtype, device=p.device)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


class Bop(Optimizer):
    """The Binary Optimizer: flips +-1 weights whose gradient average agrees with them.

    Args:
        params: iterable of parameters or param-group dicts: ``BinaryTensor`` parameters and/or
            dense float parameters holding only +-1.
        lr: gamma, the adaptivity rate of m, in [0, 1] (paper: 1e-4). Named ``lr`` so
            ``torch.optim.lr_scheduler`` schedules it.
        threshold: tau >= 0 (paper: 1e-8).
        state_dtype: torch.float32 (default) or torch.bfloat16, for m (per group).
        fused: True runs the Triton kernel (CUDA parameters; on CPU only under the Triton
            interpreter, ``TRITON_INTERPRET=1``, for tests); False the PyTorch reference; None
            (default) the kernel for CUDA parameters and the reference for CPU ones. Dense
            parameters whose value or gradient is not contiguous always take the reference.
        differentiable: must be False (a flip is not differentiable).

    Sparse gradients are refused; parameters whose ``.grad`` is None are skipped. See the module
    docstring for the rule, non-finite gradients, flip statistics and state.
    """

    _second_order = False

    def __init__(self, params, lr=1e-4, threshold=1e-8, *, state_dtype=torch.float32, fused=None, differentiable=False):
        self._init(params, dict(lr=lr, threshold=threshold), state_dtype, fused, differentiable)

    def _init(self, params, hyper, state_dtype, fused, differentiable):
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: a sign flip has no gradient")
        defaults = dict(hyper, state_dtype=state_dtype, fused=fused, differentiable=False)
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._steppers = {}  # device -> kernels.bop.FusedBop, which keeps its launch tables

    def __setstate__(self, state):
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

    def add_param_group(self, param_group):
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
    def step(self, closure=None):
        """One Bop step over every parameter with a gradient; returns the closure's loss, if any.

        Host cost: the fused path reads a few attributes per parameter and launches the kernel once
        per set of compile-time constants (usually once); the launch tables are rebuilt only when a
        weight or state moved or a gradient changed dtype or layout (see ``kernels.bop.FusedBop``).
        Nothing here waits for the device.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fused = {}  # device -> (grads, weights, ms, vs, hyper rows, states) for the kernel
        reference = []
        # Plain attribute reads: BinaryTensor's __torch_function__ would otherwise run for each
        # p.grad, p.device...; the reference ops below run outside this (the subclass then routes).
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
        for p, g, state, group in reference:
            state["flips"] = bop_reference_(
                p, g, state["m"], group["lr"], group["threshold"], state.get("v"), group.get("sigma")
            )
        for device, batch in fused.items():
            self._fused_step(device, *batch)
        return loss

    def _fused_step(self, device, grads, weights, ms, vs, rows, states):
        stepper = self._steppers.get(device)
        if stepper is None:
            stepper = self._steppers[device] = kernels.load("bop").FusedBop()
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

    def flip_ratio(self, params=None):
        """larq's FlipRatio: flipped weights / weights over ``params`` (default: all with state).

        Counts the flips of each parameter's last step. Returns a 0-d float32 tensor on the
        parameters' device (reading it syncs), or None when no parameter has stepped.
        """
        params = [p for p in (params if params is not None else self.state) if "flips" in self.state.get(p, {})]
        if not params:
            return None
        flips = torch.stack([self.state[p]["flips"] for p in params]).sum()
        return flips.float() / sum(p.numel() for p in params)

    def load_state_dict(self, state_dict):
        """Load like torch, but keep m and v in each group's ``state_dtype`` and layout, flips int64.

        The hyperparameters (lr, threshold, sigma, state_dtype) come from the checkpoint, as for
        every torch optimizer; ``fused`` stays this optimizer's (a checkpoint from a GPU run loads
        on the CPU). A Bop state_dict does not load into a Bop2ndOrder, nor the reverse.

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

    Like :class:`Bop` plus ``sigma`` (the rate of the second moment v, in [0, 1]); flips where
    ``w * m / (sqrt(v) + 1e-10) > threshold``. Defaults: lr (gamma) 1e-6, threshold 1e-6, sigma 1e-2.
    """

    _second_order = True

    def __init__(
        self,
        params,
        lr=1e-6,
        threshold=1e-6,
        sigma=1e-2,
        *,
        state_dtype=torch.float32,
        fused=None,
        differentiable=False,
    ):
        self._init(params, dict(lr=lr, threshold=threshold, sigma=sigma), state_dtype, fused, differentiable)
