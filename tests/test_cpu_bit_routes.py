"""The CPU path computes bits three ways (bnnops.packing): NumPy compares and packs on plain CPU
tensors (of at least _NUMPY_MIN_ELEMENTS elements), torch byte views for other CPU tensors, torch
shifts where neither applies (torch.compile, a big-endian host). Every route must give the same bits: compared here on fresh random inputs with
ragged K, other strides, special values (+-0.0, +-inf, NaN) and empty tensors."""

import numpy as np
import pytest
import torch

from bnnops import packing
from bnnops.ops import backward_reference
from bnnops.packing import negative, pack_bits, sign_values, unpack_bits, unpack_signs_reference

ROUTES = ("numpy", "byte views", "shifts")


@pytest.fixture(autouse=True)
def numpy_at_every_size(monkeypatch):
    """The NumPy route for the small tensors of these tests too (test_numpy_threshold checks it)."""
    monkeypatch.setattr(packing, "_NUMPY_MIN_ELEMENTS", 0)


def _route(monkeypatch, route):
    """Switch bnnops.packing to ``route`` for the rest of the test."""
    if route != "numpy":
        monkeypatch.setattr(packing, "_on_numpy", lambda t: False)
    if route == "shifts":
        monkeypatch.setattr(packing, "_LITTLE_ENDIAN", False)


def _floats(shape, dtype, seed):
    """Random normals with +-0.0, +-inf and NaN planted (fixed positions, fresh values)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    flat = x.view(-1)
    for i, v in enumerate((0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0)):
        if i < flat.numel():
            flat[(7 * i + seed) % flat.numel()] = v
    return x


SHAPES = [(3, 1), (5, 31), (4, 33), (2, 3, 64), (7, 100), (0, 40), (3, 0)]


def _results(x, bits, words, K, dtype):
    clip = 1.0
    out = {
        "pack_bits": pack_bits(bits),
        "pack_bits strided": pack_bits(bits.transpose(0, -1).contiguous().transpose(0, -1)),
        "unpack_bits": unpack_bits(words, K),
        "unpack_signs": unpack_signs_reference(words, K, dtype),
        "unpack_signs int8": unpack_signs_reference(words, K, torch.int8),
        "negative": negative(x),
        "sign_values": sign_values(x),
        "pass_mask": backward_reference.pass_mask(x, clip),
        "sign_and_mask_bits": backward_reference.sign_and_mask_bits(x, clip),
        "pack_sign_and_mask": torch.stack(backward_reference.pack_sign_and_mask_reference(x, clip)),
    }
    if x.dim() == 2 and x.shape[1] and x.shape[1] % 2 == 0:
        conv_x = x.reshape(x.shape[0], x.shape[1] // 2, 2, 1)
        out["pack_sign_and_mask_conv"] = torch.stack(
            backward_reference.pack_sign_and_mask_conv_reference(conv_x, clip, 1)
        )
        out["pack_sign_and_mask_conv channels_last"] = torch.stack(
            backward_reference.pack_sign_and_mask_conv_reference(conv_x.to(memory_format=torch.channels_last), clip, 1)
        )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_route_gives_the_same_bits(monkeypatch, shape, dtype):
    seed = sum(shape) + len(shape)
    x = _floats(shape, dtype, seed)
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    K = shape[-1]
    words = torch.randint(
        -(2**31),
        2**31,
        (*shape[:-1], packing.packed_length(K)),
        dtype=torch.int32,
        generator=torch.Generator().manual_seed(seed + 2),
    )
    results = {}
    for route in ROUTES:
        with monkeypatch.context() as m:
            _route(m, route)
            results[route] = _results(x, bits, words, K, dtype)
    # The definition, computed here independently of every route.
    expected_words = (
        ((bits.reshape(*shape[:-1], -1).to(torch.int64)) << torch.arange(K)).sum(-1) if 0 < K <= 32 else None
    )
    for name, value in results["numpy"].items():
        for route in ROUTES[1:]:
            other = results[route][name]
            assert value.dtype == other.dtype and value.shape == other.shape, (name, route)
            assert torch.equal(value, other), (name, route)
    assert torch.equal(results["numpy"]["negative"], x < 0)
    assert torch.equal(results["numpy"]["sign_values"], torch.where(x < 0, -1.0, 1.0))
    assert torch.equal(results["numpy"]["pass_mask"], x.abs() <= 1.0)
    shifted = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    expected_bits = shifted.flatten(-2)[..., :K].bool()
    assert torch.equal(results["numpy"]["unpack_bits"], expected_bits)
    expected_signs = torch.where(expected_bits, -1.0, 1.0)
    assert torch.equal(results["numpy"]["unpack_signs"], expected_signs.to(dtype))
    assert torch.equal(results["numpy"]["unpack_signs int8"], expected_signs.to(torch.int8))
    if expected_words is not None:
        packed = results["numpy"]["pack_bits"]
        assert torch.equal(packed.view(*shape[:-1]).to(torch.int64) & 0xFFFFFFFF, expected_words & 0xFFFFFFFF)


@pytest.mark.filterwarnings("error")
def test_numpy_route_rounds_the_clip_value_to_the_input_dtype():
    # 1.3005 rounds up to 1.3008 in float16: torch compares against the rounded value, so must NumPy.
    x = torch.tensor([1.3008, -1.3008, 1.3018, 1.000977, 70000.0, float("nan")], dtype=torch.float32).half()
    x = torch.cat((x, torch.tensor([float("inf"), -float("inf"), 65504.0], dtype=torch.float16)))
    assert packing.float_array(x) is not None and packing.float_array(x.float()) is not None  # NumPy compares
    # 1 + 2**-11 + 2**-40 and 65519.99999: torch rounds to float32 first, then to float16.
    for clip in (1.3005, 1e6, 65519.0, 65520.0, 1 + 2**-11 + 2**-40, 65519.99999, 1e39):
        assert torch.equal(backward_reference.pass_mask(x, clip), x.abs() <= clip), clip
        assert torch.equal(backward_reference.sign_and_mask_bits(x, clip)[1], x.abs() <= clip), clip
        wide = x.float()
        assert torch.equal(backward_reference.pass_mask(wide, clip), wide.abs() <= clip), clip


def test_numpy_route_is_taken_for_plain_cpu_tensors_and_owns_its_memory(monkeypatch):
    calls = []
    real = np.packbits
    monkeypatch.setattr(np, "packbits", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(4, 70, requires_grad=True)
    bits = negative(x)
    words = pack_bits(bits)
    assert calls, "pack_bits did not take the NumPy route for a plain CPU tensor"
    assert not bits.requires_grad and not words.requires_grad
    for t in (bits, words):
        assert t.untyped_storage().resizable()  # torch allocated it (a NumPy-owned storage is not)
    before = x.detach().clone()
    words.zero_()
    bits.fill_(True)
    assert torch.equal(x.detach(), before)  # results never alias the input


def test_inference_tensors_and_noncontiguous_words():
    with torch.inference_mode():
        x = torch.randn(3, 40)
    assert torch.equal(negative(x), x < 0)
    words = torch.randint(-(2**31), 2**31, (5, 6), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    strided = words[:, ::2]
    assert torch.equal(unpack_bits(strided, 70), unpack_bits(strided.contiguous(), 70))


def test_numpy_route_is_off_while_a_trace_watches():
    """make_fx traces through a dispatch mode: the bit work must be torch ops in its graph, not a
    NumPy result baked in as a constant (the graph would then ignore its input)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def saved_words(x):
        return pack_bits(backward_reference.sign_and_mask_bits(x, 1.0)), unpack_signs_reference(
            pack_bits(negative(x)), x.shape[-1], torch.float32
        )

    graph = make_fx(saved_words)(torch.randn(3, 40))
    x = torch.randn(3, 40)
    for got, expected in zip(graph(x), saved_words(x)):
        assert torch.equal(got, expected)


