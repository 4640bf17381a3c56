"""The lean call path of the layers: the cached dense weight of the CPU references
(bnnops.weight_cache), the direct CPU kernel call (bnnops.ops.library.call) and the conv's cached
geometry. Each cached or direct path must give the results and the errors of the path without it,
across shapes, dtypes, strides, memory formats and devices, and must follow in-place weight changes."""

import ctypes
import gc

import pytest
import torch
from helpers import FLOAT_DTYPES, random_signs_input
from torch.utils._python_dispatch import TorchDispatchMode

import bnnops
import bnnops.conv as conv_module
from bnnops import BinaryTensor, weight_cache
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.ops import library
from bnnops.optim import Bop
from bnnops.packing import pack_weight, unpack_signs_reference
from bnnops.weight_cache import _DENSE, clear_dense_signs, dense_signs


@pytest.fixture
def uncached(monkeypatch):
    """A switch to the path without the caches and without the direct call (the reference path)."""

    def off():
        monkeypatch.setattr(library, "DIRECT_CALLS", False)
        monkeypatch.setattr("bnnops.weight_cache._cacheable", lambda words: False)
        monkeypatch.setattr(conv_module, "_GEOMETRY", {})
        monkeypatch.setattr(conv_module, "_exact", lambda v: False)

    return off


def _random_words(shape, K, generator=None):
    return pack_weight(torch.randn(*shape[:1], K, *shape[1:], generator=generator))


# --- bnnops.weight_cache ------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 31, 33, 64, 70])
def test_dense_signs_is_the_reference_and_follows_in_place_writes(K):
    words = _random_words((5,), K)
    first = dense_signs(words, K)
    assert torch.equal(first, unpack_signs_reference(words, K, torch.float32))
    assert dense_signs(words, K) is first  # cached
    words.bitwise_xor_(_random_words((5,), K))  # Bop's CPU flip
    assert torch.equal(dense_signs(words, K), unpack_signs_reference(words, K, torch.float32))
    words.copy_(_random_words((5,), K))
    assert torch.equal(dense_signs(words, K), unpack_signs_reference(words, K, torch.float32))
    # Another K of the same words, a view of them: their own values.
    if K > 32:
        assert torch.equal(dense_signs(words, 40), unpack_signs_reference(words, 40, torch.float32))
    view = words[1:4]
    assert torch.equal(dense_signs(view, K), unpack_signs_reference(view, K, torch.float32))
    strided = torch.cat([words, words], 1)[:, ::2] if words.shape[1] > 1 else words.t().t()
    assert torch.equal(dense_signs(strided, K), unpack_signs_reference(strided, K, torch.float32))


def test_dense_signs_entry_dies_with_its_words_and_clear_drops_all():
    words = _random_words((3,), 40)
    dense_signs(words, 40)
    key = id(words)
    assert key in _DENSE
    del words
    gc.collect()
    assert key not in _DENSE
    kept = _random_words((3,), 40)
    dense_signs(kept, 40)
    clear_dense_signs()
    assert not _DENSE
    # No weak reference left: torch.utils.swap_tensors accepts the words again.
    other = _random_words((3,), 40)
    torch.utils.swap_tensors(kept, other)
    assert torch.equal(dense_signs(kept, 40), unpack_signs_reference(kept, 40, torch.float32))


def _fresh(words, K):
    return unpack_signs_reference(words.clone(), K, torch.float32)


def test_dense_signs_sees_data_assignment_with_address_reuse():
    """``words.data = other``: no version bump; the allocator often hands the new storage the old
    address. The value comparison must still see the new words, every time."""
    K = 70
    words = _random_words((6,), K)
    for i in range(50):
        dense_signs(words, K)
        words.data = _random_words((6,), K, torch.Generator().manual_seed(i))
        assert torch.equal(dense_signs(words, K), _fresh(words, K)), i


def _write_via_numpy(words):
    words.numpy()[...] = ~words.numpy()


def _write_via_storage(words):
    # A raw write into the storage (as another process writing shared memory would do).
    flipped = torch.bitwise_not(words).contiguous()
    ctypes.memmove(words.data_ptr(), flipped.data_ptr(), flipped.nbytes)


def _write_via_data(words):
    with torch.no_grad():
        words.data.bitwise_not_()


