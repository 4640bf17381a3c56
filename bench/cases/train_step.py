"""End-to-end case: one BinaryNet training step at CIFAR-10 shapes.

Ours: ``bnnops.models.binarynet`` (packed binary weights on the bnnops conv / GEMM kernels) trained
by ``bnnops.optim.Bop`` (fused kernel) for the binary weights + Adam for the batch-norm shifts, on
bf16 activations. Baseline, what a user would otherwise write: the same network from plain
``nn.Conv2d`` / ``nn.Linear`` whose forward binarizes float latent weights and inputs with a
straight-through sign (larq's ``ste_sign``), Adam on everything, latent weights clipped to [-1, 1]
after each step (larq's ``weight_clip``), under ``torch.autocast`` bf16 (cuDNN bf16 convolutions).
Both take one step = forward, cross-entropy, backward, optimizer step on the same random batch.
On CUDA both also run as one CUDA graph per step (:func:`bench.cuda_graph_step.capture_step`: the
whole step replayed, with capturable optimizers), so neither pays its Python's host time; on a CPU
those two are not applicable and the case says so.

Images per second and peak memory, which the table of ``python -m bench`` has no column for, come
from ``bench.train_step_report`` (``python -m bench.train_evidence --gpu-step``), which builds its
steps with :func:`training_step`.
"""

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn

import bnnops
from bench import Workload, case
from bench.cuda_graph_step import capture_step
from bnnops import models
from bnnops.nn import BinaryConv2d, BinaryLinear, MaxPool2d
from bnnops.optim import BinaryAndReal, Bop, split_parameters

