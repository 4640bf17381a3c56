"""Host cost of a call, where a call is almost all host work: ``Bop.step()`` against torch's own Adam
over as many tensors, and the binary layers against the same layers in plain PyTorch.

``bop_host_cost``: ``Bop.step()`` over N ``BinaryTensor`` weights of 64x64 (16x32 on the CPU) with
fp32 gradients, N = 1, 10, 25, 100, once warm (the launch plans made). Baselines, on N dense fp32
parameters of the same shape with gradients: ``torch.optim.Adam(foreach=True)`` and
``Adam(fused=True)``, the multi-tensor steps a user of torch's own optimizers runs.

- CUDA: the real calls. Each timed call is 16 steps after a ``torch.cuda.synchronize()``, so the
  benchmark's CUDA events see the host time (a few KiB per tensor keep the device idle between
  launches) rather than hide it behind the L2 flush; divide the times by 16 for one step.
- CPU: the device work removed. Ours is the fused path on CPU tensors with the kernel launch
  replaced by a no-op that keeps its last arguments (``FusedBop.launcher``), which leaves
  everything the host does: the checks, the pointer and hyperparameter tables, the flip
  counters. Adam runs for real on 512 elements per tensor (its arithmetic is small beside its
  per-tensor overhead). Needs Triton installed (the launch planner imports it).

``layer_host_cost``: a ``BinaryLinear`` (4x64 input, 64 outputs) or ``BinaryConv2d`` (1x32x8x8
input, 32 3x3 filters, padding 1) call, training (forward and backward) or inference, against the
plain-PyTorch twin of ``bench.cases.train_step`` (``SteLinear`` / ``SteConv2d``); see the case.

The gradients stay the same tensors between steps (``zero_grad(set_to_none=False)``); a new
gradient tensor each step costs the planner one more address table upload when its addresses are
new (bench/sweeps/bop.py times that on a GPU). Every call steps again: m keeps moving and weights
keep flipping, a fair repeated measure. Bytes: those of the Bop step (12 per weight, 8 per word).
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from bench import Workload, case
from bnnops import BinaryTensor, kernels
from bnnops.optim import Bop

STEPS_PER_CALL = 16  # on CUDA, steps per timed call (after one sync)
SHAPES = {f"{n} tensor{'s' if n > 1 else ''}": dict(tensors=n) for n in (1, 10, 25, 100)}


def _params(shape, tensors, device, binary):
    params = []
    for _ in range(tensors):
        w = torch.where(torch.randn(shape, device=device) < 0, -1.0, 1.0)
        p = nn.Parameter(BinaryTensor.from_float(w) if binary else w)
        p.grad = torch.randn(shape, device=device) * 1e-3
        params.append(p)
    return params


def _bop_without_launch(params):
    """Bop on CPU parameters through the fused path, its kernel launch replaced by a no-op."""
    opt = Bop(params, lr=1e-4, threshold=1e-8)
    # fused=True is refused for CPU parameters at construction (no kernel runs there); the step
    # reads the group's setting, so switching it afterwards sends the step through the planner.
    opt.param_groups[0]["fused"] = True
    stepper = kernels.load("bop_plan").FusedBop()
    last = []

    def keep_arguments(launch, *args):
        last[:] = (launch, *args)

    stepper.launcher = keep_arguments
    opt._steppers[torch.device("cpu")] = stepper  # the optimizer's planner for this device
    return opt


def _repeated(step):
    def steps():
        torch.cuda.synchronize()
        for _ in range(STEPS_PER_CALL):
            step()

    return steps


@case("bop_host_cost", cuda=SHAPES, cpu=SHAPES, tiny=dict(tensors=3), quick=list(SHAPES)[:2])
def bop_host_cost(device: str, tensors: int) -> Workload:
    """``Bop.step()`` over ``tensors`` binary weights against torch's Adam over as many dense ones."""
    cuda = torch.device(device).type == "cuda"
    shape = (64, 64) if cuda else (16, 32)
    binary = _params(shape, tensors, device, binary=True)
    opt = Bop(binary, lr=1e-4, threshold=1e-8) if cuda else _bop_without_launch(binary)
    baselines = {
        f"torch Adam({how}=True)": torch.optim.Adam(_params(shape, tensors, device, binary=False), **{how: True}).step
        for how in ("foreach", "fused")
    }
    for step in (opt.step, *baselines.values()):
        step()  # state, launch plans, compiles: not timed
    if cuda:
        baselines = {name: _repeated(step) for name, step in baselines.items()}
    numel = tensors * math.prod(shape)
    return Workload(
        ours=_repeated(opt.step) if cuda else opt.step,
        baselines=baselines,
        bound="memory",
        bytes=12 * numel + 8 * sum(p.words.numel() for p in binary),
    )


_LAYER_SHAPES = {
    f"{name} {mode}": dict(layer=layer, training=mode == "training")
    for layer, name in (("linear", "BinaryLinear 4x64x64"), ("conv2d", "BinaryConv2d 1x32x8x8 3x3"))
    for mode in ("training", "inference")
}
STUBBED_CALLS = 64  # layer calls per timed call under the stub (entering it costs ~300 us, once)
# On a CPU also: ours through the CUDA code path with the launches stubbed (bench/stubbed_launches.py).
_STUBBED_SHAPES = {
    f"{label}, CUDA path stubbed, x{STUBBED_CALLS}": dict(params, stubbed=True)
    for label, params in _LAYER_SHAPES.items()
}


