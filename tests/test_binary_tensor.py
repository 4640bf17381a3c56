import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import FLOAT_DTYPES, random_signs_input
from torch import nn

import bnnops
from bnnops import BinaryTensor
from bnnops.binary_tensor import ATEN_OPS, TORCH_FUNCTIONS, implements_torch_function


def signs(w):
    return torch.where(w < 0, -1.0, 1.0).to(w.dtype)


class Holder(nn.Module):
    """A module with one binary weight parameter, as a layer would hold it."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(BinaryTensor.from_float(w))


@pytest.mark.parametrize("shape", [(7,), (5, 1), (5, 33), (3, 100), (4, 35, 3, 3), (2, 3, 5)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_from_float_and_dequantize(device, shape, dtype):
    w = random_signs_input(shape, dtype, device, finite=True)
    b = BinaryTensor.from_float(w)
    assert isinstance(b, BinaryTensor)
    assert b.shape == w.shape and b.dtype == dtype and b.device == w.device
    assert b.words.dtype == torch.int32
    assert b.words.shape == bnnops.packing.packed_weight_shape(shape)
    dense = b.dequantize()
    assert type(dense) is torch.Tensor and dense.is_contiguous()
    assert torch.equal(dense, signs(w))
    assert b.dequantize(torch.float16).dtype == torch.float16


def test_conv_weight_layout(device):
    # Word [o, r, s, w] bit j holds weight[o, 32*w + j, r, s].
    w = torch.ones(2, 40, 3, 3, device=device)
    w[1, 33, 2, 0] = -1.0
    b = BinaryTensor.from_float(w)
    assert b.words.shape == (2, 3, 3, 2)
    nonzero = b.words.nonzero().tolist()
    assert nonzero == [[1, 2, 0, 1]]
    assert b.words[1, 2, 0, 1].item() == 2


def test_from_float_rejects_bad_input(device):
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(3, 40, device=device)
        w[1, 7] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            BinaryTensor.from_float(w)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        BinaryTensor.from_float(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="scalar"):
        BinaryTensor.from_float(torch.tensor(1.0))
    with pytest.raises(ValueError, match="do not hold a weight"):
        BinaryTensor(torch.zeros(3, 1, dtype=torch.int32), (3, 33))
    with pytest.raises(TypeError, match="int32"):
        BinaryTensor(torch.zeros(3, 2, dtype=torch.int64), (3, 33))


def test_parameter_gets_dense_gradient(device):
    m = Holder(torch.randn(6, 37, device=device))
    p = m.weight
    assert isinstance(p, BinaryTensor) and isinstance(p, nn.Parameter) and p.requires_grad
    c = torch.randn(6, 37, device=device)
    (p * c).sum().backward()
    assert type(p.grad) is torch.Tensor and p.grad.shape == (6, 37) and p.grad.dtype == torch.float32
    assert torch.equal(p.grad, c)
    (p * c).sum().backward()  # accumulation over micro-batches
    assert torch.equal(p.grad, 2 * c)
    norm = nn.utils.clip_grad_norm_(m.parameters(), max_norm=1.0)
    assert torch.allclose(norm, (2 * c).norm())
    assert torch.allclose(p.grad.norm(), torch.tensor(1.0, device=device), rtol=1e-5)


def test_reading_ops_run_on_dense_values(device):
    w = torch.randn(4, 40, device=device)
    b = BinaryTensor.from_float(w)
    assert torch.equal(b * 2, 2 * signs(w))
    assert b.sum().item() == signs(w).sum().item()
    assert torch.equal(b, BinaryTensor.from_float(w))
    assert torch.equal(torch.zeros_like(b), torch.zeros(4, 40, device=device))
    assert torch.equal(torch.cat([b, b]), torch.cat([signs(w), signs(w)]))
    assert "BinaryTensor(shape=(4, 40)" in repr(b)


def test_in_place_and_view_ops_refused(device):
    m = Holder(torch.randn(4, 40, device=device))
    p = m.weight
    before = p.words.clone()
    with torch.no_grad():
        for mutate in (lambda: p.add_(1), lambda: p.mul_(-1), lambda: p.zero_(), lambda: p.data.neg_()):
            with pytest.raises(RuntimeError, match="in-place op"):
                mutate()
        for view in (lambda: p.view(-1), lambda: p.t(), lambda: p[0], lambda: p.reshape(2, 80)):
            # view(-1) is a dense copy for torch.distributed that refuses writes.
            with pytest.raises(RuntimeError, match="view|viewed"):
                view().mul_(-1)
    p.grad = torch.randn(4, 40, device=device)
    with pytest.raises(RuntimeError, match="Bop"):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert torch.equal(p.words, before)
    assert torch.equal(p.view(4, 40).words, before)  # the identity view is an alias
    flat = p.detach().view(-1)
    assert torch.equal(torch.cat([flat, flat]), p.dequantize().view(-1).repeat(2))
    with pytest.raises(RuntimeError, match="write would be lost"):
        flat.view(4, 40).neg_()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype_keeps_bits(device, dtype):
    m = Holder(torch.randn(5, 70, device=device))
    bits = m.weight.words.clone()
    m.to(dtype)
    assert isinstance(m.weight, BinaryTensor) and isinstance(m.weight, nn.Parameter)
    assert m.weight.dtype == dtype and torch.equal(m.weight.words, bits)
    assert m.weight.dequantize().dtype == dtype
    with pytest.raises(TypeError, match="keeps its bits"):
        m.weight.to(torch.int32)


def test_to_device(device):
    b = BinaryTensor.from_float(torch.randn(3, 50))
    moved = b.to(device)
    assert isinstance(moved, BinaryTensor) and moved.device.type == device
    assert moved.words.device.type == device and torch.equal(moved.words.cpu(), b.words)


def test_data_assignment(device):
    m = Holder(torch.randn(4, 40, device=device))
    other = BinaryTensor.from_float(torch.randn(4, 40, device=device))
    m.weight.data = other
    assert m.weight.words is other.words and isinstance(m.weight, nn.Parameter)
    assert isinstance(m.weight.data, BinaryTensor) and torch.equal(m.weight.data.words, other.words)
    for bad in (torch.randn(4, 40, device=device), BinaryTensor.from_float(torch.randn(4, 41, device=device))):
        with pytest.raises(RuntimeError, match="can only be set to a BinaryTensor of the same shape"):
            m.weight.data = bad


def test_deepcopy_is_independent(device):
    m = Holder(torch.randn(4, 40, device=device))
    m2 = copy.deepcopy(m)
    assert isinstance(m2.weight, BinaryTensor) and isinstance(m2.weight, nn.Parameter)
    assert torch.equal(m2.weight.words, m.weight.words)
    assert m2.weight.words.data_ptr() != m.weight.words.data_ptr()


def test_state_dict_round_trip(device):
    src = Holder(torch.randn(6, 45, device=device))
    dst = Holder(torch.randn(6, 45, device=device))
    sd = src.state_dict()
    assert isinstance(sd["weight"], BinaryTensor)
    dst.load_state_dict(sd)
    assert torch.equal(dst.weight.words, src.weight.words)
    # From a dense checkpoint of +-1 values (a Bop model trained with dense weights): exact.
    dense = torch.randn(6, 45, device=device)
    dst.load_state_dict({"weight": signs(dense)})
    assert torch.equal(dst.weight.dequantize(), signs(dense))
    assert isinstance(dst.weight, BinaryTensor)
    # copy_ never rounds: real values are refused, before any bit changes (load_state_dict re-raises
    # as RuntimeError). The bnnops layers pack a latent checkpoint's signs on load, by name.
    before = dst.weight.words.clone()
    nan_sign = signs(dense)
    nan_sign[0, 3] = float("nan")
    for bad, value in ((dense, dense[0, 0].item()), (nan_sign, "nan")):
        with pytest.raises(
            RuntimeError, match=rf"weight.*takes a BinaryTensor or \+-1 values, got {value} .*from_float"
        ):
            dst.load_state_dict({"weight": bad})
        assert torch.equal(dst.weight.words, before)
    layer = bnnops.nn.BinaryLinear(45, 6).to(device)
    layer.load_state_dict({"weight": dense, "bias": torch.zeros(6, device=device)})
    assert torch.equal(layer.weight.dequantize(), signs(dense))
    with pytest.raises(RuntimeError, match="size mismatch"):
        dst.load_state_dict({"weight": torch.randn(6, 46, device=device)})


def test_save_load_weights_only(device):
    m = Holder(torch.randn(4096, 4096, device=device))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    assert len(buf.getvalue()) < 2.2e6  # 2 MB of words, not 64 MB of fp32
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded["weight"], BinaryTensor)
    assert torch.equal(loaded["weight"].words, m.weight.words)
    fresh = Holder(torch.randn(4096, 4096, device=device))
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.weight.words, m.weight.words)


def test_compile_fullgraph_forward_and_backward(device):
    m = Holder(torch.randn(8, 40, device=device))
    c = torch.randn(8, 40, device=device)

    def f(w, c):
        return (w * c).sum()

    f(m.weight, c).backward()
    eager_grad = m.weight.grad
    m.weight.grad = None
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(m.weight, c)
    out.backward()
    assert torch.equal(out, (m.weight.dequantize() * c).sum())
    assert torch.equal(m.weight.grad, eager_grad)


def test_handler_tables_and_decorators(monkeypatch):
    """``@implements_torch_function`` fills TORCH_FUNCTIONS, which ``__torch_function__`` reads (a
    handler may decline with NotImplemented); the aliasing ops are ATEN_OPS handlers."""
    b = BinaryTensor.from_float(torch.randn(3, 3))
    assert F.linear in TORCH_FUNCTIONS and F.conv2d in TORCH_FUNCTIONS  # registered by bnnops.linear / conv
    monkeypatch.setitem(TORCH_FUNCTIONS, torch.trace, None)  # the test's entry is removed afterwards
    calls = []

    @implements_torch_function(torch.trace)
    def packed_trace(w):
        calls.append(w)
        return "packed" if len(calls) == 1 else NotImplemented

    assert TORCH_FUNCTIONS[torch.trace] is packed_trace
    assert torch.trace(b) == "packed" and calls[0] is b
    assert torch.equal(torch.trace(b), b.dequantize().trace())  # declined: runs on the dense copy
    assert len(calls) == 2
    for op in (torch.ops.aten.detach.default, torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
        assert op in ATEN_OPS
    assert type(b.detach()) is BinaryTensor and b.detach().words is b.words


def test_dense_tensors_read_a_binary_one(device):
    """Writing a dense tensor from a BinaryTensor uses its +-1 values (only writes *to* it are refused)."""
    w = torch.randn(5, 40, device=device)
    b = BinaryTensor.from_float(w)
    d = torch.full((5, 40), 7.0, device=device)
    d.copy_(b)
    assert torch.equal(d, signs(w))
    d.add_(b)
    assert torch.equal(d, 2 * signs(w))
    out = torch.full((5, 40), 7.0, device=device)
    torch.add(b, 1, out=out)
    assert torch.equal(out, signs(w) + 1)
    dense = nn.Linear(40, 5).to(device)
    dense.load_state_dict(bnnops.nn.BinaryLinear(40, 5).to(device).state_dict())  # a Bop checkpoint, dense model
    assert set(dense.weight.detach().unique().tolist()) <= {-1.0, 1.0}
    flat = torch.zeros(200, device=device)
    flat.copy_(b.view(-1))  # view(-1)'s dense copy may be read too
    assert torch.equal(flat, signs(w).view(-1))
    assert torch.equal(torch.cat(b.view(-1).split(64)), signs(w).view(-1))  # views of it are copies too
    # Reads that start from an empty_like scratch tensor (dropout) get a dense one.
    dropped = torch.nn.functional.dropout(b, 0.5, training=True)
    assert type(dropped) is torch.Tensor and set(dropped.unique().tolist()) <= {-2.0, 0.0, 2.0}
    before = b.words.clone()
    with pytest.raises(RuntimeError, match="in-place op"):
        torch._foreach_add_([b], [torch.ones(5, 40, device=device)])
    assert torch.equal(b.words, before)


def test_layers_load_dense_state_with_assign(device):
    """load_state_dict(assign=True) of a dense entry keeps the layer's weight binary: its signs."""
    layer = bnnops.nn.BinaryLinear(40, 5).to(device)
    state = {"weight": torch.randn(5, 40, device=device), "bias": torch.randn(5, device=device)}
    layer.load_state_dict(state, assign=True)
    assert isinstance(layer.weight, BinaryTensor) and layer.weight.requires_grad
    assert torch.equal(layer.weight.dequantize(), signs(state["weight"]))
    with pytest.raises(ValueError, match="entry 'weight': cannot binarize a weight that holds NaN or inf"):
        layer.load_state_dict({**state, "weight": torch.full((5, 40), float("nan"), device=device)}, assign=True)


