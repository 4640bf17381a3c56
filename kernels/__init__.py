"""Triton kernels of bnnops and the launchers that call them (imported as ``bnnops.kernels``).

Each module holds ``@triton.jit`` kernels plus launchers that take and return torch tensors:
they allocate outputs, pick block sizes and compute the grid. Nothing here knows about
autograd or ``torch.library``; the ops in ``bnnops`` call these launchers for CUDA tensors.

Triton is optional for ``import bnnops``: without it only the CPU reference path works, and
:func:`load` says why the Triton path is off. Kernel modules are imported on first use, so a
process can set ``TRITON_INTERPRET=1`` before that and run every launcher on CPU tensors.
"""

import functools
import importlib
import importlib.util

__all__ = ["load", "triton_available", "triton_unavailable_reason"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grid and tile arithmetic. Not ``triton.cdiv``: a ConstexprFunction
    call costs ~3 us on the host, and a launch needs several."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host-side block sizes. Not
    ``triton.next_power_of_2`` (a ConstexprFunction: microseconds a call on the host)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def triton_unavailable_reason():
    """Return why the Triton path cannot run (a sentence), or None when it can.

    Looked up once per process: the package lookup costs tens of microseconds, and every CUDA op
    call goes through :func:`load`.
    """
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (it ships for Linux; pip install triton)"
    return None


def triton_available():
    """True when the Triton kernels can be imported."""
    return triton_unavailable_reason() is None


@functools.cache
def load(name):
    """Import and return the kernel module ``bnnops.kernels.<name>``.

    Raises RuntimeError naming the reason when Triton is unavailable, so a CUDA tensor
    reaching an op without Triton fails with a clear message instead of an ImportError deep
    inside a dispatcher call.
    """
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"bnnops: the Triton path is off because {reason}. CUDA tensors need Triton; "
            "CPU tensors run the pure-PyTorch reference path."
        )
    return importlib.import_module(f"{__name__}.{name}")
