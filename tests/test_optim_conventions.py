"""Bop and Bop2ndOrder against the conventions of PyTorch's own optimizers.

Modelled on PyTorch's generic optimizer tests (``torch.testing._internal.common_optimizers``:
``OptimizerInfo``, the error inputs every torch optimizer shares; test/test_optim.py and
test/inductor/test_compiled_optimizers.py): each test runs for every entry of ``OPTIMIZERS``, on
both storages (``BinaryTensor`` parameters and dense +-1 parameters) and, where it steps, on both
paths (``fused=True``: the Triton launcher, on the GPU or under the interpreter on CPU;
``fused=False``: the PyTorch reference). A new optimizer, or a new constructor option, is checked by adding an
``OptimizerInfo`` (or a variant to one).

The deliberate differences from torch's conventions are written where they are tested:
float64 is not a state dtype, ``differentiable=True`` is refused, state stays in ``state_dtype``
(torch casts it to the parameter's dtype), ``fused`` is this optimizer's, not the checkpoint's.
"""

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import DEVICE
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from bnnops import BinaryTensor
from bnnops.optim import Bop, Bop2ndOrder, ThresholdScheduler

STORAGES = ("binary", "dense")
PATHS = (False, True)  # fused


@dataclass(frozen=True)
class ErrorInput:
    """Constructor arguments that must raise ``error`` matching ``match`` (``params``: a function
    of a list of two sample parameters returning the params argument; default: the list)."""

    desc: str
    kwargs: dict[str, Any]
    error: type[Exception]
    match: str
    params: Callable[[list[nn.Parameter]], Any] | None = None


