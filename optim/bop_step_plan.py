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
    parameters as :meth:`Bop._plan_step` checks them, and through
    :meth:`~bnnops.kernels.bop_plan.FusedBop.ready` the fused parameters' gradients (dtype, shape,
    strides, address) and their weights and states (identity, address). The per-parameter checks
    are ``map`` passes over the lists, which run in C. On any difference it returns False having
    stepped nothing, and :meth:`Bop.step` plans anew (which raises a bad input's error).
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
        self.fused = []  # (stepper, BinaryTensor params, dense params, all of them, their group indices)
        for device, (binary, dense, (binary_rows, dense_rows)) in fused.items():
            stepper = opt._steppers.get(device)
            if stepper is None:
                stepper = opt._steppers[device] = kernels.load("bop_plan").FusedBop()
            self.fused.append((stepper, binary, dense, binary + dense, binary_rows + dense_rows))

    def _groups_hold(self, opt):
        """The same groups, parameters, state dtypes and paths; hyperparameters checked where they changed."""
        groups = opt.param_groups
        if groups is not self.groups or len(groups) != len(self.group_dicts):
            return False
        for h, (group, d, params, (state_dtype, fused, capturable)) in enumerate(
            zip(groups, self.group_dicts, self.param_lists, self.settings)
        ):
            if group is not d or group["params"] is not params:
                return False
            if group["state_dtype"] is not state_dtype or group["fused"] is not fused:
                return False
            if group["capturable"] is not capturable:
                return False
            values = tuple(map(group.__getitem__, self.keys))
            checked = self.checked[h]
            if checked is None or not all(map(operator.is_, values, checked)):
                opt._check_hyperparameters(group, tensor_values=False)
                self.checked[h] = None if any(isinstance(x, torch.Tensor) for x in values) else values
        return list(map(len, self.param_lists)) == self.lengths and all(
            map(operator.is_, itertools.chain.from_iterable(self.param_lists), self.flat)
        )

    def step(self, opt, plan_anew=False):
        """Step ``opt``'s parameters if they keep this plan; return whether it stepped.

        With ``plan_anew`` (a plan just built) the kernel's launch plans are made anew where they
        do not hold, which validates the fused tensors (raising their errors).
        """
        if not self._groups_hold(opt):
            return False
        groups = opt.param_groups
        gammas = [group["lr"] for group in groups]
        thresholds = [group["threshold"] for group in groups]
        sigmas = [group["sigma"] for group in groups] if opt._second_order else None
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
            for stepper, binary, dense, params, rows in self.fused:
                grads = list(map(_GRAD, params))  # a None among them: FusedBop.ready is False
                states = list(map(opt.state.__getitem__, params))
                try:
                    ms = list(map(_M, states))
                    vs = list(map(_V, states)) if second else None
                except KeyError:  # state dropped or changed outside the optimizer
                    return False
                weights = list(map(_WORDS, binary)) + dense
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
