"""The host work of bnnops' CUDA code path, timed on a machine without a GPU.

On a CPU the layers run their pure-PyTorch references, which compute (unpack, compare, matmul)
what a GPU computes in kernels: that is not the host work a GPU user pays. :func:`cuda_path_on_cpu`
sends CPU tensors through the CUDA path instead (the op dispatcher, the ops' CUDA kernels, the
launchers' Python: checks, block configs, grids, output allocation) with every Triton launch
replaced by a no-op that counts it, so what is left of a call is its host work less the launches
themselves.

Under it the outputs the launchers allocate are never written: their values are garbage. For
timing and launch counts only; never compare values. Every switch is restored on exit, also when
the body raises.

Not included in the time: Triton's own per-launch work (``JITFunction.run``: argument binding,
the compiled-kernel lookup, the driver launch), which the no-op replaces.

The ``layer_host_cost`` shapes "..., CUDA path stubbed" (``bench/cases/host_cost.py``) time the
layer calls this way; ``python -m bench.stubbed_launches`` prints their launches per call.
"""

import collections
import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Iterator

import torch

# Every op defined (its module imported) before the stub reads library.KERNELS.
import bnnops.layer_common
import bnnops.ops.backward
import bnnops.ops.conv
import bnnops.ops.linear
import bnnops.ops.threshold
from bnnops import kernels
from bnnops.ops import library

__all__ = ["STAND_IN_DEVICE", "StandInDeviceProperties", "cuda_path_on_cpu", "main"]


@dataclasses.dataclass(frozen=True)
class StandInDeviceProperties:
    """What ``torch.cuda.get_device_properties`` answers for a CPU device under the stub: the
    fields the launchers read (SM count, compute capability), of an H100 SXM. A launcher that reads
    another field fails with an AttributeError naming it."""

    name: str
    major: int
    minor: int
    multi_processor_count: int


STAND_IN_DEVICE = StandInDeviceProperties(
    name="NVIDIA H100 80GB HBM3 (stand-in)", major=9, minor=0, multi_processor_count=132
)

# The launchers' per-device lookups and launch plans (functools caches; the first three call
# get_device_properties, the plans key on the device): emptied on
# entry and exit, so no CPU entry made under the stub outlives it. (module, function) in kernels/.
_DEVICE_CACHES = (
    ("conv2d", "_device_info"),
    ("conv2d_backward", "_device_sms"),
    ("gemm_configs", "_device_table"),
    ("gemm", "_default_plan"),
)


def _kernel_name(kernel: object) -> str:
    """The ``@triton.jit`` function's name behind a launchable (a JITFunction, the interpreter's
    InterpretedFunction, an Autotuner or Heuristics wrapping one)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", None) or repr(kernel)


def _launchable_classes() -> list[type]:
    """The Triton classes whose ``run`` is a launch: JITFunction (compiled), InterpretedFunction
    (``TRITON_INTERPRET=1``), Autotuner (none of bnnops' kernels is autotuned; stubbed so that a
    future one is counted once, not once per config it would time)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction, Autotuner]


def _clear_device_caches() -> None:
    for module, function in _DEVICE_CACHES:
        loaded = sys.modules.get(f"bnnops.kernels.{module}")
        if loaded is not None:
            getattr(loaded, function).cache_clear()