def test_unpack_bits_refuses_more_bits_than_the_words_hold():
    words = torch.zeros(3, 2, dtype=torch.int32)
    for route in ROUTES:
        with pytest.MonkeyPatch.context() as m:
            _route(m, route)
            assert unpack_bits(words, 64).shape == (3, 64)
            for K in (65, -1):
                with pytest.raises(ValueError, match="hold at most 64 bits"):
                    unpack_bits(words, K)


def test_numpy_route_leaves_the_callers_tensors_resizable():
    """``Tensor.numpy()`` would mark a storage as never resizable again: the NumPy route reads and
    writes through DLPack instead, so a layer call leaves its input, weight and gradients as they were."""
    from bnnops.nn import BinaryConv2d, BinaryLinear

    for layer, x in ((BinaryLinear(70, 5), torch.randn(3, 70)), (BinaryConv2d(35, 4, 3), torch.randn(2, 35, 5, 5))):
        x.requires_grad_()
        layer(x).sum().backward()
        with torch.no_grad():
            layer(x)
        for t in (x, x.grad, layer.weight.words, layer.weight.grad):
            assert t.untyped_storage().resizable()


def test_numpy_threshold(monkeypatch):
    """NumPy compares and packs from _NUMPY_MIN_ELEMENTS elements on (a speed choice: below, its
    views cost more than they save), the same bits either side."""
    monkeypatch.undo()
    calls = []
    real = np.packbits
    monkeypatch.setattr(np, "packbits", lambda *a, **k: calls.append(1) or real(*a, **k))
    small, large = torch.randn(3, 40), torch.randn(packing._NUMPY_MIN_ELEMENTS // 40 + 1, 40)
    assert torch.equal(pack_bits(negative(small)), pack_bits(small < 0)) and not calls
    words = pack_bits(negative(large))
    assert calls and torch.equal(unpack_bits(words, 40), large < 0)


def test_lazily_negated_views_take_the_torch_route():
    """``z.conj().imag`` is a view with torch's negative bit: its values are the negated stored ones.
    DLPack would hand NumPy the stored values, so such a tensor takes the torch route (and calls
    with one go through the dispatcher, which resolves the bit)."""
    from bnnops.nn import BinaryLinear
    from bnnops.ops import library

    z = torch.randn(300, 64, dtype=torch.cfloat)
    x = z.conj().imag
    assert x.is_neg() and x.numel() >= packing._NUMPY_MIN_ELEMENTS
    resolved = x.resolve_neg()
    assert packing.float_array(x) is None and library._direct_device((x,)) is None
    assert torch.equal(negative(x), resolved < 0)
    assert torch.equal(pack_bits(negative(x)), pack_bits(resolved < 0))
    assert torch.equal(backward_reference.pass_mask(x, 0.5), resolved.abs() <= 0.5)
    layer = BinaryLinear(64, 8)
    twin = BinaryLinear(64, 8)
    twin.load_state_dict(layer.state_dict())
    for module, inputs in ((layer, x), (twin, resolved)):
        module(inputs.requires_grad_() if inputs is resolved else inputs).sum().backward()
    assert torch.equal(layer.weight.grad, twin.weight.grad)