def test_share_memory_meta_and_to_empty():
    layer = bnnops.nn.BinaryConv2d(4, 6, 3)
    layer.share_memory()
    assert layer.weight.is_shared() and layer.weight.words.is_shared()
    meta = bnnops.nn.BinaryLinear(40, 5, device="meta")
    assert meta.weight.device.type == "meta" and meta.weight.words.shape == (5, 2)
    meta.to_empty(device="cpu")
    assert isinstance(meta.weight, BinaryTensor) and meta.weight.words.device.type == "cpu"
    assert meta.weight.words.shape == (5, 2)


def _with_words(entry, words):
    """A copy of the BinaryTensor ``entry`` holding ``words`` as they are (a corrupted checkpoint)."""
    forged = entry.clone()
    forged.words = words
    return forged


@pytest.mark.parametrize(
    "words, error",
    [
        (torch.zeros(4, 1, dtype=torch.int32), "words of shape \\(4, 1\\) do not hold a weight of shape \\(4, 40\\)"),
        (torch.zeros(1, 2, dtype=torch.int32), "words of shape \\(1, 2\\) do not hold"),
        (torch.tensor(-1, dtype=torch.int32), "words of shape \\(\\) do not hold"),
        (torch.full((4, 2), 3.7), "must be an int32 tensor, got torch.float32"),
        (torch.full((4, 2), 2**33 + 5, dtype=torch.int64), "must be an int32 tensor, got torch.int64"),
        (torch.full((4, 2), 1 << 8, dtype=torch.int32), "4 packed rows have padding bits set \\(bits 8..31"),
        (torch.zeros(2, 4, dtype=torch.int32).t(), "must be contiguous"),
    ],
)
def test_checkpoint_words_are_checked(device, words, error):
    """Words of the wrong shape, dtype or layout, or with padding bits set, are refused on every
    load path, naming the entry and what was wrong, and the layer's bits stay as they were."""
    saved = bnnops.nn.BinaryLinear(40, 4, bias=False).to(device).state_dict()
    forged = {"weight": _with_words(saved["weight"], words.to(device))}
    layer = bnnops.nn.BinaryLinear(40, 4, bias=False).to(device)
    before = layer.weight.words.clone()
    for assign in (False, True):
        with pytest.raises((TypeError, ValueError), match=f"state_dict entry 'weight': .*{error}"):
            layer.load_state_dict(forged, assign=assign)
        assert torch.equal(layer.weight.words, before)
    holder = Holder(torch.randn(4, 40, device=device))  # a module without the bnnops pre-hook: copy_ checks
    holder_before = holder.weight.words.clone()
    with pytest.raises(RuntimeError, match=f'parameter named "weight".*copy_ source: .*{error}'):
        holder.load_state_dict(forged)
    assert torch.equal(holder.weight.words, holder_before)
    buf = io.BytesIO()
    torch.save(forged, buf)
    buf.seek(0)
    with pytest.raises((TypeError, ValueError), match=f"pickled BinaryTensor of shape \\(4, 40\\): .*{error}"):
        torch.load(buf, weights_only=True)


