"""Bop and Bop2ndOrder: optimizers that flip binary weights (Helwegen et al., NeurIPS 2019).

Two paths give the same bits: CUDA parameters take the fused Triton kernel
(``bnnops.kernels.bop``: one pass over g, m and the words for a whole model, a few launches), CPU
parameters the pure-PyTorch reference :func:`bnnops.optim.bop_reference_` (the rounding contract
is in the ``bnnops.kernels.bop`` docstring). The state's rules, its creation and its loading from a
checkpoint are in ``bnnops.optim.bop_state``.
"""

import itertools
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer
from torch.optim.optimizer import Optimizer, ParamsT

from bnnops import kernels
from bnnops.binary_tensor import BinaryTensor
from bnnops.optim.bop_reference import bop_reference_
from bnnops.optim.bop_state import HYPERPARAMETERS, STATE_DTYPES, checked_state_dict, fresh_state
from bnnops.optim.bop_step_plan import StepPlan

__all__ = ["Bop", "Bop2ndOrder"]

# Gradient (and dense weight) dtypes the fused kernel reads.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-parameter reads of the cached step, each mapped over a whole list at once (the loop runs in C).
_GRAD = operator.attrgetter("grad")
_WORDS = operator.attrgetter("words")
_M = operator.itemgetter("m")
_V = operator.itemgetter("v")


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
        params: iterable of parameters (or of (name, parameter) pairs) or param-group dicts:
            ``bnnops.BinaryTensor`` parameters (the bits of ``p.words`` flip in place; ``p.grad``
            is a dense float tensor of the logical shape) and/or dense float parameters holding
            only +1 and -1 (their signs flip; checked when their state is created). A model's
            real-valued parameters (batch norm, biases) belong to another optimizer:
            :func:`bnnops.optim.split_parameters` splits them off.
        lr: gamma, the adaptivity rate of m, in [0, 1] (paper: 1e-4).
        threshold: tau >= 0 (paper: 1e-8).
        state_dtype: dtype of m (per group): torch.float32 (default; the fused and reference
            paths agree bit for bit) or torch.bfloat16 (half the memory; m is computed in fp32
            and rounded to nearest-even when stored, so an increment under half a bf16 ulp of m is
            lost and m stalls near 2^8 * gamma * |g|, far above usual thresholds but biased).
        fused: True runs the Triton kernel (CUDA parameters; on CPU only under the Triton
            interpreter, ``TRITON_INTERPRET=1``, for tests); False the PyTorch reference; None
            (default) the kernel for CUDA parameters and the reference for CPU ones. Parameters
            the kernel cannot read always take the reference: a dense one whose value or gradient
            is not contiguous, a float64 one (the kernel reads fp32, bf16 and fp16). Under ``torch.compile`` every parameter takes the
            reference (the kernel's launch reads raw addresses, which a graph cannot hold): the
            compiler fuses its ops, under the compiler's rounding (Inductor may contract a
            multiply and an add into one FMA, which the bit-for-bit contract excludes).
        capturable: True steps every parameter on the PyTorch reference path, eagerly too, so
            that a step can be recorded into a CUDA graph (``torch.cuda.graph``) and replayed;
            see "CUDA graphs" below. It takes precedence over ``fused`` (``torch.compile`` sets it
            in the groups of CUDA parameters without state, as for torch's optimizers; the compiled
            step takes the reference path either way).
            False (default): CUDA parameters take the fused kernel, and a step while a CUDA graph
            is being captured raises.
        differentiable: must be False (a flip has no gradient).

    lr, threshold (and Bop2ndOrder's sigma) are Python numbers or 1-element floating-point
    tensors, as torch's optimizers take a tensor lr; a tensor is kept in the group as given (so
    ``torch.optim.lr_scheduler`` fills it in place, and a compiled step does not recompile when
    it changes) and rounds to fp32 like a number.

    Raises:
        TypeError: a hyperparameter that is neither a Python number nor a 1-element
            floating-point tensor, a ``state_dtype`` other than float32/bfloat16, ``fused`` not
            None/True/False, ``capturable`` not True/False, a parameter that is neither a
            ``BinaryTensor`` nor floating point.
        ValueError: lr outside [0, 1], a negative threshold, a tensor hyperparameter of more than
            one element, ``differentiable=True``, ``fused=True`` with non-CUDA parameters outside
            the interpreter; at the step that creates its state, a dense parameter holding values
            other than +-1 (under ``torch.compile`` an assertion inside the graph instead: a
            RuntimeError on the CPU, a device-side assert on CUDA).

    Hyperparameters are checked at construction, in :meth:`add_param_group`, in
    :meth:`load_state_dict`, and at every :meth:`step` (schedulers and users write the groups
    between steps); a tensor's value is checked where it enters a group, its form at every step
    (reading its value there would sync). Sparse gradients are refused; parameters whose
    ``.grad`` is None are skipped.

    CUDA graphs: with ``capturable=True`` a step run while the current CUDA stream captures records
    plain torch ops (the reference path: no host sync, no host-to-device copy, no Python branch on a
    tensor's value), which a replay runs again on the same tensors, bit for bit what an eager step
    computes (the reference rounds as the kernel does: ``bnnops.kernels.bop``). The fused kernel
    cannot be recorded: its launch plan uploads tables from host memory made per step. Warm-up:
    run at least one eager step (on a side stream, as ``torch.cuda.graph`` asks) before capturing:
    it creates the state and compiles and fills everything the step uses. Capturing then needs
    every parameter with a gradient to have its state, its group ``capturable=True`` and to be on
    the capturing device (a step elsewhere would run once at capture, never on replay), a
    tensor hyperparameter on its parameters' device (a replay reads it there, so a scheduler that
    writes it in place is seen), and a Python-number hyperparameter is fixed into the graph at its
    value when captured. The ``"flips"`` tensors a captured step stores are written by every replay.

    State per parameter (``optimizer.state[p]``; rules in ``bnnops.optim.bop_state``):

    - ``"m"``: of p's logical shape in ``state_dtype``; for a BinaryTensor in the packed layout's
      element order (``m.movedim(1, -1)`` contiguous), so the kernel streams it like the words.
    - ``"flips"``: 0-d int64 on p's device, the number of p's weights that flipped at p's last step
      (counted by the kernel, no extra pass). On the fused path it is a view of a counter buffer
      that later steps overwrite in place (clone it to keep a value). :meth:`flip_ratio` is larq's
      FlipRatio metric. Reading either syncs; :meth:`step` does not.

    A parameter has all of its state or none: it is created whole at the parameter's first step.
    """

    _second_order = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-4,
        threshold: float | torch.Tensor = 1e-8,
        *,
        state_dtype: torch.dtype = torch.float32,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        self._init(params, dict(lr=lr, threshold=threshold), state_dtype, fused, capturable, differentiable)

    def _init(self, params, hyper, state_dtype, fused, capturable, differentiable):
        """The constructor of Bop and Bop2ndOrder: ``hyper`` holds their own hyperparameters."""
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True: a sign flip has no gradient")
        defaults = dict(hyper, state_dtype=state_dtype, fused=fused, capturable=capturable, differentiable=False)
        self._check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._steppers = {}  # device -> bnnops.kernels.bop_plan.FusedBop, which keeps its launch tables
        self._step_plan = None  # the cached step (StepPlan) of the current param list

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a state saved before the ``capturable`` key existed gets ``capturable=False``
        in its defaults and every group (as torch's Adam does)."""
        super().__setstate__(state)
        self.defaults.setdefault("capturable", False)
        for group in self.param_groups:
            group.setdefault("capturable", False)
        self._steppers = {}
        self._step_plan = None

    def _check_hyperparameters(self, group, tensor_values=True, cpu_values=True):
        """Check a group's hyperparameters (see Raises); a device tensor's value only with
        ``tensor_values``, a CPU tensor's unless ``cpu_values`` is False (a step being captured)."""
        name = type(self).__name__
        values = {}
        for key in HYPERPARAMETERS:
            if key not in group:
                continue
            x = group[key]
            if isinstance(x, torch.Tensor):
                if x.numel() != 1:
                    raise ValueError(f"{name}: Tensor {key} must be 1-element, got {x.numel()} elements")
                if not x.is_floating_point():
                    raise TypeError(
                        f"{name} {key} must be a Python number or a 1-element float tensor, got a {x.dtype} tensor"
                    )
                # A CPU tensor's value is read every step (no sync); a device tensor's only where
                # it enters a group (reading it would wait for the device).
                if tensor_values or (cpu_values and x.device.type == "cpu" and not torch.compiler.is_compiling()):
                    values[key] = x.item()
            elif isinstance(x, (float, int)):
                values[key] = x
            else:
                raise TypeError(
                    f"{name} {key} must be a Python number or a 1-element float tensor, got {type(x).__name__}"
                )
        if "lr" in values and not 0.0 <= values["lr"] <= 1.0:
            raise ValueError(f"{name} lr (gamma) must be in [0, 1], got {values['lr']}")
        if "sigma" in values and not 0.0 <= values["sigma"] <= 1.0:
            raise ValueError(f"{name} sigma must be in [0, 1], got {values['sigma']}")
        if "threshold" in values and not values["threshold"] >= 0.0:
            raise ValueError(f"{name} threshold must be >= 0, got {values['threshold']}")
        if group["state_dtype"] not in STATE_DTYPES:
            raise TypeError(f"{name} state_dtype must be torch.float32 or torch.bfloat16, got {group['state_dtype']}")
        if group["fused"] not in (None, True, False):
            raise TypeError(f"{name} fused must be None, True or False, got {group['fused']!r}")
        capturable = group.get("capturable", False)  # a checkpoint saved without the key: False
        if not isinstance(capturable, bool):
            raise TypeError(f"{name} capturable must be True or False, got {capturable!r}")

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

    def _check_signs(self, p, where):
        """A dense parameter must hold only +-1 (checked once, when its state is created)."""
        message = (
            f"{type(self).__name__} trains dense parameters that hold only +1 and -1, but {where} (shape "
            f"{tuple(p.shape)}) holds values other than +-1. Binarize it first (torch.where(w < 0, -1.0, 1.0)) or "
            "make it a bnnops.BinaryTensor; a model's real-valued parameters (batch norm, biases) belong to "
            "another optimizer: binary, real = bnnops.optim.split_parameters(model), then "
            "bnnops.optim.BinaryAndReal(Bop(binary), torch.optim.Adam(real))."
        )
        signs = torch.all((p == 1) | (p == -1))
        if torch.compiler.is_compiling():
            torch._assert_async(signs, message)  # a graph cannot branch on a value
        elif not signs:
            raise ValueError(message)

    def _fused(self, p, g, group):
        if group["capturable"]:
            return False
        fused = group["fused"]
        if fused is None:
            fused = p.is_cuda and kernels.triton_available()
        if not fused or g.dtype not in KERNEL_DTYPES:
            return False
        return isinstance(p, BinaryTensor) or (p.dtype in KERNEL_DTYPES and p.is_contiguous() and g.is_contiguous())

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Bop step over every parameter with a gradient; returns the closure's loss, if any.

        The first step, and any step after the parameters, their gradients' dtypes, shapes or
        strides, the groups' ``state_dtype``, ``fused`` or ``capturable``, or the state changed,
        checks every parameter, creates missing state and plans the step
        (:class:`~bnnops.optim.bop_step_plan.StepPlan`). Every other step checks those in passes that
        run in C over the parameter lists, and launches the kernel once per set of compile-time
        constants (usually once). Nothing here waits for the device. A step while the current CUDA
        stream captures a graph runs the reference ops only (class docstring, "CUDA graphs").

        The step and zero-grad hooks of ``torch.optim.Optimizer`` run as for any torch optimizer,
        and under a running profiler the step is recorded as ``Optimizer.step#<class>.step``. This
        method runs them itself: torch's wrapper (which records a profiler range at every call,
        profiler or not) costs more host time than the cached step.
        """
        if type(self).step is not Bop.step:  # a subclass's step: torch's wrapper runs the hooks around it
            return self._step(closure)
        if torch.compiler.is_compiling() or (
            torch_optimizer._global_optimizer_pre_hooks
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_post_hooks
            or torch.autograd._profiler_enabled()
        ):
            return self._step_with_hooks(closure)
        return self._step(closure)

    # torch.optim.Optimizer wraps a step not marked "hooked" in its profiling and hook wrapper.
    step.hooked = True

    def _step_with_hooks(self, closure):
        """The step as torch's wrapper runs it: pre-hooks (which may replace the arguments), the
        step inside a profiler range, the profiler's tracing entry point, post-hooks. The hooks
        see the closure as a positional argument."""
        args, kwargs = ((self,) if closure is None else (self, closure)), {}
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            for hook in itertools.chain(
                torch_optimizer._global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()
            ):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"{self.step} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
                    args, kwargs = result
            out = self._step(*args[1:], **kwargs)
            self._optimizer_step_code()
            for hook in itertools.chain(
                self._optimizer_step_post_hooks.values(), torch_optimizer._global_optimizer_post_hooks.values()
            ):
                hook(self, args, kwargs)
            return out

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            with torch.no_grad():
                _, reference, _ = self._plan_step(compiling=True)
                self._step_reference(reference)
            return loss
        if _capturing():
            with torch.no_grad():
                self._step_reference(self._captured_reference())
            return loss
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            plan = self._step_plan
            if plan is None or not plan.step(self):
                self._step_plan = None
                plan = StepPlan(self, *self._plan_step(compiling=False))
                if not plan.step(self, plan_anew=True):  # a plan made from these parameters holds them
                    raise RuntimeError(f"{type(self).__name__}: a fresh step plan did not hold its parameters")
                self._step_plan = plan
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def _plan_step(self, compiling):
        """Check every parameter with a gradient and create missing state; return how each steps.

        Returns:
            (fused, reference, skipped): per device the (BinaryTensor, dense) parameters and their
            group indices for the kernel; the (parameter, group) pairs of the reference path (every
            one when ``compiling``); the parameters without a gradient.
        """
        fused = {}  # device -> ([BinaryTensor params], [dense params], [their group indices, binary first])
        reference, skipped = [], []
        name = type(self).__name__
        # Plain attribute reads: BinaryTensor's __torch_function__ would otherwise run for each
        # p.grad, p.device...; the reference ops run outside this (the subclass then routes).
        with torch._C.DisableTorchFunctionSubclass():
            for h, group in enumerate(self.param_groups):
                # Schedulers and users write the groups between steps: check what this step uses.
                self._check_hyperparameters(group, tensor_values=False)
                for i, p in enumerate(group["params"]):
                    g = p.grad
                    if g is None:
                        skipped.append(p)
                        continue
                    if g.is_sparse:
                        raise RuntimeError(f"{name} does not support sparse gradients")
                    state = self.state[p]
                    if not state:
                        if not isinstance(p, BinaryTensor):
                            self._check_signs(p, f"param_groups[{h}]['params'][{i}]")
                        # One update from a whole dict: an exception while allocating leaves no partial state.
                        state.update(fresh_state(p, group["state_dtype"], self._second_order))
                    elif "m" not in state or (self._second_order and "v" not in state):
                        raise RuntimeError(
                            f"{name} state of param_groups[{h}]['params'][{i}] lacks "
                            f"{'m' if 'm' not in state else 'v'}: it was changed outside the optimizer"
                        )
                    if compiling or not self._fused(p, g, group):
                        reference.append((p, group))
                        continue
                    binary, dense, rows = fused.setdefault(p.device, ([], [], ([], [])))
                    is_binary = isinstance(p, BinaryTensor)
                    (binary if is_binary else dense).append(p)
                    rows[0 if is_binary else 1].append(h)
        return fused, reference, skipped

    def _captured_reference(self):
        """The (parameter, group) pairs of a step being captured in a CUDA graph, checked as the
        class docstring's "CUDA graphs" asks (a RuntimeError otherwise). Reads no tensor's value."""
        name = type(self).__name__
        keys = HYPERPARAMETERS if self._second_order else HYPERPARAMETERS[:2]
        reference = []
        device = _capturing_device()
        with torch._C.DisableTorchFunctionSubclass():
            for h, group in enumerate(self.param_groups):
                self._check_hyperparameters(group, tensor_values=False, cpu_values=False)
                for i, p in enumerate(group["params"]):
                    g = p.grad
                    if g is None:
                        continue
                    where = f"param_groups[{h}]['params'][{i}]"
                    if not group["capturable"]:
                        raise RuntimeError(
                            f"{name}(capturable=False) cannot be captured in a CUDA graph ({where}): the fused "
                            f"kernel's launch plan uploads tables from host memory made per step; construct it "
                            f"with capturable=True (the reference path, eagerly too) or step outside the graph"
                        )
                    if p.device != device:
                        raise RuntimeError(
                            f"{name}: {where} is on {p.device} but the CUDA graph is captured on {device}: "
                            f"its step would run once at capture and never on replay; put it on {device} or "
                            f"step it with another optimizer outside the graph"
                        )
                    if g.is_sparse:
                        raise RuntimeError(f"{name} does not support sparse gradients")
                    state = self.state.get(p)
                    if not state or "m" not in state or (self._second_order and "v" not in state):
                        raise RuntimeError(
                            f"{name}: {where} has no state while a CUDA graph is being captured; state is "
                            f"created at a parameter's first step, which a capture cannot hold: run an eager "
                            f"step (warm-up) before capturing"
                        )
                    for key in keys:
                        x = group[key]
                        if isinstance(x, torch.Tensor) and x.device != p.device:
                            raise RuntimeError(
                                f"{name}: {key} is a tensor on {x.device} but {where} is on {p.device}; a CUDA "
                                f"graph would keep its value at capture: put it on {p.device} (a replay reads it "
                                f"there) or make it a Python number (fixed at capture)"
                            )
                    reference.append((p, group))
        return reference

    def _step_reference(self, reference):
        for p, group in reference:
            state = self.state[p]
            state["flips"] = bop_reference_(
                p, p.grad, state["m"], group["lr"], group["threshold"], state.get("v"), group.get("sigma")
            )

    def flip_ratio(self, params: Iterable[torch.Tensor] | None = None) -> torch.Tensor | None:
        """larq's FlipRatio: flipped weights / weights over ``params`` (default: all with state).

        Counts the flips of each parameter's last step. Returns a 0-d float32 tensor on the
        parameters' device (reading it syncs): 0.0 when those parameters have no weights at all
        (zero-size), None when no parameter has stepped.
        """
        params = [p for p in (params if params is not None else self.state) if "flips" in self.state.get(p, {})]
        if not params:
            return None
        flips = torch.stack([self.state[p]["flips"] for p in params]).sum()
        return flips.float() / max(sum(p.numel() for p in params), 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, but keep m and v in each group's ``state_dtype`` and layout, flips int64.

        The hyperparameters (lr, threshold, sigma, state_dtype) come from the checkpoint, as for
        every torch optimizer; ``fused`` stays this optimizer's (a checkpoint from a GPU run loads
        on the CPU). In order: the load_state_dict pre-hooks run, and what they return is what
        loads; the groups and every state entry are checked (``bnnops.optim.bop_state``) before
        anything changes; the groups and state load; the post-hooks run on the loaded optimizer.

        Raises:
            ValueError: a Bop state_dict loaded into a Bop2ndOrder, or the reverse; groups that do
                not match this optimizer's (as torch); a hyperparameter outside its range; a
                state entry that breaks the state's rules, naming the parameter and the entry.
            TypeError: a hyperparameter of the wrong type.

        torch casts every state tensor of a float parameter to the parameter's dtype, which would
        round fp32 state of a bf16 parameter and make the flip counts floats; here the saved
        tensors are copied into fresh state of the right dtype.
        """
        state_dict = state_dict.copy()  # shallow, as torch: a hook may change it
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        loaded = checked_state_dict(
            state_dict, self.param_groups, type(self).__name__, self._second_order, self._check_hyperparameters
        )
        paths = [(group["fused"], group["capturable"]) for group in self.param_groups]
        # The base class loads the groups, without the hooks (they run here) and without the state
        # (it would cast m and v to the parameter's dtype; the checked copies above replace it).
        hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        for group, (fused, capturable) in zip(self.param_groups, paths):
            # How to run is this optimizer's choice, not the checkpoint's.
            group["fused"], group["capturable"] = fused, capturable
        for p, state in loaded:
            self.state[p] = state
        self._steppers.clear()  # new state tensors may reuse the old ones' addresses: rebuild the tables
        self._step_plan = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


