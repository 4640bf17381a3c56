"""The cached step of :class:`~bnnops.optim.Bop`: what ``Bop.step`` runs for one parameter list,
and the checks that it still applies (so a bad input still gets its error)."""

import collections
import itertools
import operator

import torch

from bnnops import kernels
from bnnops.optim.bop_state import HYPERPARAMETERS

__all__ = ["StepPlan"]

_GRAD = operator.attrgetter("grad")
_WORDS = operator.attrgetter("words")
_M = operator.itemgetter("m")
_V = operator.itemgetter("v")


class StepPlan:
    """What :meth:`Bop.step` runs for one param list, and the checks that it still applies.

    Built from :meth:`Bop._plan_step` (which checked every parameter and created the state).
    :meth:`step` checks, before it changes anything: the param groups (the same list, dicts and
    parameter lists, holding the same parameters), each group's ``state_dtype``, ``fused`` and ``capturable``
    (they pick the paths), its hyperparameters (checked again when a value is another object than
    at the last check, or a tensor), which parameters have a gradient, the reference path's
    parameters as :meth:`Bop._plan_step` checks them, ``opt.state`` (the same keys and state
    dicts in the same order: then every fused parameter's state is the dict the plan holds, found
    without hashing a tensor, which costs a Python ``Tensor.__hash__`` call each), and through
    :meth:`~bnnops.kernels.bop_plan.FusedBop.ready` the fused parameters' gradients, weights and
    states (dtype, shape, strides, address). The per-parameter checks are ``map`` passes over the
    lists, which run in C. On any difference it returns False having stepped nothing, and
    :meth:`Bop.step` plans anew (which raises a bad input's error).
    """

    def __init__(self, opt, fused, reference, skipped):
        groups = opt.param_groups
        self.groups = groups
        self.group_dicts = list(groups)
        self.param_lists = [group["params"] for group in groups]
        self.lengths = list(map(len, self.param_lists))
        self.flat = list(itertools.chain.from_iterable(self.param_lists))
        self.settings = [(group["state_dtype"], group["fused"], group["capturable"]) for group in groups]
        self.keys = HYPERPARAMETERS if opt._second_order else HYPERPARAMETERS[:2]
        self.checked = [None] * len(groups)  # per group: the hyperparameter values last checked (numbers)
        self.skipped = skipped
        self.reference = reference
        self.state_keys = list(opt.state)
        self.state_dicts = list(opt.state.values())
        self.fused = []  # (stepper, BinaryTensor params, dense params, their state dicts, their group indices)
        for device, (binary, dense, (binary_rows, dense_rows)) in fused.items():
            stepper = opt._steppers.get(device)
            if stepper is None:
                stepper = opt._steppers[device] = kernels.load("bop_plan").FusedBop()
            states = [opt.state[p] for p in binary + dense]
            self.fused.append((stepper, binary, dense, states, binary_rows + dense_rows))

    def _groups_hold(self, opt):
        """The same groups, parameters, state dtypes and paths; hyperparameters checked where they
        changed. Returns the hyperparameter values per group (None when the groups do not hold)."""
        groups = opt.param_groups
        if groups is not self.groups or len(groups) != len(self.group_dicts):
            return None
        values = []
        for h, (group, d, params, (state_dtype, fused, capturable)) in enumerate(
            zip(groups, self.group_dicts, self.param_lists, self.settings)
        ):
            if group is not d or group["params"] is not params or group["state_dtype"] is not state_dtype:
                return None
            if group["fused"] is not fused or group["capturable"] is not capturable:
                return None
            group_values = tuple(map(group.__getitem__, self.keys))
            checked = self.checked[h]
            if checked is None or not all(map(operator.is_, group_values, checked)):
                opt._check_hyperparameters(group, tensor_values=False)
                self.checked[h] = None if any(isinstance(x, torch.Tensor) for x in group_values) else group_values
            values.append(group_values)
        if list(map(len, self.param_lists)) != self.lengths or not all(
            map(operator.is_, itertools.chain.from_iterable(self.param_lists), self.flat)
        ):
            return None
        return values

    def _state_holds(self, state):
        """Whether ``opt.state`` maps the same parameters to the same state dicts as when planned."""
        return (
            len(state) == len(self.state_keys)
            and all(map(operator.is_, state, self.state_keys))
            and all(map(operator.is_, state.values(), self.state_dicts))
        )

    def step(self, opt, plan_anew=False):
        """Step ``opt``'s parameters if they keep this plan; return whether it stepped.

        With ``plan_anew`` (a plan just built) the kernel's launch plans are made anew where they
        do not hold, which validates the fused tensors (raising their errors).
        """
        values = self._groups_hold(opt)
        if values is None or not self._state_holds(opt.state):
            return False
        gammas, thresholds, *sigmas = map(list, zip(*values))
        sigmas = sigmas[0] if sigmas else None
        second = opt._second_order
        with torch._C.DisableTorchFunctionSubclass():
            if self.skipped and not all(map(operator.is_, map(_GRAD, self.skipped), itertools.repeat(None))):
                return False
            for p, group in self.reference:
                g, state = p.grad, opt.state.get(p)
                if g is None or g.is_sparse or opt._fused(p, g, group) or not state:
                    return False
                if "m" not in state or (second and "v" not in state):
                    return False
            ready = []
            for stepper, binary, dense, states, rows in self.fused:
                grads = [*map(_GRAD, binary), *map(_GRAD, dense)]  # a None among them: FusedBop.ready is False
                try:
                    ms = list(map(_M, states))
                    vs = list(map(_V, states)) if second else None
                except KeyError:  # state dropped or changed outside the optimizer
                    return False
                weights = [*map(_WORDS, binary), *dense]
                if not stepper.ready(
                    grads, weights, ms, gammas, thresholds, vs=vs, sigmas=sigmas, hyper_rows=rows, plan_anew=plan_anew
                ):
                    return False
                ready.append((stepper, states))
        for stepper, states in ready:
            stepper.launch()
            collections.deque(map(dict.__setitem__, states, itertools.repeat("flips"), stepper.counts), maxlen=0)
        opt._step_reference(self.reference)
        return True