class _ForgedBinaryTensor:
    """Pickles as a BinaryTensor rebuilt from the given wrapper metadata and attribute state, as a
    crafted checkpoint can."""

    def __init__(self, dtype, shape, stride, state):
        self.args = (BinaryTensor, dtype, shape, stride, 0, torch.strided, torch.device("cpu"), False)
        self.state = state

    def __reduce_ex__(self, protocol):
        return torch._tensor._rebuild_from_type_v2, (
            torch._utils._rebuild_wrapper_subclass,
            BinaryTensor,
            self.args,
            self.state,
        )


WORDS = torch.zeros(4, 2, dtype=torch.int32)  # the words of a (4, 40) weight of +1


@pytest.mark.parametrize(
    "dtype, shape, stride, state, error",
    [
        (torch.float32, (4, 40), (40, 1), {"words": WORDS}, None),
        (torch.float16, (4, 40), (40, 1), {"words": WORDS, "_is_param": True}, None),
        (torch.float32, (4, 40), (40, 1), {"words": WORDS, "tag": "ema"}, None),  # a plain instance attribute
        (torch.float32, (4, 40), (40, 1), None, "holds its int32 'words'"),
        (torch.float32, (4, 40), (40, 1), {"words": WORDS, "grad": None}, "may not set 'grad'"),
        (torch.float32, (4, 40), (40, 1), {"words": WORDS, "data": WORDS}, "may not set 'data'"),
        (torch.float32, (4, 40), (40, 1), {"words": WORDS, "_is_param": 1}, "bool"),
        (torch.float32, (4, 40), (1, 4), {"words": WORDS}, "strides \\(1, 4\\)"),
        (torch.int32, (4, 40), (40, 1), {"words": WORDS}, "logical dtype"),
        (torch.float32, (), (), {"words": torch.zeros((), dtype=torch.int32)}, "at least one dimension"),
        (torch.float32, (4, 40), (40, 1), {"words": [1, 2]}, "int32 tensor, got list"),
        (torch.float32, (4, 40), (40, 1), {"words": WORDS.to("meta")}, "words are on meta, the BinaryTensor on cpu"),
    ],
)
def test_pickled_binary_tensor_is_checked(dtype, shape, stride, state, error):
    """torch.load rebuilds a BinaryTensor from metadata and attributes written in the file: both are checked."""
    buf = io.BytesIO()
    torch.save(_ForgedBinaryTensor(dtype, shape, stride, state), buf)
    buf.seek(0)
    if error is None:
        loaded = torch.load(buf, weights_only=True)
        assert isinstance(loaded, BinaryTensor) and loaded.dtype == dtype
        assert torch.equal(loaded.words, state["words"]) and torch.equal(
            loaded.dequantize(), torch.ones(shape, dtype=dtype)
        )
    else:
        with pytest.raises((TypeError, ValueError), match=error):
            torch.load(buf, weights_only=True)
    m = Holder(torch.randn(4, 40))
    buf = io.BytesIO()
    torch.save(m, buf)  # a whole module: its parameter pickles '_is_param' too
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False).weight.words, m.weight.words)


