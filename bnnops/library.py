"""How bnnops defines its ``torch.ops.bnnops.*`` ops: one schema, a CPU reference, a CUDA launcher.

:func:`define` registers an op with ``torch.library.Library`` (the C++ dispatcher's registration
API) rather than ``torch.library.custom_op``. Both give the same op to eager code, opcheck and
``torch.compile``; the difference is the host cost of a call. A ``custom_op`` call runs Python
wrappers (an autograd layer that redispatches, a dynamo-disable frame) around our kernel; measured
on a development CPU (torch 2.13, interleaved runs, ``bnnops::binary_conv2d`` on a 1x32x8x8 input
against its checks and reference called directly): +120 to +170 us a call as a ``custom_op``, +50
to +60 us as a ``Library`` op, about 35 us more when a Python Autograd kernel redispatches (so
there is none). The benchmark case ``op_dispatch`` measures it on any machine.

The ops have no derivative of their own: the autograd functions of :mod:`bnnops.linear` and
:mod:`bnnops.conv` call them and define the gradients. Called with grad mode on and an input that
requires grad (directly, or in a layer's backward under ``create_graph=True``), an op with a float
output returns a result whose backward raises, naming the functions to use, as ``custom_op`` did;
torch's fallback would only warn and return no gradient.
"""

import torch
from torch._subclasses.fake_tensor import FakeTensor

LIBRARY = torch.library.Library("bnnops", "DEF")
# The float dtypes every op takes (activations, scale, bias; a binary weight's logical dtype).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# op name -> its CUDA implementation (unchecked), so CPU tests can run that exact code on CPU
# tensors with the Triton interpreter.
CUDA_IMPLEMENTATIONS = {}


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


def refuse_backward(name, out, inputs):
    """``out`` with a node whose backward raises (the op ``name`` has no derivative), when grad is
    on and one of ``inputs`` requires grad; else ``out`` itself. Under torch.compile's tracing the
    node would not enter the graph (a term would silently vanish): raise there at once."""
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


def first_derivatives(name, grad_y, *grads):
    """A binary layer's backward results (None kept), each refusing a second derivative: with
    ``create_graph`` they would be differentiable only in part (the +-1 weight and sign(x) are
    constants there), so a backward through them raises instead."""
    return tuple(None if g is None else refuse_backward(name, g, (grad_y,)) for g in grads)


def needs_autograd(x, weight_requires_grad, bias):
    """Whether a binary layer's call needs its autograd function: grad mode on and x, the weight
    or the bias the op gets requiring grad. Otherwise (inference) the op runs alone, no node."""
    return torch.is_grad_enabled() and (
        weight_requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
    )


def type_name(t):
    """What an argument is, for error messages: a tensor's dtype, else its type's name."""
    return t.dtype if isinstance(t, torch.Tensor) else type(t).__name__


def contiguous(t):
    """``t.contiguous()``, None for None: the CUDA launchers read optional vectors with unit stride."""
    return None if t is None else t.contiguous()


def check_channel_vectors(n, device, **vectors):
    """Check optional per-output-channel vectors (scale, bias): None, or float (n,) tensors on ``device``."""
    for name, v in vectors.items():
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32, bfloat16 or float16 tensor, got {type_name(v)}")
        if v.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), one value per output channel, got {tuple(v.shape)}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but the input is on {device}")


def split_epilogue(scale, bias, n, device):
    """How a binary layer applies its per-output-channel ``scale`` and ``bias``: (outside, op_scale,
    op_bias).

    Normally the op fuses both into its epilogue. A learnable scale (requires_grad) needs the product
    before scale and bias, so both are applied outside the op, after it (the op then gets None for
    them and does not check them: they are checked here). The split depends on the scale alone, not
    on grad mode, so a call under no_grad gives the same values as with grad.
    """
    if scale is not None and scale.requires_grad:
        check_channel_vectors(n, device, scale=scale, bias=bias)
        return True, None, None
    return False, scale, bias


def _checked(name, check, implementation):
    def kernel(*args):
        check(*args)
        # The Autograd key falls through to here, so a node made here is what autograd sees.
        return refuse_backward(name, implementation(*args), args)

    return kernel


def define(schema, *, check, reference, cuda, fake):
    """Define ``torch.ops.bnnops.<name>`` from ``schema`` (``"name(Tensor x, int K) -> Tensor"``).

    CPU tensors run ``reference`` (pure PyTorch), CUDA tensors ``cuda`` (a Triton launcher), and
    fake / meta tensors ``fake`` (shapes only, for torch.compile); each after ``check(*args)``,
    which raises on bad input. Returns the op's overload (``torch.ops.bnnops.<name>.default``).
    """
    name = schema.split("(", 1)[0]
    # pt2_compliant: opcheck passes on every op (tests), as custom_op would have declared.
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    LIBRARY.impl(name, _checked(name, check, reference), "CPU")
    LIBRARY.impl(name, _checked(name, check, cuda), "CUDA")
    CUDA_IMPLEMENTATIONS[name] = cuda
    torch.library.register_fake(f"bnnops::{name}", _checked(name, check, fake), lib=LIBRARY)
    # No autograd layer: the kernels mark their own results (see _checked), so skip straight to them.
    LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
    return getattr(torch.ops.bnnops, name).default
