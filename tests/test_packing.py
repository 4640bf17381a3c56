import pytest
import torch
from helpers import FLOAT_DTYPES, poisoned, random_signs_input

import bnnops
from bnnops import kernels, packing
from bnnops.packing import pack_bits, pack_signs_reference, pack_weight, unpack_signs_reference

KS = [1, 31, 32, 33, 100, 4097]
LEADING = [(), (3,), (2, 5)]


@pytest.fixture(scope="module")
def pack_kernels():
    return kernels.load("pack")


def test_reference_bit_order():
    # Element 32*w + j is bit j of word w; bit 1 means -1.
    x = torch.ones(2, 40)
    x[0, 0] = -1.0
    x[0, 31] = -1.0
    x[1, 33] = -1.0
    words = pack_signs_reference(x)
    assert words.tolist() == [[1 - 2**31, 0], [0, 2]]  # bits 0 and 31: 1 + 2**31 as int32
    assert pack_signs_reference(torch.tensor([-0.0, 0.0, -1.0])).tolist() == [4]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpack_reference_bit_order(dtype):
    # Bit j of word w is element 32*w + j, -1 where set, written out bit by bit in Python; words
    # with bit 31 set (negative int32) included, and padding bits ignored.
    words = torch.randint(-(2**31), 2**31, (3, 5), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    words[0, 0], words[1, 1], words[2, 2] = -1, -(2**31), 0x00FF00FF
    K = 32 * 5 - 7
    expected = [[-1.0 if (int(w) >> j) & 1 else 1.0 for w in row for j in range(32)][:K] for row in words.tolist()]
    assert torch.equal(unpack_signs_reference(words.to(torch.int32), K, dtype), torch.tensor(expected, dtype=dtype))


def test_pack_bits_and_weight_masks():
    bits = torch.rand(3, 70, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(pack_bits(bits), pack_signs_reference(torch.where(bits, -1.0, 1.0)))
    mask = torch.rand(4, 37, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    assert torch.equal(pack_weight(mask), pack_weight(torch.where(mask, -1.0, 1.0)))
    with pytest.raises(TypeError, match="bool tensor"):
        pack_bits(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_weight(torch.tensor(True))


def test_unpack_reference_table_cache(monkeypatch):
    """The byte table is cached per (dtype, device): not from a fake trace (later real calls would
    get fake results), and built on the words' device whatever the default device."""
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(packing, "_BYTE_SIGNS", {})
    words = torch.tensor([[0x00FF00FF, -1]], dtype=torch.int32)
    make_fx(lambda w: unpack_signs_reference(w, 40, torch.float16), tracing_mode="fake")(words)
    real = unpack_signs_reference(words, 40, torch.float16)
    assert type(real) is torch.Tensor
    bits = [(int(w) >> j) & 1 for w in words[0].tolist() for j in range(32)][:40]
    assert real[0].tolist() == [-1.0 if b else 1.0 for b in bits]
    monkeypatch.setattr(packing, "_BYTE_SIGNS", {})
    with torch.device("meta"):
        assert torch.equal(unpack_signs_reference(words, 40, torch.float16), real)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pack_kernel_matches_reference(pack_kernels, device, K, leading, dtype):
    x = random_signs_input((*leading, K), dtype, device)
    out = poisoned((*leading, bnnops.packed_length(K)), torch.int32, device)
    words = pack_kernels.pack_signs(x, out=out)
    assert words is out
    assert torch.equal(words.cpu(), pack_signs_reference(x.cpu()))


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unpack_kernel_matches_reference(pack_kernels, device, K, leading, dtype):
    # Random words with garbage in the padding bits: unpacking must ignore them.
    n_words = bnnops.packed_length(K)
    words = torch.randint(-(2**31), 2**31, (*leading, n_words), dtype=torch.int64).to(torch.int32).to(device)
    out = poisoned((*leading, K), dtype, device)
    values = pack_kernels.unpack_signs(words, K, dtype, out=out)
    assert values is out
    assert torch.equal(values.cpu(), unpack_signs_reference(words.cpu(), K, dtype))


def test_pack_kernel_non_contiguous_input(pack_kernels, device):
    x = torch.randn(70, 9, device=device).t()  # (9, 70) with strides (1, 9)
    assert torch.equal(pack_kernels.pack_signs(x).cpu(), pack_signs_reference(x.cpu()))


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pack_then_unpack_is_sign(device, K, dtype):
    x = random_signs_input((3, K), dtype, device)
    words = bnnops.pack_signs(x)
    assert words.dtype == torch.int32 and words.shape == (3, bnnops.packed_length(K))
    back = bnnops.unpack_signs(words, K, dtype)
    assert back.dtype == dtype
    assert torch.equal(back, torch.where(x < 0, -1.0, 1.0).to(dtype))


def test_padding_bits_are_zero(device):
    x = -torch.ones(4, 33, device=device)
    words = bnnops.pack_signs(x)
    assert words[:, 0].tolist() == [-1] * 4
    assert words[:, 1].tolist() == [1] * 4


def test_nan(device, pack_kernels):
    x = torch.tensor([[-1.0, float("nan"), -2.0]], device=device)
    # The ops and kernels are sync-free: NaN packs as +1 (bit 0), like `x < 0` says.
    assert torch.ops.bnnops.pack_signs(x).tolist() == [[5]]
    assert pack_kernels.pack_signs(x).tolist() == [[5]]
    assert pack_signs_reference(x.cpu()).tolist() == [[5]]
    # The public function refuses it.
    with pytest.raises(ValueError, match="NaN"):
        bnnops.pack_signs(x)


def test_bad_inputs(device):
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        bnnops.pack_signs(torch.ones(3, 4, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        bnnops.pack_signs(torch.ones(3, 4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="scalar"):
        bnnops.pack_signs(torch.tensor(1.0, device=device))
    words = torch.zeros(3, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cannot hold K=65"):
        bnnops.unpack_signs(words, 65)
    with pytest.raises(ValueError, match="cannot hold K=32"):
        bnnops.unpack_signs(words, 32)
    with pytest.raises(TypeError, match="int32"):
        bnnops.unpack_signs(words.float(), 40)
    with pytest.raises(TypeError, match="unpack dtype"):
        bnnops.unpack_signs(words, 40, torch.int8)


def test_empty(device):
    assert bnnops.pack_signs(torch.ones(0, 5, device=device)).shape == (0, 1)
    assert bnnops.unpack_signs(torch.zeros(2, 0, dtype=torch.int32, device=device), 0).shape == (2, 0)


def test_opcheck(device):
    x = torch.randn(3, 45, device=device)
    torch.library.opcheck(torch.ops.bnnops.pack_signs.default, (x,))
    words = torch.ops.bnnops.pack_signs(x)
    torch.library.opcheck(torch.ops.bnnops.unpack_signs.default, (words, 45, torch.float16))


def test_compile_fullgraph(device):
    def roundtrip(x):
        return torch.ops.bnnops.unpack_signs(torch.ops.bnnops.pack_signs(x), x.shape[-1], x.dtype) * 2

    x = torch.randn(4, 70, device=device)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), roundtrip(x))


def test_import_without_triton():
    # `import bnnops` must work without triton and say why the Triton path is off.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib.util as u; real = u.find_spec\n"
        "u.find_spec = lambda n, *a: None if n == 'triton' else real(n, *a)\n"
        "import torch, bnnops\n"
        "assert not bnnops.kernels.triton_available()\n"
        "print(bnnops.unpack_signs(bnnops.pack_signs(torch.tensor([-1.0, 2.0])), 2).tolist())\n"
        "try:\n    bnnops.kernels.load('pack')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[-1.0, 1.0]" in out
    assert "Triton path is off because the 'triton' package is not installed" in out
