"""End-to-end case: one BinaryNet training step at CIFAR-10 shapes (issue 7).

Ours: ``bnnops.models.binarynet`` (packed binary weights on the bnnops conv / GEMM kernels) trained
by ``bnnops.optim.Bop`` (fused kernel) for the binary weights + Adam for the batch-norm shifts, on
bf16 activations. Baseline, what a user would otherwise write: the same network from plain
``nn.Conv2d`` / ``nn.Linear`` whose forward binarizes float latent weights and inputs with a
straight-through sign (larq's ``ste_sign``), Adam on everything, latent weights clipped to [-1, 1]
after each step (larq's ``weight_clip``), under ``torch.autocast`` bf16 (cuDNN bf16 convolutions).
Both take one step = forward, cross-entropy, backward, optimizer step on the same random batch.

``gpu_step_report()`` (``python -m bench.train_evidence --gpu-step``) times both in one process with
CUDA events and records images per second and peak memory, which the table of ``python -m bench``
has no column for; with ``profile=True`` (``--profile``) also where each variant's step spends its
time (:func:`step_profile`).
"""

import copy
import time
import traceback

import torch
from torch import nn

import bnnops
from bench import Workload, case
from bnnops import models
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.optim import BinaryAndReal, Bop, split_parameters

# The paper's CIFAR-10 settings (DESIGN.md): gamma 1e-4, threshold 1e-8, Adam(1e-2) for the rest.
GAMMA, THRESHOLD, ADAM_LR = 1e-4, 1e-8, 1e-2


def ste_sign(x):
    """Plain-PyTorch straight-through sign: +-1 forward (sign(0) = +1), gradient 1 where |x| <= 1."""
    clipped = x.clamp(-1, 1)
    return clipped + (torch.where(x < 0, -1.0, 1.0).to(x.dtype) - clipped).detach()


class SteConv2d(nn.Conv2d):
    """``nn.Conv2d`` on ste_sign(weight) and, unless ``binarize_input=False``, ste_sign(input)."""

    def __init__(self, *args, binarize_input=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input

    def forward(self, x):
        return self._conv_forward(ste_sign(x) if self.binarize_input else x, ste_sign(self.weight), self.bias)


class SteLinear(nn.Linear):
    """``nn.Linear`` on ste_sign(weight) and, unless ``binarize_input=False``, ste_sign(input)."""

    def __init__(self, *args, binarize_input=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.binarize_input = binarize_input

    def forward(self, x):
        return nn.functional.linear(ste_sign(x) if self.binarize_input else x, ste_sign(self.weight), self.bias)


def plain_pytorch_copy(model):
    """``model`` with every bnnops binary layer replaced by its plain-PyTorch latent-weight twin."""
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
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)
    return model


def _latent_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (SteConv2d, SteLinear))]


