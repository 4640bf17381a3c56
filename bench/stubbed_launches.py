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

``python -m bench.stubbed_launches`` times the layer calls of ``bench.cases.host_cost``'s
``layer_host_cost`` this way, interleaved with the plain-PyTorch twin and with ours on the CPU
reference path, and prints the launches per call.
"""

import collections
import contextlib
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import torch

# Every op defined (its module imported) before the stub reads library.KERNELS.
import bnnops.layer_common
import bnnops.ops.backward
import bnnops.ops.conv
import bnnops.ops.linear
import bnnops.ops.threshold
from bnnops import kernels
from bnnops.ops import library

__all__ = ["STAND_IN_DEVICE", "StandInDeviceProperties", "cuda_path_on_cpu", "layer_call", "main"]


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


# --- the layer calls of bench.cases.host_cost, and their timing ----------------------------------


def layer_call(module: torch.nn.Module, x: torch.Tensor, training: bool) -> Callable[[], None]:
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


PLAIN = "plain PyTorch ste_sign layer"
STUBBED = "ours, CUDA path (launches stubbed)"
REFERENCE = "ours, CPU reference path"


def _time_interleaved(
    halves: dict[bool, dict[str, Callable[[], None]]], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Per name, the median thread CPU time of a call in each round. ``halves``: under the stub
    (True) or not (False) -> name -> call. A round runs both halves, the order flipping every
    round; in a half the stub is entered once and its calls take turns one by one, the order
    flipping every turn (entering the stub costs ~300 us, kept out of every timed call)."""
    medians: dict[str, list[float]] = {
        f"{name} [{'stub' if on else 'no stub'}]": [] for on in halves for name in halves[on]
    }
    for r in range(rounds):
        for on in list(halves) if r % 2 == 0 else list(halves)[::-1]:
            names = list(halves[on])
            times: dict[str, list[float]] = {name: [] for name in names}
            with cuda_path_on_cpu() if on else contextlib.nullcontext():
                for turn in range(per_round):
                    for name in names if (r + turn) % 2 == 0 else names[::-1]:
                        before = time.thread_time()
                        halves[on][name]()
                        times[name].append(time.thread_time() - before)
            for name in names:
                medians[f"{name} [{'stub' if on else 'no stub'}]"].append(statistics.median(times[name]))
    return medians


def _spread(values: list[float], scale: float = 1.0) -> str:
    ordered = sorted(values)
    k = max(1, len(values) // 4)  # the middle half of the rounds
    return f"{statistics.median(values) * scale:7.2f} ({ordered[k - 1] * scale:.2f}-{ordered[-k] * scale:.2f})"


def main(rounds: int = 16, per_round: int = 30) -> None:
    """Print, per ``layer_host_cost`` call: ours through the stubbed CUDA path and the plain-PyTorch
    twin (timed together under the stub), ours on the CPU reference path and the twin again
    (without it): thread CPU time at one torch thread, median over rounds with the interquartile
    range of the rounds; per-round ratios to the twin of the same half; the launches per call.

    The twin runs for real on the CPU in both halves (its device work is not removed), and ours'
    reference path reads a warm dense-weight cache (no per-call bit flip, unlike the case's
    training rows)."""
    from bench.cases.host_cost import _layer_pair

    torch.set_num_threads(1)
    torch.manual_seed(0)
    for layer in ("linear", "conv2d"):
        for training in (False, True):
            ours, plain, x = _layer_pair(layer, "cpu")
            x.requires_grad_(training)
            with cuda_path_on_cpu() as launches:
                stubbed = layer_call(ours, x, training)
                stubbed()  # first-call setup: not timed
                launches.clear()
                stubbed()
                per_call = dict(launches)
            halves = {
                True: {STUBBED: stubbed, PLAIN: layer_call(plain, x, training)},
                False: {REFERENCE: layer_call(ours, x, training), PLAIN: layer_call(plain, x, training)},
            }
            for call in halves[False].values():
                call()
            medians = _time_interleaved(halves, rounds, per_round)
            print(f"{type(ours).__name__} {tuple(x.shape)} {'training' if training else 'inference'}")
            for name, values in medians.items():
                print(f"  {name:46s} {_spread(values, 1e6)} us")
            for on, name in ((True, STUBBED), (False, REFERENCE)):
                half = "stub" if on else "no stub"
                ratios = [a / b for a, b in zip(medians[f"{name} [{half}]"], medians[f"{PLAIN} [{half}]"])]
                print(f"  {name + ' / plain':46s} {_spread(ratios)}")
            print(f"  launches per call: {per_call}")


if __name__ == "__main__":
    main()