@contextlib.contextmanager
def cuda_path_on_cpu() -> Iterator[collections.Counter[str]]:
    """Inside it, bnnops layers and ops called on CPU tensors take the CUDA code path with every
    Triton launch a no-op. Yields a Counter of launches by kernel name (``@triton.jit`` function),
    which keeps counting until exit; ``clear()`` it between calls as needed.

    What it switches, each restored on exit (also on an exception):

    - the ops: every ``torch.ops.bnnops`` op runs, for CPU tensors, the exact kernel registered
      for its CUDA key (:data:`bnnops.ops.library.KERNELS`: check, launcher glue, no-derivative
      mark): as :func:`bnnops.ops.library.call`'s direct kernel for CPU (as on a GPU, a call with
      nothing watching skips the dispatcher), and for the CPU key through a
      ``torch.library.Library("bnnops", "IMPL")`` destroyed on exit (calls that go through the
      dispatcher; torch's one-time "overriding a kernel" warning is silenced for these
      registrations only);
    - the layers' route (:func:`bnnops.layer_common.runs_kernels`,
      :func:`bnnops.layer_common.packs_before_product`): True, so a training forward packs x
      once with the launcher and runs the product on the sign words, and the backward reads the
      packed words, as on CUDA;
    - the launches: ``run`` of Triton's JITFunction, InterpretedFunction and Autotuner counts
      the launch and returns None (a warm-up, ``warmup=True``, is not a launch and is not counted);
    - the device queries: ``torch.cuda.get_device_properties`` answers :data:`STAND_IN_DEVICE`
      for a CPU device (other devices: the real answer).

    Outputs are allocated as on a GPU and never written (garbage values): timing only. Needs
    Triton installed (the launchers import it), no GPU. Without ``TRITON_INTERPRET`` the launchers
    pick the block configs of the stand-in (sm_90, 132 SMs), as on an H100; under
    ``TRITON_INTERPRET=1`` (the tests) they pick the interpreter's, so a launch count can differ
    (a tiny conv grad_weight splits its reduction on 132 SMs, adding the kernel that sums the shares).
    """
    launches: collections.Counter[str] = collections.Counter()
    kernels.load("gemm")  # raises, naming the reason, without Triton

    # id -> name: a JITFunction hashes through its source hash (a lock and a property, ~3 us).
    names: dict[int, str] = {}

    def no_launch(self, *args, warmup=False, **kwargs):
        if not warmup:
            name = names.get(id(self))
            if name is None:
                name = names[id(self)] = _kernel_name(self)
            launches[name] += 1

    real_properties = torch.cuda.get_device_properties

    def properties(device=None):
        if isinstance(device, torch.device) and device.type == "cpu":
            return STAND_IN_DEVICE
        return real_properties(device)

    with contextlib.ExitStack() as restore:
        for cls in _launchable_classes():
            restore.callback(setattr, cls, "run", cls.__dict__["run"])
            cls.run = no_launch
        restore.callback(setattr, torch.cuda, "get_device_properties", real_properties)
        torch.cuda.get_device_properties = properties
        restore.callback(_clear_device_caches)
        _clear_device_caches()
        for name in ("runs_kernels", "packs_before_product"):
            restore.callback(setattr, bnnops.layer_common, name, getattr(bnnops.layer_common, name))
            setattr(bnnops.layer_common, name, lambda x: True)
        for by_device in library.KERNELS.values():
            restore.callback(by_device.__setitem__, "cpu", by_device["cpu"])
            by_device["cpu"] = by_device["cuda"]
        cuda_kernels = torch.library.Library("bnnops", "IMPL")
        restore.callback(cuda_kernels._destroy)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Warning only once for all operators", UserWarning)
            for op, by_device in library.KERNELS.items():
                cuda_kernels.impl(op, by_device["cuda"], "CPU")
        yield launches


def main() -> None:
    """Print the Triton launches of each ``layer_host_cost`` layer call through the CUDA path (the
    stand-in's configs). Their host time: ``python -m bench --filter "CUDA path stubbed"``."""
    from bench.cases.host_cost import _layer_pair, layer_call

    torch.manual_seed(0)
    for layer in ("linear", "conv2d"):
        for training in (False, True):
            ours, _, x = _layer_pair(layer, "cpu")
            x.requires_grad_(training)
            with cuda_path_on_cpu() as launches:
                call = layer_call(ours, x, training)
                call()  # first-call setup
                launches.clear()
                call()
            print(f"{type(ours).__name__} {tuple(x.shape)} {'training' if training else 'inference'}: {dict(launches)}")


if __name__ == "__main__":
    main()
