"""Inference and whole training steps of a bnnops model captured as CUDA graphs replay to the eager
result, bit for bit.

Capturing needs a CUDA GPU: without one the capture tests are skipped (visibly, with the reason);
the README's "## CUDA graphs" example is then only compiled, not run. What is checked on a CPU:
a Bop step while a capture is reported (the detection patched) runs only ops a graph can hold (no
host sync, no tensor made from host data: recorded with a dispatch mode) and equals the eager
step bit for bit; the refusals (capturable=False, state not yet created, a hyperparameter or a
parameter on another device); the capture helper's refusals; the conv backward's table made once per geometry.
"""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.cuda_graph_step import capture_step
from bnnops import BinaryTensor, kernels
from bnnops.nn import BinaryConv2d, BinaryLinear, MaxPool2d
from bnnops.optim import BinaryAndReal, Bop, Bop2ndOrder, split_parameters
from bnnops.optim import bop as bop_module

README = Path(__file__).resolve().parent.parent / "README.md"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs capture CUDA kernels: no GPU here")


def _readme_example() -> str:
    """The first python block of the README's "## CUDA graphs" section."""
    text = README.read_text()
    assert "\n## CUDA graphs" in text, "README.md lost its '## CUDA graphs' section"
    section = text.split("\n## CUDA graphs", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _model() -> nn.Module:
    return nn.Sequential(
        BinaryConv2d(3, 32, 3, padding=1, input_quantizer=None),
        nn.BatchNorm2d(32),
        BinaryConv2d(32, 35, 3, padding=1, pad_value=1.0),
        nn.BatchNorm2d(35),
        MaxPool2d(2),
        nn.Flatten(),
        BinaryLinear(35 * 5 * 5, 10),
    )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_graph_replays_to_eager(dtype):
    torch.manual_seed(0)
    model = _model().to("cuda", dtype).eval()
    static_x = torch.randn(3, 3, 11, 10, device="cuda", dtype=dtype)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = model(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            assert torch.equal(static_y, model(x))


@needs_cuda
def test_readme_cuda_graphs_example_runs():
    exec(compile(_readme_example(), "README.md (CUDA graphs)", "exec"), {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the example runs in full above")
def test_readme_cuda_graphs_example_says_it_needs_a_gpu(capsys):
    """Without a GPU the example imports what it uses, says it needs a GPU and does nothing else."""
    code = _readme_example()
    assert "torch.cuda.graph" in code and "replay()" in code
    exec(compile(code, "README.md (CUDA graphs)", "exec"), {"__name__": "__main__"})
    assert "needs a CUDA GPU" in capsys.readouterr().out


def _binary_params(n=2):
    params = []
    for _ in range(n):
        p = nn.Parameter(BinaryTensor.from_float(torch.randn(5, 40)))
        p.grad = torch.randn(5, 40)
        params.append(p)
    return params


def test_fused_bop_refuses_to_be_captured(monkeypatch):
    """A fused Bop step while a CUDA graph captures raises (its uploads and alternating flip
    counters would replay wrong); the detection is patched here (no GPU), the step's path is real."""
    plan_module = kernels.load("bop_plan")
    params = _binary_params()
    stepper = plan_module.FusedBop()
    stepper.launcher = lambda *args: None
    args = ([p.grad for p in params], params, [torch.zeros(5, 40) for _ in params], [1e-4] * 2, [1e-8] * 2)
    stepper.step(*args)  # not capturing: planned and launched
    monkeypatch.setattr(plan_module, "_capturing", lambda grads: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        stepper.step(*args)


@needs_cuda
def test_bop_step_under_capture_raises_unless_capturable():
    params = [p.cuda() for p in _binary_params()]
    for p in params:
        p.grad = torch.randn(5, 40, device="cuda")
    opt = Bop(params, lr=1e-4, threshold=1e-8)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"), torch.cuda.graph(graph):
        opt.step()


# Ops a captured step must not run: host syncs (a value read on the host) and tensors made from
# host data (torch.tensor of Python numbers: a host-to-device copy on CUDA).
FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "lift_fresh", "lift_fresh_copy"}


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op dispatched (``aten.add.Tensor`` -> ``add``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _report_capture(monkeypatch):
    """Bop sees a capturing CUDA stream (on CPU tensors: the ops a graph would record run eagerly)."""
    monkeypatch.setattr(bop_module, "_CUDA_BUILT", True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(bop_module, "_capturing_device", lambda: torch.device("cpu"))


def _weights(seed):
    """Binary weights (ragged, conv-shaped, rank 1) and a dense +-1 one, as parameters."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [((6, 40), True), ((4, 35, 3, 3), True), ((70,), True), ((7, 45), False)]
    signs = [torch.where(torch.randn(s, generator=gen) < 0, -1.0, 1.0) for s, _ in shapes]
    return [nn.Parameter(BinaryTensor.from_float(w) if b else w) for w, (_, b) in zip(signs, shapes)]


def _state(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [Bop, Bop2ndOrder])
def test_captured_bop_step_holds_only_graph_ops_and_equals_eager(monkeypatch, cls, state_dtype):
    """Two optimizers over equal weights take the same gradients: one eagerly, one as while a graph
    is captured. The lr of a group is a tensor on the parameters' device: the eager step reads its
    value on the host (a CPU tensor), the captured one must not, so the recording fails if the
    capture is not detected."""
    weights = [_weights(0), _weights(0)]
    second = {"sigma": 0.25} if cls is Bop2ndOrder else {}

    def groups(ws):
        return [
            {"params": ws[:2], "lr": torch.tensor([0.2]), "threshold": 1e-3, **second},
            {"params": ws[2:], "lr": 0.05, "threshold": 0.0},
        ]

    eager, captured = (cls(groups(ws), state_dtype=state_dtype, capturable=True, **second) for ws in weights)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in weights[0]]
        grads[step % 4] = grads[step % 4].masked_fill(torch.rand(grads[step % 4].shape, generator=gen) < 0.1, torch.nan)
        for ws in weights:
            for p, g in zip(ws, grads):
                p.grad = g.clone()
        eager.step()
        if step == 0:  # warm-up: creates the state, which a capture cannot
            # Under a dispatch mode, as the recorded steps: the CPU's NumPy bit route is off there,
            # so the warm-up makes the torch route's constant tables, as it does on a GPU.
            with RecordOps():
                captured.step()
        else:
            with monkeypatch.context() as m, RecordOps() as record:
                _report_capture(m)
                captured.step()
            assert not FORBIDDEN & set(record.names), sorted(FORBIDDEN & set(record.names))
            assert "bitwise_xor_" in record.names  # the binary weights stepped inside the recording
        for p, q in zip(*weights):
            if isinstance(p, BinaryTensor):
                assert torch.equal(p.words, q.words), step
            else:
                assert torch.equal(p, q), step
            a, b = _state(eager, p), _state(captured, q)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    assert sum(int(eager.state[p]["flips"]) for p in weights[0]) > 0


def test_captured_step_refusals(monkeypatch):
    """A capture refuses what it cannot hold, before stepping anything."""
    params = _binary_params()
    warm = Bop(params, capturable=True)
    warm.step()  # state made outside the capture
    words = [p.words.clone() for p in params]
    _report_capture(monkeypatch)
    warm.param_groups[0]["lr"] = torch.tensor(1e-4, device="meta")  # as a scheduler writes a group
    with pytest.raises(RuntimeError, match="lr is a tensor on meta but .* is on cpu"):
        warm.step()
    assert all(torch.equal(p.words, w) for p, w in zip(params, words))
    with pytest.raises(RuntimeError, match="no state while a CUDA graph is being captured.*warm-up"):
        Bop(params, capturable=True).step()
    with pytest.raises(RuntimeError, match="capturable=True"):
        Bop(params).step()
    with pytest.raises(TypeError, match="capturable must be True or False"):
        Bop(params, capturable=1)
    monkeypatch.setattr(bop_module, "_capturing_device", lambda: torch.device("cuda", 0))
    warm.param_groups[0]["lr"] = 1e-4
    with pytest.raises(RuntimeError, match=r"\['params'\]\[0\] is on cpu but the CUDA graph is captured on cuda:0"):
        warm.step()
    assert all(torch.equal(p.words, w) for p, w in zip(params, words))


def test_capturable_is_kept_across_load_state_dict():
    params = _binary_params()
    saved = Bop(params)
    saved.step()
    opt = Bop(params, capturable=True)
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["capturable"] is True
    state = saved.state_dict()
    del state["param_groups"][0]["capturable"]  # a checkpoint written before the option existed
    opt.load_state_dict(state)
    assert opt.param_groups[0]["capturable"] is True


def test_capture_helper_refuses_cpu_and_no_warmup():
    with pytest.raises(ValueError, match="not applicable on cpu"):
        capture_step(lambda: None, lambda: torch.zeros(()), "cpu")
    with pytest.raises(ValueError, match="warmup >= 1"):
        capture_step(lambda: None, lambda: torch.zeros(()), "cuda", warmup=0)


def test_conv_backward_tap_table_made_once_per_geometry():
    """After a geometry's first call the grad_input launcher uploads nothing (a capture cannot)."""
    table = kernels.load("conv2d_backward")._tap_table
    first = table((2, 2), (1, 1), (1, 1), (3, 3), torch.device("cpu"))
    assert table((2, 2), (1, 1), (1, 1), (3, 3), torch.device("cpu")) is first
    assert table((1, 2), (1, 1), (1, 1), (3, 3), torch.device("cpu")) is not first


def _train_step(model, opt, x, y):
    def zero_grad():
        opt.zero_grad(set_to_none=True)

    def body():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return zero_grad, body


@needs_cuda
def test_training_step_graph_replays_to_eager():
    """Forward, backward, Bop (capturable) and Adam (capturable) as one graph; each replay equals
    an eager step of a copy that took the same steps, bit for bit."""
    torch.manual_seed(0)
    models = [_model().cuda()]
    models.append(copy.deepcopy(models[0]))
    opts = []
    for model in models:
        binary, real = split_parameters(model)
        opts.append(
            BinaryAndReal(
                Bop(binary, lr=0.05, threshold=1e-6, capturable=True),
                torch.optim.Adam(real, lr=1e-2, capturable=True),
            )
        )
    x = torch.randn(4, 3, 11, 10, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    eager_x, eager_y = x.clone(), y.clone()
    eager_zero, eager_body = _train_step(models[1], opts[1], eager_x, eager_y)
    replay = capture_step(*_train_step(models[0], opts[0], x, y), "cuda", warmup=3)
    for _ in range(3):  # the capture's warm-up steps (recording the graph steps nothing)
        eager_zero()
        eager_body()
    for step in range(3):
        x_new, y_new = torch.randn_like(x), torch.randint_like(y, 10)
        for static, new in ((x, x_new), (y, y_new), (eager_x, x_new), (eager_y, y_new)):
            static.copy_(new)
        loss = replay()
        eager_zero()
        assert torch.equal(loss, eager_body()), step
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            assert torch.equal(a, b), step


@needs_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_train_step_bench_captures_on_any_cuda_device_name(device):
    """The train-step bench's captured step accepts a CUDA device with an index and replays."""
    from bench.cases.train_step import training_step

    step = training_step("ours", device, batch=2, filters=4, dense_units=8, cuda_graph=True)
    assert torch.isfinite(step()).item()


def _assert_steps_equal(ours, twin, steps):
    """``steps`` forward and backward passes of fresh inputs and output gradients through the
    modules ``ours`` and ``twin``: outputs and parameter gradients equal bit for bit. Returns the
    last input."""
    for step in range(steps):
        x = torch.randn(3, 3, 11, 10, device="cuda")
        grad = torch.randn(3, 10, device="cuda")
        out, expected = ours(x), twin(x)
        out.backward(grad)
        expected.backward(grad)
        assert torch.equal(out, expected), step
        for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), (step, name)
        ours.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    return x


@needs_cuda
def test_make_graphed_callables_forward_and_backward_equal_eager():
    """``torch.cuda.make_graphed_callables`` over a bnnops model (BinaryTensor weights, a W1A16
    and a W1A1 conv, bnnops max pool, a binary classifier): each graphed forward and backward gives
    the eager outputs and gradients of a twin, bit for bit."""
    torch.manual_seed(0)
    model = _model().cuda()
    twin = copy.deepcopy(model)
    graphed = torch.cuda.make_graphed_callables(model, (torch.randn(3, 3, 11, 10, device="cuda"),))
    _assert_steps_equal(graphed, twin, steps=3)


@needs_cuda
def test_compile_reduce_overhead_equals_default_compile():
    """``torch.compile(mode="reduce-overhead")`` (inductor with CUDA graphs) over a bnnops model's
    forward and backward, and over its inference, replays what the same compile without graphs
    computes, bit for bit; eager within a tolerance (inductor's batch norm may round differently)."""
    torch.manual_seed(0)
    model = _model().cuda()
    torch._dynamo.utils.counters.clear()
    # cudagraph trees record at the second call and replay from the third.
    x = _assert_steps_equal(torch.compile(model, mode="reduce-overhead"), torch.compile(copy.deepcopy(model)), steps=4)
    # Inductor falls back to plain kernels, only logging why, where a graph cannot hold a step.
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
        model.eval()
        infer, plain = torch.compile(model, mode="reduce-overhead"), torch.compile(model)
        for step in range(3):
            x = torch.randn(3, 3, 11, 10, device="cuda")
            assert torch.equal(infer(x).clone(), plain(x)), step