def training_step(variant, device, batch, filters=128, dense_units=1024, compile=False, channels_last=False):
    """A zero-argument training step of ``variant`` ("ours" or "plain") on one random CIFAR-10 batch.

    Only that variant's model and optimizer are built (so peak memory is its own). Each call
    changes the weights (a real step); repeated calls stay a fair measure, the work per step does
    not depend on the values. A call returns the step's loss (a 0-d tensor on the device, no sync).
    ``compile``: the model's forward and backward through ``torch.compile`` (the optimizer step
    stays eager; the first call compiles). ``channels_last``: the batch and the model's conv
    weights in channels-last memory format (so every activation is), else NCHW.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # The same batch for both variants: a fixed seed of its own.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = models.binarynet(filters=filters, dense_units=dense_units)
    if variant == "ours":
        # The whole model in bf16 on CUDA, binary weights keeping their bits; Adam then steps bf16
        # BN params. (The recorded runs predate bnnops' autocast support; this stays the measured setup.)
        model = model.to(device=device, dtype=dtype, memory_format=fmt)
        binary, real = split_parameters(model)
        opt = BinaryAndReal(Bop(binary, lr=GAMMA, threshold=THRESHOLD), torch.optim.Adam(real, lr=ADAM_LR))
        x = x.to(dtype)
        model = torch.compile(model) if compile else model

        def step():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step
    if variant != "plain":
        raise ValueError(f"variant must be 'ours' or 'plain', got {variant!r}")
    model = plain_pytorch_copy(model).to(device=device, memory_format=fmt)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ADAM_LR)
    latent = _latent_weights(model)
    model = torch.compile(model) if compile else model

    def step():
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        with torch.no_grad():  # larq's weight_clip
            torch._foreach_clamp_min_(latent, -1.0)
            torch._foreach_clamp_max_(latent, 1.0)
        return loss.detach()

    return step


def _macs(filters, dense_units):
    s = bnnops.summary(models.binarynet(filters=filters, dense_units=dense_units), print_table=False)
    return s.binary_macs + s.real_macs


@case(
    "binarynet_train_step",
    cuda={"CIFAR-10 b256": dict(batch=256, filters=128, dense_units=1024)},
    cpu={"CIFAR-10 b2 width/16": dict(batch=2, filters=8, dense_units=64)},
    tiny=dict(batch=2, filters=4, dense_units=8),
)
def binarynet_train_step(device, batch, filters, dense_units):
    baseline = "plain ste_sign + Adam" + (" (bf16 autocast)" if device == "cuda" else "")
    return Workload(
        ours=training_step("ours", device, batch, filters, dense_units),
        baselines={baseline: training_step("plain", device, batch, filters, dense_units)},
        bound="bf16",
        # forward 2*MACs per image, backward about twice the forward
        ops=6 * _macs(filters, dense_units) * batch,
        bytes=4 * batch * 3 * 32 * 32,
    )


def _measure(step, steps, warmup):
    """Seconds per step (CUDA events, mean over ``steps`` after ``warmup``) and peak bytes allocated."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps, torch.cuda.max_memory_allocated()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_profile(step, device, steps=3, top=12):
    """Where a training step's time goes, over ``steps`` steps after one warm-up step.

    Returns a dict, times in ms per step:

    - ``host_ms``: the host's time to issue the step (until ``step()`` returns, no sync first);
    - ``wall_ms``: the step with the device finished (synchronized);
    - ``kernel_ms`` (CUDA): the sum of the device time of every kernel, from ``torch.profiler``.
      wall well above kernel time with host close to wall means the step is host-bound;
    - ``top``: the ``top`` largest entries, each {name, ms, calls} per step: CUDA kernels by device
      time on CUDA, torch ops by their own (self) CPU time on CPU.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync(device)
    host = wall = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        _sync(device)
        host, wall = host + t1 - t0, wall + time.perf_counter() - t0
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if cuda:
        events = [
            (e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.device_type == DeviceType.CUDA
        ]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    events.sort(key=lambda e: -e[1])
    result = {
        "steps": steps,
        "host_ms": 1e3 * host / steps,
        "wall_ms": 1e3 * wall / steps,
        "top": [{"name": name, "ms": us / 1e3 / steps, "calls": count / steps} for name, us, count in events[:top]],
    }
    if cuda:
        result["kernel_ms"] = sum(us for _, us, _ in events) / 1e3 / steps
    return result


def profile_markdown(profiles):
    """The tables of :func:`step_profile` results, one per variant ({variant: result})."""
    sections = []
    for name, p in profiles.items():
        kernel = f", kernels {p['kernel_ms']:.2f} ms" if "kernel_ms" in p else ""
        lines = [
            f"{name}: host {p['host_ms']:.2f} ms, wall {p['wall_ms']:.2f} ms{kernel} per step (mean of {p['steps']})",
            "",
            "| op or kernel | ms / step | calls / step |",
            "|---|---|---|",
        ]
        lines += [f"| `{e['name'][:90]}` | {e['ms']:.3f} | {e['calls']:g} |" for e in p["top"]]
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def gpu_step_report(batch=256, steps=20, warmup=5, profile=False, compile=False, channels_last=False, progress=None):
    """Images/s and peak memory of ours and the plain baseline, one process, one after the other.

    Returns (result dict, markdown table). Peak memory is ``torch.cuda.max_memory_allocated``
    over the timed steps, after warm-up (weights, gradients, optimizer state and activations).
    With ``profile``, each variant is then profiled by :func:`step_profile` (its row's "profile").
    With ``channels_last``, both again in channels-last memory format (rows "ours channels_last"
    and "plain channels_last"); with ``compile``, both again (NCHW) with their models under
    ``torch.compile`` (rows "ours compiled" and "plain compiled"; the warm-up steps include the
    compilation). ``progress(result, table)`` is called after each row, so a run stopped at a
    time limit keeps what it measured.
    """
    from bench.machine import describe

    if not torch.cuda.is_available():
        raise RuntimeError("--gpu-step needs a CUDA GPU")
    base = {
        "ours": "bnnops + Bop (bf16 activations)",
        "plain": "plain nn.Conv2d/nn.Linear + ste_sign + Adam (bf16 autocast)",
    }
    # (row suffix, label suffix, compile, channels_last), in the order they run.
    kinds = [("", "", False, False)]
    if channels_last:
        kinds.append((" channels_last", ", channels_last", False, True))
    if compile:
        kinds.append((" compiled", ", torch.compile", True, False))
    runs = [(name + suffix, name, compiled, cl) for suffix, _, compiled, cl in kinds for name in base]
    labels = {
        name + suffix: label + label_suffix for suffix, label_suffix, _, _ in kinds for name, label in base.items()
    }
    result = {
        "machine": describe("cuda"),
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "rows": {},
        "target": "speedup >= 1.5 at memory_ratio <= 1",
    }
    rows = result["rows"]
    for row_name, variant, compiled, cl in runs:
        try:  # one variant failing still leaves the other's numbers from a short GPU window
            step = training_step(variant, "cuda", batch, compile=compiled, channels_last=cl)
            seconds, peak = _measure(step, steps, warmup)
            row = rows[row_name] = {"seconds_per_step": seconds, "images_per_s": batch / seconds, "peak_bytes": peak}
        except Exception:
            rows[row_name] = {"error": traceback.format_exc()}
        if profile and "error" not in rows[row_name]:
            try:
                row["profile"] = step_profile(step, "cuda")
            except Exception:
                row["profile_error"] = traceback.format_exc()
        step = None  # frees the model, its optimizer and the batch before the next variant
        torch.cuda.empty_cache()
        table = _report_table(result, labels)
        if progress is not None:
            progress(result, table)
    return result, table


def _report_table(result, labels):
    """Fills result's ratios and returns the markdown of :func:`gpu_step_report`."""
    rows = result["rows"]
    lines = [
        f"BinaryNet training step, CIFAR-10 shapes, batch {result['batch']} ({result['machine']['device_name']})",
        "",
        "| | images/s | peak memory |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        cells = (
            ("FAILED", row["error"].strip().splitlines()[-1])
            if "error" in row
            else (f"{row['images_per_s']:.0f}", f"{row['peak_bytes'] / 2**20:.0f} MiB")
        )
        lines.append(f"| {labels[name]} | {cells[0]} | {cells[1]} |")
    for suffix in [name[len("ours") :] for name in rows if name.startswith("ours")]:
        ours, plain = rows.get("ours" + suffix), rows.get("plain" + suffix)
        if ours and plain and "error" not in ours and "error" not in plain:
            speedup = ours["images_per_s"] / plain["images_per_s"]
            memory_ratio = ours["peak_bytes"] / plain["peak_bytes"]
            key = suffix.replace(" ", "_")
            result["speedup" + key], result["memory_ratio" + key] = speedup, memory_ratio
            lines.append(f"| ours / plain{suffix} | {speedup:.2f}x | {memory_ratio:.2f}x |")
    profiles = {labels[name]: row["profile"] for name, row in rows.items() if "profile" in row}
    if profiles:
        lines += ["", profile_markdown(profiles)]
    lines += [
        f"\n{labels[name]}: the profile failed: {row['profile_error'].strip().splitlines()[-1]}"
        for name, row in rows.items()
        if "profile_error" in row
    ]
    return "\n".join(lines)