INITS = {
    "uniform_": nn.init.uniform_,
    "normal_": nn.init.normal_,
    "trunc_normal_": nn.init.trunc_normal_,
    "kaiming_uniform_": nn.init.kaiming_uniform_,
    "kaiming_normal_": nn.init.kaiming_normal_,
    "xavier_uniform_": nn.init.xavier_uniform_,
    "xavier_normal_": nn.init.xavier_normal_,
    "zeros_": nn.init.zeros_,
    "ones_": nn.init.ones_,
    "constant_": lambda w: nn.init.constant_(w, 0.5),
    "orthogonal_": nn.init.orthogonal_,
    "eye_": nn.init.eye_,
    "dirac_": nn.init.dirac_,
    "sparse_": lambda w: nn.init.sparse_(w, 0.5),
}


@pytest.mark.parametrize("name", INITS)
@pytest.mark.parametrize("shape", [(6, 40), (4, 3, 3, 3)])
def test_nn_init_raises_and_leaves_the_bits(device, name, shape):
    """Each nn.init function writes in place, so on a binary weight it raises, with the bits as they were."""
    m = Holder(torch.randn(shape, device=device))
    before = m.weight.words.clone()
    with pytest.raises((RuntimeError, ValueError)) as raised:
        INITS[name](m.weight)
    assert torch.equal(m.weight.words, before)
    if name == "orthogonal_" and len(shape) == 2:
        assert "from_float" in str(raised.value)
    # The way that works: the signs of a float init.
    init = (
        INITS["orthogonal_"](torch.empty(shape, device=device))
        if len(shape) == 2
        else torch.randn(shape, device=device)
    )
    with torch.no_grad():
        m.weight.copy_(BinaryTensor.from_float(init))
    assert torch.equal(m.weight.dequantize(), signs(init))