@dataclass(frozen=True)
class OptimizerInfo:
    """What the generic tests need to know about one optimizer class."""

    cls: type[Bop]
    # (description, constructor kwargs): every variant must construct, step and equal itself fused.
    variants: tuple[tuple[str, dict[str, Any]], ...]
    # kwargs that make it flip on the sample gradients within a step or two
    lively: dict[str, Any]
    # hyperparameters that may be a 1-element tensor
    tensor_hyperparameters: tuple[str, ...]
    state_keys: tuple[str, ...]
    error_inputs: tuple[ErrorInput, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.cls.__name__


# What every torch optimizer raises (common_optimizers.get_error_inputs_for_all_optims).
TORCH_ERROR_INPUTS = (
    ErrorInput(
        "invalid param type",
        {},
        TypeError,
        "params argument given to the optimizer should be an iterable of Tensors or dicts",
        lambda ps: ps[0],
    ),
    ErrorInput(
        "duplicate parameters within a group",
        {},
        UserWarning,
        "a parameter group with duplicate parameters",
        lambda ps: [ps[0], ps[0]],
    ),
    ErrorInput(
        "duplicate parameters across groups",
        {},
        ValueError,
        "some parameters appear in more than one parameter group",
        lambda ps: [{"params": ps[0]}, {"params": ps[0]}],
    ),
    ErrorInput(
        "Tensor lr must be 1-element", {"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element"
    ),
    ErrorInput(
        "params with and without names",
        {},
        ValueError,
        "all optimizer params should be with/without names",
        lambda ps: [("weight", ps[0]), ps[1]],
    ),
)

# Bop's own: hyperparameters outside their ranges or of the wrong type, options it refuses.
BOP_ERROR_INPUTS = (
    ErrorInput("lr below 0", {"lr": -0.1}, ValueError, r"lr \(gamma\) must be in \[0, 1\], got -0.1"),
    ErrorInput("lr above 1", {"lr": 1.5}, ValueError, r"lr \(gamma\) must be in \[0, 1\]"),
    ErrorInput("lr NaN", {"lr": float("nan")}, ValueError, r"lr \(gamma\) must be in \[0, 1\]"),
    ErrorInput("Tensor lr above 1", {"lr": torch.tensor(2.0)}, ValueError, r"lr \(gamma\) must be in \[0, 1\]"),
    ErrorInput(
        "integer Tensor lr", {"lr": torch.tensor(1)}, TypeError, "lr must be a Python number or a 1-element float"
    ),
    ErrorInput("lr a string", {"lr": "0.1"}, TypeError, "lr must be a Python number or a 1-element float"),
    ErrorInput("negative threshold", {"threshold": -1.0}, ValueError, "threshold must be >= 0, got -1.0"),
    ErrorInput("NaN threshold", {"threshold": float("nan")}, ValueError, "threshold must be >= 0"),
    ErrorInput(
        "Tensor threshold of 2 elements",
        {"threshold": torch.tensor([0.1, 0.2])},
        ValueError,
        "Tensor threshold must be 1-element",
    ),
    ErrorInput("float16 state", {"state_dtype": torch.float16}, TypeError, "state_dtype must be torch.float32 or"),
    # float64 state is not offered: the rule computes in fp32 (the kernel's arithmetic).
    ErrorInput("float64 state", {"state_dtype": torch.float64}, TypeError, "state_dtype must be torch.float32 or"),
    ErrorInput("fused not a bool", {"fused": "yes"}, TypeError, "fused must be None, True or False"),
    # A sign flip has no derivative: there is no differentiable step to offer.
    ErrorInput("differentiable", {"differentiable": True}, ValueError, "does not support differentiable=True"),
    ErrorInput(
        "integer parameter",
        {},
        TypeError,
        "trains BinaryTensor parameters and dense float parameters",
        lambda ps: [nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)],
    ),
)

SECOND_ORDER_ERROR_INPUTS = (
    ErrorInput("sigma above 1", {"sigma": 1.5}, ValueError, r"sigma must be in \[0, 1\], got 1.5"),
    ErrorInput("Tensor sigma of 2 elements", {"sigma": torch.zeros(2)}, ValueError, "Tensor sigma must be 1-element"),
)

OPTIMIZERS = (
    OptimizerInfo(
        Bop,
        variants=(
            ("default", {}),
            ("bfloat16 state", {"lr": 0.3, "state_dtype": torch.bfloat16}),
            ("zero threshold", {"lr": 1.0, "threshold": 0.0}),
            ("Tensor lr", {"lr": torch.tensor(0.4), "threshold": torch.tensor([0.05])}),
        ),
        lively={"lr": 0.5, "threshold": 0.05},
        tensor_hyperparameters=("lr", "threshold"),
        state_keys=("m", "flips"),
        error_inputs=TORCH_ERROR_INPUTS + BOP_ERROR_INPUTS,
    ),
    OptimizerInfo(
        Bop2ndOrder,
        variants=(
            ("default", {}),
            ("bfloat16 state", {"lr": 0.3, "sigma": 0.5, "state_dtype": torch.bfloat16}),
            ("Tensor hyperparameters", {"lr": torch.tensor([0.4]), "sigma": torch.tensor(0.2, dtype=torch.float64)}),
        ),
        lively={"lr": 0.5, "threshold": 0.1, "sigma": 0.5},
        tensor_hyperparameters=("lr", "threshold", "sigma"),
        state_keys=("m", "v", "flips"),
        error_inputs=TORCH_ERROR_INPUTS + BOP_ERROR_INPUTS + SECOND_ORDER_ERROR_INPUTS,
    ),
)

# Ragged packed lengths, a conv weight, rank 1, a 0-dim dense weight, and zero-size weights (whose
# dim 1 or a kernel dim is 0: no words at all).
SHAPES = {
    "binary": [(6, 40), (3, 5, 2, 3), (70,), (4, 0), (2, 3, 0, 3)],
    "dense": [(7, 45), (33,), (), (0, 3)],
}


def ids(values: Any) -> list[str]:
    return [getattr(v, "name", None) or getattr(v, "desc", None) or str(v) for v in values]


def make_params(storage: str, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES[storage]:
        signs = torch.where(torch.randn(shape, generator=gen) < 0, -1.0, 1.0).to(DEVICE)
        params.append(nn.Parameter(BinaryTensor.from_float(signs) if storage == "binary" else signs))
    return params


def set_grads(params: list[nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)


def signs(p: torch.Tensor) -> torch.Tensor:
    return (p.dequantize() if isinstance(p, BinaryTensor) else p).detach().clone()


def clone_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def assert_same(params_a, opt_a, params_b, opt_b, keys) -> None:
    """Bit for bit: every sign, and every state tensor."""
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(signs(a), signs(b)), i
        for key in keys:
            x, y = opt_a.state[a][key], opt_b.state[b][key]
            assert x.dtype == y.dtype and torch.equal(x, y), (i, key)


def run(info: OptimizerInfo, storage: str, fused: bool, steps: int = 2, seed: int = 0, **kwargs):
    params = make_params(storage)
    opt = info.cls(params, **{**info.lively, **kwargs}, fused=fused)
    for step in range(steps):
        set_grads(params, seed + step)
        opt.step()
    return params, opt


def error_cases():
    return [pytest.param(info, e, id=f"{info.name}-{e.desc}") for info in OPTIMIZERS for e in info.error_inputs]


@pytest.mark.parametrize("info, error_input", error_cases())
def test_errors(info, error_input):
    params = make_params("binary")[:2]
    args = error_input.params(params) if error_input.params else params
    if issubclass(error_input.error, Warning):
        with pytest.warns(error_input.error, match=error_input.match):
            info.cls(args, **error_input.kwargs)
    else:
        with pytest.raises(error_input.error, match=error_input.match):
            info.cls(args, **error_input.kwargs)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_step_errors(info):
    """What only a step can see: dense values other than +-1 (pointing to split_parameters),
    sparse gradients, and a hyperparameter that a schedule made invalid."""
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), bn)
    model[0].weight = nn.Parameter(BinaryTensor.from_float(torch.randn(3, 4)))
    opt = info.cls(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*bnnops\.optim\.split_parameters"):
        opt.step()
    sparse = nn.Parameter(torch.ones(4))
    sparse.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        info.cls([sparse]).step()
    params = make_params("binary")
    opt = info.cls(params)
    set_grads(params, 0)
    opt.param_groups[0]["lr"] = 1.5  # as a broken schedule would write it
    with pytest.raises(ValueError, match=r"lr \(gamma\) must be in \[0, 1\]"):
        opt.step()
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.step()
    assert not opt.state  # nothing stepped


def variant_cases():
    return [
        pytest.param(info, kwargs, storage, id=f"{info.name}-{desc}-{storage}")
        for info in OPTIMIZERS
        for desc, kwargs in info.variants
        for storage in STORAGES
    ]


@pytest.mark.parametrize("info, kwargs, storage", variant_cases())
def test_fused_matches_forloop(info, kwargs, storage):
    """Every variant steps the same bits on both paths, 0-dim and zero-size parameters included."""
    runs = []
    for fused in PATHS:
        params = make_params(storage)
        opt = info.cls(params, **copy.deepcopy(kwargs), fused=fused)
        for step in range(2):
            set_grads(params, step)
            opt.step()
        runs.append((params, opt))
        assert all(set(opt.state[p]) == set(info.state_keys) for p in params)
        assert all(opt.state[p]["m"].shape == p.shape for p in params)
        assert opt.flip_ratio() is not None
    assert_same(*runs[0], *runs[1], info.state_keys)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_tensor_hyperparameters_match_numbers(info, storage, fused):
    """A 1-element tensor (0-dim or not, float32 or float64) steps as its Python number does, and
    a scheduler that fills it in place between steps is followed (torch's LR schedulers do)."""
    numbers = run(info, storage, fused, steps=1)
    dtypes = (torch.float32, torch.float64)
    tensors = {
        key: torch.tensor([value] if i % 2 else value, dtype=dtypes[i % 2])
        for i, (key, value) in enumerate(info.lively.items())
        if key in info.tensor_hyperparameters
    }
    assert set(tensors) == set(info.tensor_hyperparameters)
    params, opt = run(info, storage, fused, steps=1, **tensors)
    assert opt.param_groups[0]["lr"] is tensors["lr"]  # kept as given, as torch keeps a tensor lr
    assert_same(*numbers, params, opt, info.state_keys)
    # Both halve gamma and the threshold; the tensors are filled in place by the schedulers.
    for optimizer in (numbers[1], opt):
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5).step()
        ThresholdScheduler(optimizer, lambda t: 0.5**t).step()
    for key in ("lr", "threshold"):
        assert opt.param_groups[0][key] is tensors[key] and tensors[key].item() == info.lively[key] / 2
    for p_numbers, p_tensors in zip(numbers[0], params):
        p_numbers.grad = p_tensors.grad = torch.full(p_numbers.shape, 0.3, device=DEVICE)
    numbers[1].step()
    opt.step()
    assert_same(*numbers, params, opt, info.state_keys)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_step_hooks(info):
    """register_step_pre_hook / post_hook (and the global ones) run around every step, in order,
    and stop when removed."""
    params = make_params("binary")
    opt = info.cls(params, **info.lively)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", len(o.state)))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", len(o.state)))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    set_grads(params, 0)
    try:
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", ("pre", 0), ("post", len(params)), "global post"]
    opt.step()
    assert len(calls) == 4


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_closure(info, storage):
    """step(closure) evaluates the closure with grad enabled (step itself runs under no_grad),
    steps on the gradients it made, and returns its loss."""
    params = make_params(storage)
    gen = torch.Generator().manual_seed(3)
    targets = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]
    opt = info.cls(params, **info.lively)

    def closure():
        opt.zero_grad()
        loss = sum((p * t).sum() for p, t in zip(params, targets))  # d loss / d p = t
        loss.backward()
        return loss

    plain = clone_params(params)
    plain_opt = info.cls(plain, **info.lively)
    for p, t in zip(plain, targets):
        p.grad = t.clone()
    before = sum(float((signs(p) * t).sum()) for p, t in zip(params, targets))
    with torch.no_grad():
        loss = opt.step(closure)
    plain_opt.step()
    assert loss.requires_grad and loss.item() == pytest.approx(before, rel=1e-5)
    assert_same(params, opt, plain, plain_opt, info.state_keys)
    assert opt.flip_ratio().item() > 0


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_zero_grad_and_parameters_without_gradient(info, storage):
    """A parameter whose grad is None is skipped (no state, no change); zero_grad(set_to_none=False)
    keeps zero gradients, which do step (m decays toward 0, unlike a skipped parameter)."""
    params, opt = run(info, storage, fused=False, steps=1)
    before = [(signs(p), opt.state[p]["m"].clone()) for p in params]
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.step()
    for p, (s, m) in zip(params, before):
        assert torch.equal(signs(p), s) and torch.equal(opt.state[p]["m"], m)
    set_grads(params, 1)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.step()
    gamma = info.lively["lr"]
    for p, (_, m) in zip(params, before):
        assert torch.equal(opt.state[p]["m"], m + (0 - m) * gamma)
    fresh = make_params(storage, seed=1)
    other = info.cls(fresh[:1] + [nn.Parameter(torch.ones(3, device=DEVICE))], **info.lively)
    set_grads(fresh[:1], 0)
    other.step()
    assert len(other.state) == 1  # the dense parameter without a gradient got no state


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_add_param_group(info):
    """A new group takes the defaults for the keys it lacks and steps with its own hyperparameters;
    a group with a bad hyperparameter or a parameter already held is refused and not added."""
    binary, dense = make_params("binary"), make_params("dense")
    opt = info.cls(binary, **info.lively)
    opt.add_param_group({"params": dense, "lr": 1.0})
    assert opt.param_groups[1]["threshold"] == info.lively["threshold"]
    assert opt.param_groups[1]["state_dtype"] == torch.float32 and opt.param_groups[1]["fused"] is None
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0})
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": dense[:1]})
    assert len(opt.param_groups) == 2
    set_grads(binary + dense, 0)
    expect = info.cls(clone_params(dense), **{**info.lively, "lr": 1.0})
    for p, q in zip(expect.param_groups[0]["params"], dense):
        p.grad = q.grad.clone()
    opt.step()
    expect.step()
    assert_same(dense, opt, expect.param_groups[0]["params"], expect, info.state_keys)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_named_parameters(info):
    """Named parameters (torch >= 2.6) are kept as the group's param_names and saved."""
    model = nn.Linear(5, 3, bias=False)
    model.weight = nn.Parameter(BinaryTensor.from_float(torch.randn(3, 5)))
    opt = info.cls(model.named_parameters(), **info.lively)
    assert opt.param_groups[0]["param_names"] == ["weight"]
    model.weight.grad = torch.randn(3, 5)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight"]


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_state_dict_round_trip(info, storage, fused):
    """Save after two steps (torch.save, torch.load with weights_only=True), load into a new
    optimizer over copies of the parameters, step both: identical bits. state_dict() is
    deterministic, and the loaded state shares no memory with the saved one."""
    params, opt = run(info, storage, fused, steps=2, state_dtype=torch.bfloat16)
    saved = opt.state_dict()
    assert str(saved) == str(opt.state_dict())
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    copies = clone_params(params)
    loaded = info.cls(copies, lr=0.01, fused=fused)  # hyperparameters come from the checkpoint
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert loaded.param_groups[0]["lr"] == info.lively["lr"] and loaded.param_groups[0]["state_dtype"] == torch.bfloat16
    for p, q in zip(params, copies):
        for key in info.state_keys:
            assert loaded.state[q][key].data_ptr() != opt.state[p][key].data_ptr() or not p.numel()
    assert_same(params, opt, copies, loaded, info.state_keys)
    for step in (2, 3):
        set_grads(params, step)
        set_grads(copies, step)
        opt.step()
        loaded.step()
    assert_same(params, opt, copies, loaded, info.state_keys)
    assert str(loaded.state_dict()["param_groups"]) == str(opt.state_dict()["param_groups"])


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_deepcopy(info):
    """deepcopy(optimizer) copies every state tensor; the copy steps on its own."""
    params, opt = run(info, "binary", fused=False, steps=1)
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    assert_same(params, opt, twin_params, twin, info.state_keys)
    assert all(twin.state[q]["m"].data_ptr() != opt.state[p]["m"].data_ptr() for p, q in zip(params[:3], twin_params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_load_state_dict_pre_hook_result_is_loaded(info):
    """What a register_load_state_dict_pre_hook returns is what loads, the state too."""
    params, opt = run(info, "binary", fused=False, steps=1)
    saved = opt.state_dict()

    def halve_m(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for entry in state_dict["state"].values():
            entry["m"] = entry["m"] / 2
        state_dict["param_groups"][0]["lr"] = 0.25
        return state_dict

    loaded = info.cls(clone_params(params))
    loaded.register_load_state_dict_pre_hook(halve_m)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["lr"] == 0.25
    for p, q in zip(params, loaded.param_groups[0]["params"]):
        assert torch.equal(loaded.state[q]["m"], opt.state[p]["m"] / 2)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_load_state_dict_post_hook_sees_the_loaded_state(info):
    """A register_load_state_dict_post_hook runs once the load has finished: the state is in the
    group's state_dtype, ``fused`` is this optimizer's, and what the hook writes stays."""
    params = make_params("binary")[:3]
    opt = info.cls(params, **info.lively, fused=True, state_dtype=torch.bfloat16)
    set_grads(params, 0)
    opt.step()
    loaded = info.cls(clone_params(params), fused=False)
    seen = []

    def post_hook(optimizer):
        for p in optimizer.param_groups[0]["params"]:
            state = optimizer.state[p]
            seen.append((state["m"].dtype, optimizer.param_groups[0]["fused"]))
            state["m"] = torch.ones_like(state["m"])

    loaded.register_load_state_dict_post_hook(post_hook)
    loaded.load_state_dict(opt.state_dict())
    assert seen == [(torch.bfloat16, False)] * len(params)
    assert all(
        torch.equal(loaded.state[p]["m"], torch.ones(p.shape, dtype=torch.bfloat16, device=DEVICE))
        for p in loaded.state
    )


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids(OPTIMIZERS))
def test_compile_first_step_fullgraph(info):
    """torch.compile(opt.step, fullgraph=True) on the first step (state created inside the graph,
    both storages in one optimizer) gives the eager bits. Under compile every parameter takes the
    reference path (the Triton launch reads raw addresses, which a graph cannot hold), so
    fused=True compiles too. A dense weight that is not +-1 fails inside the graph as well (on CPU
    tensors here)."""
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        params = make_params("binary")[1:2] + make_params("dense")[::2]  # a conv weight, a matrix, a 0-dim
        opt = info.cls(params, **info.lively, fused=compiled)
        set_grads(params, 0)
        (torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step)()
        runs.append((params, opt))
    assert_same(*runs[0], *runs[1], info.state_keys)
    # On CUDA the compiled check is a device-side assert, which ends the process's CUDA context.
    bad = nn.Parameter(torch.tensor([1.0, 0.5]))
    bad.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="holds values other than"):
        torch.compile(info.cls([bad]).step, fullgraph=True, backend="aot_eager")()