def layer_call(module: nn.Module, x: torch.Tensor, training: bool) -> Callable[[], None]:
    """One call of ``module`` on ``x`` as ``layer_host_cost`` times it: training, forward and
    backward of a fixed output gradient (x must require grad; gradients accumulate); inference,
    the forward under ``torch.no_grad``."""
    if not training:

        def infer():
            with torch.no_grad():
                module(x)

        return infer
    with torch.no_grad():
        grad = torch.randn_like(module(x))

    def train():
        module(x).backward(grad)

    return train


def _layer_pair(layer: str, device: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(ours, the plain-PyTorch layer, input): ours with a packed weight and ste_sign on its input,
    the plain twin with a float latent weight and ste_sign on input and weight (bench.cases.train_step)."""
    from bench.cases.train_step import SteConv2d, SteLinear
    from bnnops.nn import BinaryConv2d, BinaryLinear

    if layer == "linear":
        return BinaryLinear(64, 64, device=device), SteLinear(64, 64, device=device), torch.randn(4, 64, device=device)
    return (
        BinaryConv2d(32, 32, 3, padding=1, device=device),
        SteConv2d(32, 32, 3, padding=1, device=device),
        torch.randn(1, 32, 8, 8, device=device),
    )


@case(
    "layer_host_cost",
    cuda=_LAYER_SHAPES,
    cpu={**_LAYER_SHAPES, **_STUBBED_SHAPES},
    tiny=dict(layer="conv2d", training=True),
    quick=list(_LAYER_SHAPES),
)
def layer_host_cost(device: str, layer: str, training: bool, stubbed: bool = False) -> Workload:
    """A layer call on a tiny input, where a call is almost all host work: ``BinaryLinear`` /
    ``BinaryConv2d`` (packed weight, ste_sign input) against the same layer in plain PyTorch (float
    latent weight, ste_sign on input and weight, ``F.linear`` / ``F.conv2d``).

    training: forward and backward of a fixed output gradient, the input and every parameter
    requiring grad (gradients accumulate between calls, in both); inference: the forward under
    ``torch.no_grad``. CPU: each layer's CPU path for real (ours: the pure-PyTorch references
    behind the ops). In CPU training each of our calls first flips one weight bit in place (xor of
    a 1-bit mask into one word: the weight alternates between two values), as Bop flips bits every
    step, so the dense weight the CPU references keep (:mod:`bnnops.weight_cache`) is unpacked
    again at every call, as in real training; inference reads it from that cache. CUDA: the real
    calls (the ops read the words packed: no dense weight, no flip); each timed call is 16 calls
    after a ``torch.cuda.synchronize()``, so the benchmark's CUDA events see host time (divide by 16).

    ``stubbed`` (CPU only, the shapes "..., CUDA path stubbed, x64"): ours runs the CUDA code path on
    CPU tensors with every Triton launch a no-op (:func:`bench.stubbed_launches.cuda_path_on_cpu`):
    the host work a GPU user pays, less Triton's own per-launch work; no flip (the CUDA path reads
    the words packed). Each timed call of either is :data:`STUBBED_CALLS` layer calls (divide by it),
    ours inside one entry of the stub, whose ~300 us enter and exit it pays (about 5 us a call).
    The plain layer runs its real CPU ops: on a GPU they would be launches of ATen kernels instead.
    """
    if stubbed:
        return _stubbed_layer_host_cost(device, layer, training)
    ours, plain, x = _layer_pair(layer, device)
    cpu = torch.device(device).type == "cpu"
    first_word = ours.weight.words.view(-1)[:1]
    x.requires_grad_(training)

    def calls(module):
        call = layer_call(module, x, training)
        if training and cpu and module is ours:
            unflipped = call

            def call():
                first_word.bitwise_xor_(1)
                unflipped()

        return call if cpu else _repeated(call)

    for module in (ours, plain):
        calls(module)()  # caches, first-call setup: not timed
    return Workload(
        ours=calls(ours),
        baselines={"plain PyTorch ste_sign layer": calls(plain)},
        bound="memory",
        bytes=2 * x.numel() * x.element_size() + ours.weight.words.numel() * 4,
    )


def _stubbed_layer_host_cost(device: str, layer: str, training: bool) -> Workload:
    from bench.stubbed_launches import cuda_path_on_cpu

    if torch.device(device).type != "cpu":
        raise ValueError("the stubbed CUDA path runs on CPU tensors: a GPU times the real calls")
    ours, plain, x = _layer_pair(layer, device)
    x.requires_grad_(training)
    ours_call, plain_call = layer_call(ours, x, training), layer_call(plain, x, training)

    def ours_calls():
        with cuda_path_on_cpu():
            for _ in range(STUBBED_CALLS):
                ours_call()

    def plain_calls():
        for _ in range(STUBBED_CALLS):
            plain_call()

    for run in (ours_calls, plain_calls):
        run()  # caches, first-call setup: not timed
    return Workload(
        ours=ours_calls,
        baselines={"plain PyTorch ste_sign layer": plain_calls},
        bound="memory",
        bytes=STUBBED_CALLS * (2 * x.numel() * x.element_size() + ours.weight.words.numel() * 4),
    )