AVERAGING = {
    "swa": {},
    "swa_use_buffers": {"use_buffers": True},
    "ema_avg_fn": {"avg_fn": torch.optim.swa_utils.get_ema_avg_fn(0.9)},
    "ema_multi_avg_fn": {"multi_avg_fn": torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)},
    "swa_multi_avg_fn": {"multi_avg_fn": torch.optim.swa_utils.get_swa_multi_avg_fn()},
}


@pytest.mark.parametrize("how", AVERAGING)
def test_averaged_model_of_binary_weights_is_refused(device, how):
    """AveragedModel (SWA, EMA) of a binary weight raises on every path, its copy_ path (the CPU
    default, avg_fn) and its in-place path (foreach lerp: the CUDA default, multi_avg_fn), before
    any averaged bit changes: the average is a real tensor that the bits cannot hold."""
    model = nn.Sequential(bnnops.nn.BinaryLinear(64, 16)).to(device)
    averaged = torch.optim.swa_utils.AveragedModel(model, **AVERAGING[how])
    averaged.update_parameters(model)  # the first update copies the bits
    assert torch.equal(averaged.module[0].weight.words, model[0].weight.words)
    with torch.no_grad():
        model[0].weight.copy_(-model[0].weight.dequantize())  # every bit flips
    before = averaged.module[0].weight.words.clone()
    with pytest.raises((RuntimeError, ValueError), match="AveragedModel"):
        averaged.update_parameters(model)
    assert torch.equal(averaged.module[0].weight.words, before)