class Bop2ndOrder(Bop):
    """Bop with a second-moment normalization (Suarez-Ramirez et al. 2021).

    Like :class:`Bop`, and also keeps the second moment v of the gradient (state ``"v"``, like
    ``"m"``)::

        v <- v + sigma * (g * g - v)
        w <- -w  where  w * m / (sqrt(v) + 1e-10) > tau

    Args:
        params, threshold, state_dtype, fused, capturable, differentiable: as for :class:`Bop`.
        lr: gamma, in [0, 1].
        sigma: the rate of v, in [0, 1].

    Defaults: lr (gamma) 1e-6, threshold 1e-6, sigma 1e-2. A Bop state_dict does not load into a
    Bop2ndOrder, nor the reverse.
    """

    _second_order = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-6,
        threshold: float | torch.Tensor = 1e-6,
        sigma: float | torch.Tensor = 1e-2,
        *,
        state_dtype: torch.dtype = torch.float32,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        self._init(
            params, dict(lr=lr, threshold=threshold, sigma=sigma), state_dtype, fused, capturable, differentiable
        )


# Whether this torch has CUDA: torch.cuda.is_current_stream_capturing raises on a CPU-only build.
_CUDA_BUILT = torch.cuda._is_compiled()


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (no sync). Without an initialized CUDA
    context nothing captures, and asking would create one (a CPU-only run keeps none)."""
    return _CUDA_BUILT and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _capturing_device() -> torch.device:
    """The device whose current stream is capturing (called only while :func:`_capturing` is True):
    a step being captured refuses parameters elsewhere. A function so that the CPU tests, which
    report a capture on CPU tensors, can patch it."""
    return torch.device("cuda", torch.cuda.current_device())


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"
