"""The fused Bop launcher (bnnops.kernels.bop.bop_step) against the single-tensor reference.

Bop's arithmetic is exact by construction (each fp32 operation rounds the same way in both), so
every comparison here is bit for bit: states, words, dense signs and flip counts.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, poisoned

from bnnops import BinaryTensor, kernels
from bnnops.optim import bop_reference_
from bnnops.optim.bop_state import new_state

# (shape, packed, channels-last gradient): ragged packed lengths, every layout the kernel
# addresses (flat linear, ragged linear, conv with strided or channels-last gradients, rank 1,
# one row), dense weights with and without a ragged tail, and a tensor of many programs.
TENSORS = [
    ((5, 64), True, False),
    ((7, 45), True, False),
    ((3, 40, 3, 3), True, False),
    ((2, 64, 3, 3), True, True),
    ((4, 33, 1, 2), True, True),
    ((100,), True, False),
    ((1, 33), True, False),
    ((40, 160), True, False),
    ((7, 45), False, False),
    ((64,), False, False),
    ((1,), False, False),
]


def _gradient(shape, dtype, channels_last, generator, step):
    g = torch.randn(shape, generator=generator) * 0.1
    flat = g.view(-1)
    # Non-finite elements: the kernel must leave them alone like the reference.
    if step == 1 and flat.numel() > 3:
        flat[0], flat[1], flat[-1] = float("nan"), float("inf"), float("-inf")
    g = g.to(DEVICE, dtype)
    return g.to(memory_format=torch.channels_last) if channels_last else g


def _weights(generator, dtype):
    weights = []
    for shape, packed, _ in TENSORS:
        w = torch.randn(shape, generator=generator).to(DEVICE)
        weights.append(BinaryTensor.from_float(w, dtype=dtype) if packed else torch.where(w < 0, -1.0, 1.0).to(dtype))
    return weights


# Every gradient dtype with each state dtype and each order at least once (the optimizer tests
# cover the full product through the same kernel).
@pytest.mark.parametrize(
    "dtype, state_dtype, second_order",
    [
        (torch.float32, torch.float32, False),
        (torch.bfloat16, torch.float32, False),
        (torch.float16, torch.bfloat16, False),
        (torch.float32, torch.bfloat16, True),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.float16, torch.float32, True),
    ],
)
def test_launcher_matches_reference(dtype, state_dtype, second_order):
    gen = torch.Generator().manual_seed(1)
    ref, fused = _weights(gen, dtype), None
    fused = [w.clone() for w in ref]
    n = len(TENSORS)
    m_ref = [new_state(w, state_dtype) for w in ref]
    m_fused = [new_state(w, state_dtype) for w in ref]
    v_ref = [new_state(w, state_dtype) for w in ref] if second_order else [None] * n
    v_fused = [new_state(w, state_dtype) for w in ref] if second_order else None
    # Per-tensor hyperparameters: large gamma so that m builds up and weights flip both ways.
    gammas = [0.3 + 0.05 * i for i in range(n)]
    thresholds = [0.02 * (i % 3) for i in range(n)]
    sigmas = [0.5 - 0.03 * i for i in range(n)] if second_order else None
    total = 0
    for step in range(3):
        grads = [_gradient(shape, dtype, cl, gen, step) for shape, _, cl in TENSORS]
        flips = kernels.load("bop").bop_step(
            grads,
            [w.words if isinstance(w, BinaryTensor) else w for w in fused],
            m_fused,
            gammas,
            thresholds,
            vs=v_fused,
            sigmas=sigmas,
            flips=poisoned((n,), torch.int64, DEVICE),
        )
        for i in range(n):
            expect = bop_reference_(
                ref[i], grads[i], m_ref[i], gammas[i], thresholds[i], v_ref[i], sigmas and sigmas[i]
            )
            assert flips[i].item() == expect.item(), (i, step)
            assert torch.equal(m_fused[i].float(), m_ref[i].float()), (i, step)
            if second_order:
                assert torch.equal(v_fused[i].float(), v_ref[i].float()), (i, step)
            if isinstance(ref[i], BinaryTensor):
                assert torch.equal(fused[i].words, ref[i].words), (i, step)
            else:
                assert torch.equal(fused[i], ref[i]), (i, step)
        total += flips.sum().item()
    assert total > 100  # the test exercised flips


@pytest.mark.parametrize("block_words, num_warps", [(8, 2), (64, 8)])
def test_block_config_changes_only_the_grid(block_words, num_warps):
    """Another block config (more programs per tensor, or fewer) gives the same bits."""
    import triton

    config = triton.Config({"BLOCK_WORDS": block_words}, num_warps=num_warps)
    gen = torch.Generator().manual_seed(2)
    weights = _weights(gen, torch.float32)
    runs = []
    for stepper in (kernels.load("bop_plan").FusedBop(), kernels.load("bop_plan").FusedBop(config)):
        ws = [w.clone() for w in weights]
        ms = [new_state(w, torch.float32) for w in ws]
        flips = []
        for step in range(2):
            grads = [
                _gradient(shape, torch.float32, cl, torch.Generator().manual_seed(step), step)
                for shape, _, cl in TENSORS
            ]
            signs = [w.words if isinstance(w, BinaryTensor) else w for w in ws]
            flips.append(stepper.step(grads, signs, ms, [0.5] * len(ws), [0.01] * len(ws)).clone())
        runs.append((ws, ms, flips))
    (ws0, ms0, flips0), (ws1, ms1, flips1) = runs
    assert all(torch.equal(a, b) for a, b in zip(flips0, flips1)) and sum(f.sum().item() for f in flips0) > 0
    assert all(torch.equal(a, b) for a, b in zip(ms0, ms1))
    for a, b in zip(ws0, ws1):
        assert torch.equal(a.words, b.words) if isinstance(a, BinaryTensor) else torch.equal(a, b)


def test_threshold_is_strict(device):
    # gamma = 1 makes m = g exactly: a weight whose w * m equals the threshold must not flip.
    threshold = 0.5
    g = torch.tensor([[threshold, -threshold, 0.75, -0.75] * 8], device=device)
    for fused in (False, True):
        w = BinaryTensor.from_float(torch.ones(1, 32, device=device))
        m = new_state(w, torch.float32)
        if fused:
            flips = kernels.load("bop").bop_step([g], [w.words], [m], [1.0], [threshold])[0]
        else:
            flips = bop_reference_(w, g, m, 1.0, threshold)
        # All weights are +1: only w * m = 0.75 > 0.5 flips, at columns 2 mod 4.
        expect = torch.ones(1, 32, device=device)
        expect[0, 2::4] = -1
        assert torch.equal(w.dequantize(), expect) and flips.item() == 8


def test_launcher_rejects_bad_layouts(device):
    g = torch.randn(4, 40, 3, 3, device=device)
    w = BinaryTensor.from_float(torch.randn(4, 40, 3, 3, device=device))
    bop = kernels.load("bop")
    with pytest.raises(ValueError, match="packed layout's element order"):
        bop.bop_step([g], [w.words], [torch.zeros_like(g)], [0.1], [0.0])
    with pytest.raises(ValueError, match="do not hold a weight"):
        m = new_state(BinaryTensor.from_float(g[:, :32]), torch.float32)
        bop.bop_step([g[:, :32]], [w.words], [m], [0.1], [0.0])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bop.bop_step([g], [w.words], [new_state(w, torch.float32).half()], [0.1], [0.0])
    dense = torch.ones(8, 8, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        bop.bop_step([torch.randn(8, 8, device=device).t()], [dense], [torch.zeros_like(dense)], [0.1], [0.0])


# Compiles the kernel for sm_90 (no GPU needed: Triton ships ptxas) in a process without the
# interpreter, and prints the PTX.
_COMPILE_FOR_H100 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bnnops.kernels import bop
from bnnops.kernels.bop_configs import DEFAULT_CONFIG
variant = bop.KernelVariant(G_DTYPE=tl.float32, SIGNS_DTYPE=tl.int32, WORDS=True, FLAT=True, G_FLAT=True,
                            STATE_BF16=False, SECOND_ORDER=True)
consts = dict(variant._asdict(), SEARCH_STEPS=3, **DEFAULT_CONFIG.kwargs)
signature = {"table": "*i64", "addresses": "*i64", "hyper": "*fp32", "n_rows": "i32", "flips": "*i64",
             "flips_next": "*i64", **{k: "constexpr" for k in consts}}
src = ASTSource(fn=bop._bop_kernel, signature=signature, constexprs=consts)
options = {"enable_fp_fusion": False, "num_warps": DEFAULT_CONFIG.num_warps}
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the bit-exact tests check the compiled kernel directly")
def test_kernel_compiles_for_h100_without_fma():
    """The kernel is valid for a real GPU: no FMA contraction, IEEE sqrt/div, 16-byte streaming."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    if run.returncode != 0 and ("ptxas" in run.stderr or "backend" in run.stderr.lower()):
        pytest.skip(f"this Triton build cannot compile for CUDA offline: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = run.stdout
    assert "fma" not in ptx  # m + gamma * (g - m) rounds twice, as in the reference
    assert re.search(r"sqrt\.rn\.f32", ptx) and re.search(r"div\.rn\.f32", ptx)
    config = kernels.load("bop_configs").DEFAULT_CONFIG
    per_thread = config.kwargs["BLOCK_WORDS"] * 32 // (config.num_warps * 32)
    assert len(re.findall(r"ld\.global\.v4", ptx)) >= 3 * per_thread // 4  # g, m and v in 16-byte vectors


# Launches the kernel for sm_90 through a stand-in for Triton's CUDA driver (no GPU: the compile is
# real; the final launch, which would call the hooks, records its arguments instead), in a process
# without the interpreter, and prints what each call passed to the launcher.
_LAUNCH_WITHOUT_GPU = """
import json, torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
calls = []
class Launcher:
    def __init__(self, src, metadata):
        pass
    def __call__(self, *args):
        calls.append([a.data_ptr() if isinstance(a, torch.Tensor) else a if isinstance(a, (int, float, bool, type(None)))
                      else type(a).__name__ for a in args])
class Utils:
    def load_binary(self, name, kernel, shared, device):
        return (1, 2, 32, 0, 1024)
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}
class Driver:
    launcher_cls, utils = Launcher, Utils()
    def get_current_device(self):
        return 0
    def get_current_stream(self, device):
        return 7
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
driver.set_active(Driver())
from bnnops.kernels import bop
from bnnops.kernels.bop_configs import DEFAULT_CONFIG
variant = bop.KernelVariant(G_DTYPE=tl.float32, SIGNS_DTYPE=tl.int32, WORDS=True, FLAT=True, G_FLAT=True,
                            STATE_BF16=False, SECOND_ORDER=False)
table = torch.zeros(len(bop.TABLE_COLUMNS) * 3, dtype=torch.int64)
launch = bop.KernelLaunch(table, 3, (10,), variant, DEFAULT_CONFIG)
args = (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(1, 3), *torch.zeros(2, 4, dtype=torch.int64))
launch(*args)
direct = launch.direct
launch(*args)
hooked = []
hooks = triton.knobs.runtime.launch_enter_hook
if hasattr(hooks, "add"):
    hooks.add(hooked.append)
else:
    triton.knobs.runtime.launch_enter_hook = hooked.append
launch(*args)
print(json.dumps({"direct": direct, "calls": calls}))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every launch test goes through the compiled kernel's launcher")
def test_launch_goes_to_the_compiled_kernel_after_the_first():
    """After a first launch through Triton's JIT, ``KernelLaunch`` calls the compiled kernel's own
    launcher with exactly the arguments the JIT passes (grid, stream, function, metadata, every
    kernel argument in order), less the launch metadata and hooks; with a launch hook registered
    (a profiler) it goes through the JIT again, which calls the hook."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _LAUNCH_WITHOUT_GPU], env=env, capture_output=True, text=True)
    if run.returncode != 0 and ("ptxas" in run.stderr or "backend" in run.stderr.lower()):
        pytest.skip(f"this Triton build cannot compile for CUDA offline: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    jit, direct, hooked = result["calls"]
    assert result["direct"]
    assert direct[6:9] == [None, None, None] and jit[6] == "LazyDict"  # launch metadata and hooks
    assert direct[:6] == jit[:6] and direct[9:] == jit[9:] and len(direct) == 9 + 15  # the kernel's 15 arguments
    assert hooked[6] == "LazyDict" and hooked[7] is not None and hooked[9:] == jit[9:]  # the JIT's launch


def test_fused_bop_launches_only_what_is_ready():
    """``FusedBop.launch`` launches the step ``ready`` readied, once; ``ready(plan_anew=False)``
    refuses tensors that do not keep the plan, changing nothing."""
    stepper = kernels.load("bop_plan").FusedBop()
    w = BinaryTensor.from_float(torch.randn(4, 40, device=DEVICE))
    reference = BinaryTensor(w.words.clone(), w.shape)
    m, m_reference = new_state(w, torch.float32), new_state(w, torch.float32)
    g = torch.randn(4, 40, device=DEVICE)
    with pytest.raises(RuntimeError, match="no step is ready"):
        stepper.launch()
    assert not stepper.ready([g], [w.words], [m], [0.5], [0.0], plan_anew=False)  # no plan yet
    assert stepper.ready([g], [w.words], [m], [0.5], [0.0]) and stepper.rebuilt
    flips = stepper.launch()
    assert flips[0].item() == bop_reference_(reference, g, m_reference, 0.5, 0.0).item() > 0
    assert torch.equal(w.words, reference.words) and torch.equal(m, m_reference)
    with pytest.raises(RuntimeError, match="no step is ready"):
        stepper.launch()
    assert not stepper.ready([g.t().contiguous().t()], [w.words], [m], [0.5], [0.0], plan_anew=False)
    assert stepper.ready([torch.randn(4, 40, device=DEVICE)], [w.words], [m], [0.5], [0.0], plan_anew=False)
    assert not stepper.rebuilt


def test_launcher_steps_zero_size_and_0_dim_tensors():
    """Zero-size binary weights (dim 1 or a kernel dim 0: no words at all), zero-size dense ones
    and a 0-dim dense weight step beside ordinary ones, as the reference steps them."""
    gen = torch.Generator().manual_seed(3)
    shapes = [((4, 0), True), ((0, 0), True), ((2, 0, 3, 3), True), ((2, 3, 0, 3), True), ((0, 5), True)]
    shapes += [((), False), ((0, 3), False), ((5, 64), True), ((), False)]
    ref = []
    for shape, packed in shapes:
        w = torch.where(torch.randn(shape, generator=gen) < 0, -1.0, 1.0).to(DEVICE)
        ref.append(BinaryTensor.from_float(w) if packed else w)
    fused = [w.clone() for w in ref]
    m_ref, m_fused = ([new_state(w, torch.float32) for w in ref] for _ in range(2))
    gammas, thresholds = [0.5] * len(shapes), [0.1] * len(shapes)
    for step in range(2):
        grads = [torch.randn(shape, generator=gen).to(DEVICE) for shape, _ in shapes]
        flips = kernels.load("bop").bop_step(
            grads, [w.words if isinstance(w, BinaryTensor) else w for w in fused], m_fused, gammas, thresholds
        )
        for i, w in enumerate(ref):
            assert flips[i].item() == bop_reference_(w, grads[i], m_ref[i], 0.5, 0.1).item(), (i, step)
            assert torch.equal(m_fused[i], m_ref[i]), (i, step)
            same = torch.equal(fused[i].words, w.words) if isinstance(w, BinaryTensor) else torch.equal(fused[i], w)
            assert same, (i, step)
    assert all(f.item() == 0 for f, (shape, _) in zip(flips, shapes) if 0 in shape)


def test_launcher_reads_tensor_hyperparameters():
    """A 1-element tensor gamma or threshold (0-dim or not, any float dtype) steps as its number,
    also after it changed in place between two steps of one planner (as a scheduler fills it)."""
    gen = torch.Generator().manual_seed(4)
    w = BinaryTensor.from_float(torch.randn(5, 40, generator=gen).to(DEVICE))
    grads = [torch.randn(5, 40, generator=gen).to(DEVICE) for _ in range(2)]
    gamma, threshold = torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.05])
    runs = []
    for tensors in (False, True):
        stepper = kernels.load("bop_plan").FusedBop()
        words, m, flips = w.words.clone(), new_state(w, torch.float32), []
        for g, (gamma_value, threshold_value) in zip(grads, ((0.3, 0.05), (0.1, 0.2))):
            if tensors:
                gamma.fill_(gamma_value)
                threshold.fill_(threshold_value)
            hyper = (gamma, threshold) if tensors else (gamma_value, threshold_value)
            flips.append(stepper.step([g], [words], [m], [hyper[0]], [hyper[1]]).clone())
        runs.append((words, m, *flips))
    assert runs[0][2].item() > 0 and runs[0][3].item() > 0
    assert all(torch.equal(a, b) for a, b in zip(*runs))