# The paper's CIFAR-10 settings (docs/design.md): gamma 1e-4, threshold 1e-8, Adam(1e-2) for the rest.
GAMMA, THRESHOLD, ADAM_LR = 1e-4, 1e-8, 1e-2


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch straight-through sign: +-1 forward (sign(0) = +1), gradient 1 where |x| <= 1."""
    clipped = x.clamp(-1, 1)
    return clipped + (torch.where(x < 0, -1.0, 1.0).to(x.dtype) - clipped).detach()


class SteConv2d(nn.Conv2d):
    """``nn.Conv2d`` on ste_sign(weight) and, unless ``binarize_input=False``, ste_sign(input)."""

    def __init__(self, *args, binarize_input: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(ste_sign(x) if self.binarize_input else x, ste_sign(self.weight), self.bias)


class SteLinear(nn.Linear):
    """``nn.Linear`` on ste_sign(weight) and, unless ``binarize_input=False``, ste_sign(input)."""

    def __init__(self, *args, binarize_input: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(ste_sign(x) if self.binarize_input else x, ste_sign(self.weight), self.bias)


def plain_pytorch_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every bnnops layer swapped for its plain-PyTorch twin
    (:class:`SteConv2d` / :class:`SteLinear`, fresh latent weights; ``nn.MaxPool2d`` for bnnops'
    max-pool, which keeps less for backward).

    Raises:
        ValueError: a ``BinaryConv2d`` pads with a value other than 0 (``nn.Conv2d`` cannot).
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, BinaryConv2d):
            if module.pad_value != 0:
                raise ValueError(f"{name}: nn.Conv2d pads with zeros only, this layer pads with {module.pad_value}")
            twin = SteConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
                binarize_input=module.input_quantizer is not None,
            )
        elif isinstance(module, BinaryLinear):
            twin = SteLinear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                binarize_input=module.input_quantizer is not None,
            )
        elif isinstance(module, MaxPool2d):
            twin = nn.MaxPool2d(
                module.kernel_size, module.stride, module.padding, module.dilation, False, module.ceil_mode
            )
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)
    return model


def _latent_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (SteConv2d, SteLinear))]


def training_step(
    variant: str,
    device: str,
    batch: int,
    filters: int = 128,
    dense_units: int = 1024,
    compile: bool = False,
    channels_last: bool = False,
    cuda_graph: bool = False,
) -> Callable[[], torch.Tensor]:
    """A zero-argument training step of ``variant`` ("ours" or "plain") on one random CIFAR-10 batch.

    Only that variant's model and optimizer are built (so peak memory is its own). Each call
    changes the weights (a real step); repeated calls stay a fair measure, the work per step does
    not depend on the values. A call returns the step's loss (a 0-d tensor on the device, no sync).
    ``compile``: the model's forward and backward through ``torch.compile`` (the optimizer step
    stays eager; the first call compiles). ``channels_last``: the batch and the model's conv
    weights in channels-last memory format (so every activation is), else NCHW. ``cuda_graph``:
    the optimizers capturable (Bop and Adam ``capturable=True``), the step warmed up and captured as
    one CUDA graph (:func:`~bench.cuda_graph_step.capture_step`); a call replays it.

    Raises:
        ValueError: ``variant`` is neither "ours" nor "plain"; ``cuda_graph`` with ``compile``
            or on a device other than CUDA.
    """
    if cuda_graph and compile:
        raise ValueError("cuda_graph captures the eager step; torch.compile has its own (mode='reduce-overhead')")
    on_cuda = torch.device(device).type == "cuda"
    if cuda_graph and not on_cuda:
        raise ValueError(f"CUDA graphs record CUDA kernels: not applicable on {device}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # The same batch for both variants: a fixed seed of its own.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    model = models.binarynet(filters=filters, dense_units=dense_units)
    if variant == "ours":
        # The whole model in bf16 on CUDA, binary weights keeping their bits; Adam then steps bf16
        # BN params. This is the setup of the recorded run T1429 (not autocast), kept comparable.
        model = model.to(device=device, dtype=dtype, memory_format=fmt)
        binary, real = split_parameters(model)
        opt = BinaryAndReal(
            Bop(binary, lr=GAMMA, threshold=THRESHOLD, capturable=cuda_graph),
            torch.optim.Adam(real, lr=ADAM_LR, capturable=cuda_graph),
        )
        x = x.to(dtype)
        model = torch.compile(model) if compile else model

        def body():
            loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return _stepper(opt.zero_grad, body, device, cuda_graph)
    if variant != "plain":
        raise ValueError(f"variant must be 'ours' or 'plain', got {variant!r}")
    model = plain_pytorch_copy(model).to(device=device, memory_format=fmt)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ADAM_LR, capturable=cuda_graph)
    latent = _latent_weights(model)
    model = torch.compile(model) if compile else model

    def body():
        # A graph cannot keep autocast's cache of cast weights (torch.cuda.graph's rule): off when captured.
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=on_cuda, cache_enabled=not cuda_graph):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        with torch.no_grad():  # larq's weight_clip
            torch._foreach_clamp_min_(latent, -1.0)
            torch._foreach_clamp_max_(latent, 1.0)
        return loss.detach()

    return _stepper(opt.zero_grad, body, device, cuda_graph)


def _stepper(zero_grad, body, device, cuda_graph):
    """The step: zero_grad then body, eagerly; or body replayed as a captured CUDA graph."""
    if cuda_graph:
        return capture_step(zero_grad, body, device)

    def step():
        zero_grad()
        return body()

    return step


OURS_CUDA_GRAPH = "ours as a CUDA graph (not a baseline: below 1x = the graph is faster than eager ours)"
"""The table row of our own step captured as a CUDA graph, beside the baselines of the
``binarynet_train_step`` case (on CUDA only)."""


def _macs(filters: int, dense_units: int) -> int:
    s = bnnops.summary(models.binarynet(filters=filters, dense_units=dense_units), print_table=False)
    return s.binary_macs + s.real_macs


@case(
    "binarynet_train_step",
    cuda={"CIFAR-10 b256": dict(batch=256, filters=128, dense_units=1024)},
    cpu={"CIFAR-10 b2 width/16": dict(batch=2, filters=8, dense_units=64)},
    tiny=dict(batch=2, filters=4, dense_units=8),
)
def binarynet_train_step(device: str, batch: int, filters: int, dense_units: int) -> Workload:
    baseline = "plain ste_sign + Adam" + (" (bf16 autocast)" if torch.device(device).type == "cuda" else "")
    baselines = {baseline: training_step("plain", device, batch, filters, dense_units)}
    if torch.device(device).type == "cuda":
        # Ours again, in the baseline list only so that it is timed in the same interleaved rounds:
        # its "speedup" is graph time / eager ours' time, which the label spells out.
        baselines[OURS_CUDA_GRAPH] = training_step("ours", device, batch, filters, dense_units, cuda_graph=True)
        baselines[baseline + ", CUDA graph"] = training_step(
            "plain", device, batch, filters, dense_units, cuda_graph=True
        )
    else:
        print(
            "binarynet_train_step: the CUDA-graph variants (ours and plain) are not applicable on "
            f"{device}: CUDA graphs record CUDA kernels",
            file=sys.stderr,
        )
    return Workload(
        ours=training_step("ours", device, batch, filters, dense_units),
        baselines=baselines,
        bound="bf16",
        # forward 2*MACs per image, backward about twice the forward
        ops=6 * _macs(filters, dense_units) * batch,
        bytes=4 * batch * 3 * 32 * 32,
    )