def test_averaging_a_latent_copy_of_a_binary_model(device):
    """The way BinaryTensor's docstring gives: average a copy built with weight_quantizer='ste_sign'
    into which each binary snapshot is loaded; loading the average back packs its signs."""
    model = nn.Sequential(bnnops.nn.BinaryLinear(64, 16)).to(device)
    latent = nn.Sequential(bnnops.nn.BinaryLinear(64, 16, weight_quantizer="ste_sign")).to(device)
    averaged = None
    snapshots = []
    for _ in range(5):
        with torch.no_grad():
            model[0].weight.copy_(BinaryTensor.from_float(torch.randn(16, 64, device=device)))
        snapshots.append(model[0].weight.dequantize())
        latent.load_state_dict(model.state_dict())
        averaged = averaged or torch.optim.swa_utils.AveragedModel(latent)
        averaged.update_parameters(latent)
    mean = torch.stack(snapshots).mean(0)
    assert torch.allclose(averaged.module[0].weight, mean, atol=1e-6)
    model.load_state_dict(averaged.module.state_dict())
    assert torch.equal(model[0].weight.dequantize(), signs(mean))  # the majority of 5 snapshots


def test_checkpoint_of_bnnops_0_1_loads():
    """bnnops 0.1 pickled a BinaryTensor's words as the attribute 'packed': such a file loads, checked."""
    w = BinaryTensor.from_float(torch.randn(4, 40))
    saved = BinaryTensor(w.words.clone(), w.shape)
    saved.__dict__["packed"] = saved.__dict__.pop("words")
    buffer = io.BytesIO()
    torch.save({"weight": saved}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["weight"]
    assert isinstance(loaded, BinaryTensor) and "packed" not in loaded.__dict__
    assert torch.equal(loaded.words, w.words)
    saved.__dict__["packed"][0, 1] |= 1 << 31  # a padding bit (K = 40): refused like any checkpoint's
    buffer = io.BytesIO()
    torch.save({"weight": saved}, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="padding"):
        torch.load(buffer, weights_only=True)
