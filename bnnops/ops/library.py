"""How bnnops defines a ``torch.ops.bnnops.*`` op: one schema, a CPU reference, a CUDA launcher, a fake.

:func:`define` registers an op with ``torch.library.Library`` (the C++ dispatcher's registration
API) rather than ``torch.library.custom_op``. Both give the same op to eager code, opcheck and
``torch.compile``; they differ in the host cost of a call: a ``custom_op`` call runs Python
wrappers (an autograd layer that redispatches, a dynamo-disable frame) around the kernel. On a
development CPU (torch 2.13, interleaved runs, ``bnnops::binary_conv2d`` on a 1x32x8x8 input,
against its checks and reference called directly) a call costs +120 to +170 us as a
``custom_op`` and +50 to +60 us as a ``Library`` op, and about 35 us more with a Python Autograd
kernel that redispatches, so there is none. The benchmark case ``op_dispatch`` measures it.

The ops have no derivative of their own: the autograd functions of :mod:`bnnops.linear` and
:mod:`bnnops.conv` call them and define the gradients. Called with grad mode on and an input that
requires grad (directly, or in a layer's backward under ``create_graph=True``), an op with a float
output returns a result whose backward raises, naming the functions to use; torch's autograd fallback
would only warn and return no gradient.
"""

from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

LIBRARY = torch.library.Library("bnnops", "DEF")
# The float dtypes every op takes (activations, scale, bias; a binary weight's logical dtype).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# op name -> its CUDA implementation (unchecked), so CPU tests can run that exact code on CPU
# tensors with the Triton interpreter.
CUDA_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {}
# op overload -> device type ("cpu", "cuda") -> the kernel define() registered for it (check,
# implementation, no-derivative mark): what :func:`call` runs without the dispatcher, and what
# bench/stubbed_launches.py registers for the CPU key.
KERNELS: dict[torch._ops.OpOverload, dict[str, Callable[..., torch.Tensor]]] = {}
# Whether :func:`call` may run a kernel of KERNELS without the dispatcher (see there). Tests that
# register other kernels for the ops (torch.library) outside a dispatch mode switch it off.
DIRECT_CALLS = True
# The tensor types whose calls may skip the dispatcher (a Parameter disables __torch_function__):
# anything else goes through it.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class _NoDerivative(torch.autograd.Function):
    """Identity on an op's output, for an op called with grad on: its backward raises."""

    @staticmethod
    def forward(ctx, name, out, *inputs):
        ctx.name = name
        return out.clone()  # not a view of out: in-place ops on the result stay allowed

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"bnnops::{ctx.name} has no derivative of its own: call it through bnnops.binary_linear, "
            f"bnnops.binary_conv2d or the nn layers, which define its first derivatives (there is no "
            f"second derivative through their backward either)"
        )