@pytest.mark.parametrize("write", [_write_via_numpy, _write_via_storage, _write_via_data])
def test_dense_signs_sees_writes_that_bypass_the_version_counter(write):
    K = 45
    words = _random_words((5,), K)
    first = dense_signs(words, K).clone()
    version = words._version
    write(words)
    assert words._version == version  # the write did bypass the counter
    assert torch.equal(dense_signs(words, K), _fresh(words, K))
    assert torch.equal(dense_signs(words, K), -first)


def test_dense_signs_lru_cap_drops_oldest_first(monkeypatch):
    clear_dense_signs()
    K = 64
    per_entry = 8 * K * 4 + 8 * 2 * 4  # dense fp32 (8, 64) + words copy (8, 2)
    monkeypatch.setattr("bnnops.weight_cache.MAX_BYTES", 3 * per_entry)
    ws = [_random_words((8,), K) for _ in range(4)]
    for w in ws[:3]:
        dense_signs(w, K)
    dense_signs(ws[0], K)  # ws[0] most recently used: ws[1] is the oldest
    dense_signs(ws[3], K)
    assert set(_DENSE) == {id(ws[0]), id(ws[2]), id(ws[3])}
    for w in ws:
        assert torch.equal(dense_signs(w, K), _fresh(w, K))
    # A weight larger than the cap alone is not cached.
    big = _random_words((64,), 128)
    assert torch.equal(dense_signs(big, 128), _fresh(big, 128))
    assert id(big) not in _DENSE
    clear_dense_signs()


def test_dense_signs_switch_off_empties_and_bypasses_the_cache():
    words = _random_words((4,), 40)
    dense_signs(words, 40)
    assert id(words) in _DENSE and weight_cache.is_enabled()
    try:
        weight_cache.set_enabled(False)
        assert not _DENSE and not weight_cache.is_enabled()
        assert torch.equal(dense_signs(words, 40), _fresh(words, 40))
        assert not _DENSE
    finally:
        weight_cache.set_enabled(True)
    dense_signs(words, 40)
    assert id(words) in _DENSE


def test_dense_signs_not_cached_for_inference_tensors_meta_or_under_inference_mode():
    with torch.inference_mode():
        words = _random_words((4,), 40)
        assert torch.equal(dense_signs(words, 40), unpack_signs_reference(words, 40, torch.float32))
        normal = torch.zeros(4, 2, dtype=torch.int32)
        dense_signs(normal, 40)
    assert id(words) not in _DENSE and id(normal) not in _DENSE
    meta = torch.empty(4, 2, dtype=torch.int32, device="meta")
    assert dense_signs(meta, 40).device.type == "meta" and id(meta) not in _DENSE


@pytest.mark.parametrize("second_order", [False, True])
def test_layer_output_follows_bop_flips_load_state_dict_and_data(second_order):
    """A CPU layer trained by Bop reads its weight through the cache: every step's flips (in place)
    must show in the next forward, as a fresh unpack would give."""
    torch.manual_seed(0)
    layer = BinaryLinear(45, 7)
    x = torch.randn(6, 45)
    opt = (bnnops.optim.Bop2ndOrder if second_order else Bop)(
        [layer.weight], lr=0.5, threshold=0.0, **({"sigma": 0.5} if second_order else {})
    )
    flips = 0
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().sum().backward()
        before = layer.weight.words.clone()
        opt.step()
        flips += int((before != layer.weight.words).sum())
        with torch.no_grad():
            expected = torch.where(x < 0, -1.0, 1.0) @ layer.weight.dequantize().T + layer.bias
            assert torch.equal(layer(x), expected)
    assert flips > 0
    other = BinaryLinear(45, 7)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(layer(x), other(x))
        layer.weight.data = BinaryTensor.from_float(torch.randn(7, 45))
        expected = torch.where(x < 0, -1.0, 1.0) @ layer.weight.dequantize().T + layer.bias
        assert torch.equal(layer(x), expected)


# --- bnnops.ops.library.call ----------------------------------------------------------------------


class LogOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _op_cases(dtype, generator):
    """(op, args) for the forward ops on ragged shapes, fresh random inputs."""
    K, N = 45, 7
    x = random_signs_input((3, K), dtype, "cpu", generator)
    words = _random_words((N,), K, generator)
    bias, scale = torch.randn(N, generator=generator).to(dtype), torch.rand(N, generator=generator).to(dtype)
    xc = random_signs_input((2, 6, 5, 7), dtype, "cpu", generator).contiguous(memory_format=torch.channels_last)
    wc = _random_words((4, 3, 3), 6, generator)
    geometry = ([2, 1], [1, 0, 2, 1], [1, 2], 2)
    wg = _random_words((4, 3, 3), 3, generator)
    ops = torch.ops.bnnops
    return [
        (ops.binary_linear_w1a1.default, (x, words, K, scale, bias, dtype)),
        (ops.binary_linear_w1a1.default, (bnnops.pack_signs(x.float()), words, K, None, None, torch.float32)),
        (ops.binary_linear_w1a16.default, (x, words, None, bias, None)),
        (ops.binary_linear_grad_input.default, (x[:, :N].contiguous(), words, K)),
        (ops.binary_conv2d.default, (xc, wc, bias[:4], None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True, None)),
        (ops.binary_conv2d.default, (xc, wc, None, scale[:4], [1, 1], [0, 1, 1, 0], [1, 1], 1, -1.0, True, dtype)),
        (ops.binary_conv2d.default, (xc.contiguous(), wg, None, None, *geometry, 1.0, False, None)),
    ]


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_call_is_the_op(device, dtype, monkeypatch):
    """call() runs the op's own kernel for the device (CPU: the reference; CUDA: the launcher glue)
    without the dispatcher: the same values, bit for bit, as the op through it, and it is that
    kernel that runs (counted)."""
    generator = torch.Generator().manual_seed(1)
    ran = []
    for op, by_device in library.KERNELS.items():
        kernel = by_device[device]
        monkeypatch.setitem(by_device, device, lambda *a, k=kernel, op=op: ran.append(op) or k(*a))
    for op, args in _op_cases(dtype, generator):
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        ran.clear()
        direct = library.call(op, *args)
        assert ran == [op]
        expected = op(*args)
        assert torch.equal(direct, expected) and direct.dtype == expected.dtype
        assert direct.stride() == expected.stride()
    if device == "cuda":
        x = torch.randn(3, 40, device="cuda")
        assert library._direct_device((x, x.cpu())) is None  # mixed devices: the dispatcher decides


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_call_goes_through_the_dispatcher_when_something_watches():
    x, words = torch.randn(3, 40), _random_words((5,), 40)
    op = torch.ops.bnnops.binary_linear_w1a16.default
    with LogOps() as log:
        library.call(op, x, words, None, None, None)
    assert log.ops == [str(op)]
    with torch.profiler.profile() as prof:
        library.call(op, x, words, None, None, None)
    assert any(e.name == "bnnops::binary_linear_w1a16" for e in prof.events())
    meta = library._direct_device((x.to("meta"), words.to("meta")))
    mixed = library._direct_device((x, words.to("meta")))
    subclass = library._direct_device((BinaryTensor.from_float(x), words))
    sparse = library._direct_device((x.to_sparse(), words))
    nested = library._direct_device((torch.nested.nested_tensor([x, x]), words))
    assert library._direct_device((x, words)) == "cpu"
    assert (meta, mixed, subclass, sparse, nested) == (None,) * 5
    assert library._direct_device((3, None)) is None
    assert torch.func.vmap(lambda r: library.call(op, r[None], words, None, None, None))(x).shape == (3, 1, 5)


@pytest.mark.parametrize("watch", ["mode", "profiler"])
def test_conv_backward_ops_seen_when_something_watches(watch):
    """The conv backward fuses its two ops' references in plain eager CPU code only: under a
    dispatch mode or the profiler both backward ops run (and show), with the same gradients."""
    torch.manual_seed(5)
    layer = BinaryConv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    fused = [x.grad.clone(), layer.weight.grad.clone()]
    x.grad = layer.weight.grad = None
    names = ["binary_conv2d_grad_input", "binary_conv2d_grad_weight"]
    if watch == "mode":
        with LogOps() as log:
            layer(x).sum().backward()
        seen = " ".join(log.ops)
    else:
        with torch.profiler.profile() as prof:
            layer(x).sum().backward()
        seen = " ".join(e.name for e in prof.events())
    assert all(name in seen for name in names), seen
    assert torch.equal(x.grad, fused[0]) and torch.equal(layer.weight.grad, fused[1])
    assert library.skips_dispatcher((x.detach(),)) and not library.skips_dispatcher((x.detach().to_sparse(),))


def _error(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


def _bad_calls():
    x, words = torch.randn(3, 40), _random_words((5,), 40)
    xc, wc = torch.randn(1, 6, 5, 5), _random_words((4, 3, 3), 6)
    ops = torch.ops.bnnops
    conv = ops.binary_conv2d.default
    return [
        (ops.binary_linear_w1a1.default, (x.double(), words, 40, None, None, torch.float32)),
        (ops.binary_linear_w1a1.default, (x, words, 64, None, None, torch.float32)),
        (ops.binary_linear_w1a1.default, (x, words, 40, None, torch.randn(4), torch.float32)),
        (ops.binary_linear_w1a1.default, (x, words.to("meta"), 40, None, None, torch.float32)),
        (ops.binary_linear_w1a1.default, (x, words, 40, None, None, torch.int32)),
        (ops.binary_linear_w1a16.default, (x, words.float(), None, None, None)),
        (ops.binary_linear_w1a16.default, (x.to_sparse(), words, None, None, None)),
        (conv, (xc, wc, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 4, 0.0, True, None)),
        (conv, (xc, wc, None, None, [0, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True, None)),
        (conv, (xc, wc, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.5, True, None)),
        (conv, (xc[0], wc, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True, None)),
    ]


def test_call_raises_the_ops_errors():
    """Bad input through call() raises what the op raises, also after good calls."""
    x, words = torch.randn(3, 40), _random_words((5,), 40)
    library.call(torch.ops.bnnops.binary_linear_w1a1.default, x, words, 40, None, None, torch.float32)
    for op, args in _bad_calls():
        assert _error(lambda op=op, args=args: library.call(op, *args)) == _error(lambda op=op, args=args: op(*args))


# --- the layers: lean path against the path without caches and direct calls --------------------------


def _layer_runs(dtype, training):
    """(layer, x) pairs on ragged shapes, memory formats, geometries and quantizers."""
    torch.manual_seed(2)
    cl = torch.channels_last
    runs = [
        (BinaryLinear(45, 7), torch.randn(2, 3, 45)),
        (BinaryLinear(45, 7, input_quantizer=None, bias=False), torch.randn(5, 45)),
        (BinaryLinear(33, 9, weight_quantizer="ste_sign"), torch.randn(4, 33)),
        (BinaryConv2d(6, 4, 3, padding=1), torch.randn(2, 6, 7, 5)),
        (BinaryConv2d(6, 4, 3, padding="same", pad_value=-1.0), torch.randn(2, 6, 7, 5).contiguous(memory_format=cl)),
        (BinaryConv2d(6, 4, (3, 2), stride=2, dilation=(1, 2), groups=2, input_quantizer=None), torch.randn(6, 9, 8)),
        (BinaryConv2d(35, 4, 1, padding=(0, 1), weight_quantizer="ste_sign"), torch.randn(1, 35, 3, 4)),
    ]
    return [(layer.to(dtype), x.to(dtype).requires_grad_(training)) for layer, x in runs]


def _run(layer, x, training):
    if not training:
        with torch.no_grad():
            return [layer(x)]
    for p in (x, *layer.parameters()):
        p.grad = None
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return [y, x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_layers_lean_path_equals_uncached(dtype, training, uncached):
    """Outputs and gradients (values, dtypes, strides) of the lean path, run twice (the second from
    the caches), equal those of the path without caches or direct calls."""
    runs = _layer_runs(dtype, training)
    lean = [[_run(layer, x, training) for _ in range(2)] for layer, x in runs]
    uncached()
    for (layer, x), (first, second) in zip(runs, lean):
        reference = _run(layer, x, training)
        for a, b, c in zip(first, second, reference):
            assert torch.equal(a, c) and torch.equal(b, c), layer
            assert a.dtype == c.dtype and a.stride() == c.stride()


def _bad_layer_calls():
    linear, conv = BinaryLinear(45, 7), BinaryConv2d(6, 4, 3, padding=1)
    x, xc = torch.randn(3, 45), torch.randn(2, 6, 5, 5)
    return [
        lambda: linear(x.double()),
        lambda: linear(x[:, :40]),
        lambda: linear(x.to("meta")),
        lambda: linear(x.int()),
        lambda: bnnops.binary_linear(x, linear.weight, torch.randn(6)),
        lambda: bnnops.binary_linear(x, linear.weight, scale=torch.ones(7, dtype=torch.int32)),
        lambda: conv(xc.half()),
        lambda: conv(xc[:, :5]),
        lambda: conv(xc[0, 0]),
        lambda: conv(xc.to("meta")),
        lambda: bnnops.binary_conv2d(xc, conv.weight, stride=1.0),
        lambda: bnnops.binary_conv2d(xc, conv.weight, padding=1.0),
        lambda: bnnops.binary_conv2d(xc, conv.weight, stride=(1, True, 1)),
        lambda: bnnops.binary_conv2d(xc, conv.weight, padding="same", stride=2),
        lambda: bnnops.binary_conv2d(xc, conv.weight, padding="full"),
        lambda: bnnops.binary_conv2d(xc, conv.weight, padding=(0, -1)),
        lambda: bnnops.binary_conv2d(xc, conv.weight, dilation=[9, 9]),
    ]


def test_bad_inputs_after_good_calls_raise_the_uncached_errors(uncached):
    linear, conv = BinaryLinear(45, 7), BinaryConv2d(6, 4, 3, padding=1)
    # Fill the caches with good calls whose arguments equal the bad ones' values (1 == 1.0 == True).
    linear(torch.randn(3, 45))
    conv(torch.randn(2, 6, 5, 5))
    for stride, padding in ((1, 1), ((1, 1), (0, 0)), (1, "same"), (2, 0)):
        bnnops.binary_conv2d(torch.randn(2, 6, 5, 5), conv.weight, stride=stride, padding=padding)
    lean = [_error(bad) for bad in _bad_layer_calls()]
    uncached()
    assert lean == [_error(bad) for bad in _bad_layer_calls()]


def test_conv_geometry_cache_keys_on_the_kernel_and_argument_types():
    words = _random_words((4, 3, 3), 6)
    w3 = BinaryTensor(words, (4, 6, 3, 3))
    w5 = BinaryTensor(_random_words((4, 5, 5), 6), (4, 6, 5, 5))
    x = torch.randn(1, 6, 9, 9)
    with torch.no_grad():
        assert bnnops.binary_conv2d(x, w3, padding="same").shape == (1, 4, 9, 9)
        assert bnnops.binary_conv2d(x, w5, padding="same").shape == (1, 4, 9, 9)  # padding 2, not 1
        assert conv_module._geometry(1, [1, 2], 1, (3, 3)) == ((1, 1), (1, 1, 2, 2), (1, 1))
    assert ([1, 2] not in conv_module._GEOMETRY.values()) and conv_module._exact((1, 2))
    assert not any(map(conv_module._exact, ([1, 2], (1, 2.0), True, 1.0, (True, 1), None)))


def _autocast_runs():
    torch.manual_seed(3)
    return [
        (BinaryLinear(1000, 64, input_quantizer=None), torch.randn(3, 1000)),
        (BinaryLinear(45, 7, input_quantizer=None), torch.randn(3, 45)),
        (BinaryConv2d(70, 4, 3, padding=1, input_quantizer=None), torch.randn(2, 70, 5, 5)),
        (BinaryConv2d(6, 4, 3, padding=1), torch.randn(2, 6, 5, 5)),
    ]


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_under_autocast_equal_the_layer_in_that_dtype(dtype, lean, uncached):
    """Under CPU autocast a layer's output and gradients are the bits of the same layer run in
    autocast's dtype without autocast: the references' fp32 math must not drop to that dtype."""
    if not lean:
        uncached()
    for layer, x in _autocast_runs():
        x = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
        y.backward(g)
        grad_x, x.grad = x.grad, None
        expected = layer.to(dtype)(x)
        expected.backward(g)
        assert y.dtype == expected.dtype == dtype and torch.equal(y, expected), layer
        assert torch.equal(grad_x, x.grad), layer


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpack_from_the_words_bytes_equals_the_shifts(dtype, monkeypatch):
    """The byte-view unpacking (little-endian hosts, eager) against the shift one, on random words
    with every bit pattern, ragged K, several ranks and non-contiguous words."""
    import bnnops.packing as packing

    generator = torch.Generator().manual_seed(4)
    cases = [
        (torch.randint(-(2**31), 2**31, (7, 3), generator=generator, dtype=torch.int32), 70),
        (torch.randint(-(2**31), 2**31, (2, 5, 2), generator=generator, dtype=torch.int32), 33),
        (torch.randint(-(2**31), 2**31, (6, 4), generator=generator, dtype=torch.int32)[::2, 1:3], 64),
        (torch.randint(-(2**31), 2**31, (4, 1), generator=generator, dtype=torch.int32), 1),
        (torch.zeros(3, 0, dtype=torch.int32), 0),
    ]
    fast = [packing.unpack_signs_reference(w, K, dtype) for w, K in cases]
    monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)
    for (w, K), got in zip(cases, fast):
        expected = packing.unpack_signs_reference(w, K, dtype)
        assert got.dtype == expected.dtype and got.is_contiguous() and torch.equal(got, expected)