def refuse_backward(name: str, out: torch.Tensor, inputs: Sequence[object]) -> torch.Tensor:
    """``out`` with a node whose backward raises (the op ``name`` has no derivative), when grad is
    on, ``out`` is float and one of ``inputs`` requires grad; else ``out`` itself.

    Raises:
        RuntimeError at once under torch.compile's tracing (``out`` a FakeTensor), where the node
        would not enter the graph and a gradient term would silently vanish.
    """
    if not (torch.is_grad_enabled() and out.is_floating_point()):
        return out
    inputs = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    if not inputs:
        return out
    if isinstance(out, FakeTensor):
        raise RuntimeError(
            f"bnnops::{name} has no derivative of its own: under torch.compile, call it through "
            f"bnnops.binary_linear, bnnops.binary_conv2d or the nn layers, or under torch.no_grad()"
        )
    return _NoDerivative.apply(name, out, *inputs)


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t.contiguous()``, None for None: the CUDA launchers read optional vectors with unit stride."""
    return None if t is None else t.contiguous()


def _checked(name, check, implementation):
    def kernel(*args):
        check(*args)
        # The Autograd key falls through to here, so a node made here is what autograd sees.
        return refuse_backward(name, implementation(*args), args)

    return kernel


def define(
    schema: str,
    *,
    check: Callable[..., None],
    reference: Callable[..., torch.Tensor],
    cuda: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
) -> torch._ops.OpOverload:
    """Define ``torch.ops.bnnops.<name>`` from ``schema`` (``"name(Tensor x, SymInt K) -> Tensor"``).

    CPU tensors run ``reference`` (pure PyTorch), CUDA tensors ``cuda`` (a Triton launcher call),
    and fake / meta tensors ``fake`` (shapes only, for torch.compile); each after ``check(*args)``,
    which raises on bad input, and each marked by :func:`refuse_backward`. ``cuda`` is also
    recorded in :data:`CUDA_IMPLEMENTATIONS`, the CPU and CUDA kernels in :data:`KERNELS`.
    Returns the op's overload (``torch.ops.bnnops.<name>.default``).
    """
    name = schema.split("(", 1)[0]
    # pt2_compliant: opcheck passes on every op (tests).
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    cpu_kernel = _checked(name, check, reference)
    LIBRARY.impl(name, cpu_kernel, "CPU")
    cuda_kernel = _checked(name, check, cuda)
    LIBRARY.impl(name, cuda_kernel, "CUDA")
    CUDA_IMPLEMENTATIONS[name] = cuda
    torch.library.register_fake(f"bnnops::{name}", _checked(name, check, fake), lib=LIBRARY)
    # No autograd layer: the kernels mark their own results (see _checked), so skip straight to them.
    LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    op = getattr(torch.ops.bnnops, name).default
    KERNELS[op] = {"cpu": cpu_kernel, "cuda": cuda_kernel}
    return op


def call(op: torch._ops.OpOverload, *args: object) -> torch.Tensor:
    """``op(*args)``: in plain eager code, the op's kernel for the arguments' device called directly.

    A call through the dispatcher boxes every argument for the Python kernel and unboxes the result:
    about 30-40 us on a 2.5 GHz Xeon, as much as a tiny layer's whole reference, and 12-18 us for a
    linear or conv op's CUDA kernel on the dev CPU (bench/stubbed_launches.py). When the dispatcher
    could only pick one of the kernels :func:`define` registered, this calls it without the trip:
    the same check (the same errors), the same implementation, the same no-derivative mark. That is
    when every tensor argument is a plain strided tensor (``torch.Tensor`` or ``nn.Parameter``; not
    sparse, not nested, not a lazily negated or conjugated view), all on CPU or all on CUDA (the
    first on the current CUDA device), and nothing watches or transforms the call
    (:func:`unwatched`: no mode, transform, trace or profiler, so the op still shows in traces).
    Otherwise, and for ops defined elsewhere, ``op(*args)``. A kernel registered over ours with
    ``torch.library`` is seen only by calls through the dispatcher: set :data:`DIRECT_CALLS` to
    False while one is registered.
    """
    kernels = KERNELS.get(op)
    if kernels is None or not DIRECT_CALLS:
        return op(*args)
    device = _direct_device(args)
    return op(*args) if device is None else kernels[device](*args)


def skips_dispatcher(args: Sequence[object]) -> bool:
    """Whether :func:`call` would run an op's CPU kernel (its reference) directly for these
    arguments (the conditions in its docstring, with :data:`DIRECT_CALLS` on). A caller that fuses
    several ops' references into one computation does so only then, so that modes, profilers,
    transforms and subclasses still see each op."""
    return DIRECT_CALLS and _direct_device(args) == "cpu"


def unwatched() -> bool:
    """Whether nothing watches or transforms the torch calls made here: no ``torch.compile`` or
    ``torch.jit`` trace, no torch-function or dispatch mode, no functorch transform, no profiler.
    Only then may a call skip the dispatcher, or compute outside torch (NumPy), unseen."""
    # is_compiling first: torch.compile cannot trace the other queries (it folds this one to True).
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._autograd._profiler_enabled()
        or torch._C._get_tracing_state() is not None
    )


def _direct_device(args: Sequence[object]) -> str | None:
    """ "cpu" or "cuda" when :func:`call` may run that device's kernel for ``args`` directly (its
    docstring's conditions), else None."""
    if not unwatched():
        return None
    device = first = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSOR_TYPES or a.layout is not torch.strided or a.is_nested:
                return None
            if a.is_neg() or a.is_conj():  # lazily negated views: the dispatcher resolves them first
                return None
            kind = "cpu" if a.is_cpu else "cuda" if a.is_cuda else None
            if kind is None or (device is not None and kind != device):
                return None
            device, first = kind, first if first is not None else a
    # A launcher launches on the current CUDA device: a tensor on another one goes through the
    # dispatcher, whatever it does there (the CUDA kernels then raise on a device mismatch or not).
    if device == "cuda" and first.get_device() != torch.cuda.current_device():
        return None
    return device
