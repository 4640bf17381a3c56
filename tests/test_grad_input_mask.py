"""``bnnops.kernels.gemm.grad_input`` with a packed pass mask (the straight-through estimator's,
applied in the GEMM's epilogue): against ``torch.where(mask, g @ W, 0)``, and bit for bit against
the unmasked kernel's result with the blocked positions zeroed.

Every route the launcher takes is run: the table's configs (the small-batch layout, the
large-batch layout unsplit and split over K, and the small-batch layout split over K) and the
interpreter's small configs, which make several tiles in M, K and the reduction. Shapes are
ragged (K not a multiple of 32, M = 1, M beyond one block); the mask words are random, bit 31
included, with their padding bits set (the format says 0: they must be ignored); outputs are
poisoned with NaN, so a position the kernel does not write shows.
"""

import pytest
import torch
import triton
from helpers import DEVICE, FLOAT_DTYPES, poisoned, random_signs_input

from bnnops import kernels
from bnnops.ops.reference import dense_signs

configs = kernels.load("gemm_configs")

# (M, N, K) of y (M, K) = g (M, N) @ W (N, K). The table picks for these (SM90, bf16): the
# small-batch layout unsplit (1, 45, 70) and split in 4 (5, 200, 70), the large-batch layout
# split in 2 (37, 70, 33) and unsplit with M past its 128 rows (130, 20, 40). The interpreter's
# small configs (16 rows, 32 columns, 64 reduction steps) make several tiles of the first three.
SHAPES = [(1, 45, 70), (5, 200, 70), (37, 70, 33), (130, 20, 40)]
CASES = [pytest.param(None, *shape, id="table-{}x{}x{}".format(*shape)) for shape in SHAPES]
CONFIG_IDS = ["table"]
CONFIGS = [None]
if DEVICE == "cpu":
    CONFIG_IDS += ["small", "swapped-split", "split"]
    CONFIGS += [configs.INTERPRETER_CONFIGS[name] for name in CONFIG_IDS[1:]]
    CASES += [
        pytest.param(config, *shape, id="{}-{}x{}x{}".format(name, *shape))
        for name, config in zip(CONFIG_IDS[1:], CONFIGS[1:])
        for shape in SHAPES[:3]
    ]


@pytest.fixture(scope="module")
def gemm():
    return kernels.load("gemm")


def random_words(rows, K, generator, padding_bits=True):
    """Random int32 words (rows, ceil(K/32)) over the whole range (bit 31 set in about half);
    with ``padding_bits`` the bits past K of the last word all set."""
    words = torch.randint(-(2**31), 2**31, (rows, triton.cdiv(K, 32)), dtype=torch.int32, generator=generator)
    if padding_bits and K % 32:
        words[:, -1] |= torch.tensor(-(1 << (K % 32)), dtype=torch.int32)
    return words


def passes(mask_words, K):
    """The bool (M, K) pass mask of words (M, ceil(K/32)): bit j of word w is column 32*w + j."""
    bits = (mask_words.cpu()[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(mask_words.shape[0], -1)[:, :K] != 0


def small_integers(shape, dtype, generator):
    """Integers in [-8, 8]: every sum of +-g over up to 200 terms is exact in fp32 and in the
    output dtype (|y| <= 1600 < 2**11), and fp32 g needs no TF32 low part."""
    return torch.randint(-8, 9, shape, generator=generator).to(dtype)


def case(M, N, K, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    words = random_words(N, K, generator).to(DEVICE)
    mask_words = random_words(M, K, generator).to(DEVICE)
    return generator, words, mask_words


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config,M,N,K", CASES)
def test_masked_equals_reference_and_unmasked(gemm, config, M, N, K, dtype):
    generator, words, mask_words = case(M, N, K, dtype, seed=M * N * K)
    keep = passes(mask_words, K)
    # Exact sums: the masked product equals the reference exactly.
    g = small_integers((M, N), dtype, generator).to(DEVICE)
    out = poisoned((M, K), dtype, DEVICE)
    y = gemm.grad_input(g, words, K, mask_words=mask_words, out=out, config=config)
    assert y is out and y.dtype == dtype
    expected = torch.where(keep, g.cpu().float() @ dense_signs(words.cpu(), K), 0.0).to(dtype)
    assert torch.equal(y.cpu(), expected)
    # Random g (with +-0 and tiny values), column-major: the mask changes nothing but the blocked
    # positions, which are +0.0.
    g = random_signs_input((N, M), dtype, DEVICE, generator=generator, finite=True).t()
    unmasked = gemm.grad_input(g, words, K, config=config).cpu()
    y = gemm.grad_input(g, words, K, mask_words=mask_words, out=poisoned((M, K), dtype, DEVICE), config=config)
    expected = torch.where(keep, unmasked, torch.zeros((), dtype=dtype))
    assert torch.equal(bits(y), bits(expected))


def bits(y):
    """The bits of float y (on the CPU), so that equality tells -0.0 from +0.0 and NaN equals NaN."""
    return y.cpu().view({4: torch.int32, 2: torch.int16}[y.element_size()])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf in the interpreter's matmul
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_blocked_positions_are_zero_where_the_product_is_not_finite(gemm, config, dtype):
    """A select, as ``SteSign``'s gradient: a blocked position is 0 even where g @ W is inf or
    NaN, also when split-K adds the shares (an inf share stays inf, inf - inf is NaN)."""
    M, N, K = 20, 70, 40
    generator, words, mask_words = case(M, N, K, dtype, seed=7)
    words[:2] = 0  # rows 0 and 1 of W all +1
    g = small_integers((M, N), dtype, generator)
    g[1, 0] = float("inf")  # row 1 of y: inf everywhere
    g[2, 0], g[2, 1] = float("inf"), float("-inf")  # row 2: inf - inf = NaN everywhere
    keep = passes(mask_words, K)
    y = gemm.grad_input(
        g.to(DEVICE), words, K, mask_words=mask_words, out=poisoned((M, K), dtype, DEVICE), config=config
    )
    unmasked = gemm.grad_input(g.to(DEVICE), words, K, config=config).cpu()
    assert unmasked[1].isinf().all() and unmasked[2].isnan().all()
    assert torch.equal(bits(y), bits(torch.where(keep, unmasked, torch.zeros((), dtype=dtype))))
    assert (y.cpu()[1:3][~keep[1:3]] == 0).all() and keep[1:3].any() and not keep[1:3].all()


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_strided_mask_words_and_output(gemm, config):
    """Mask words with a row stride past the row's length, and column-major ones; a column-major
    output."""
    M, N, K, dtype = 9, 40, 100, torch.bfloat16
    generator, words, mask_words = case(M, N, K, dtype, seed=3)
    g = small_integers((M, N), dtype, generator).to(DEVICE)
    expected = gemm.grad_input(g, words, K, mask_words=mask_words, config=config)
    wide = random_words(M, 3 * K, generator).to(DEVICE)
    wide[:, : mask_words.shape[1]] = mask_words
    column_major = mask_words.t().contiguous().t()
    for strided in (wide[:, : mask_words.shape[1]], column_major):
        assert not strided.is_contiguous()
        assert torch.equal(gemm.grad_input(g, words, K, mask_words=strided, config=config), expected)
    out = poisoned((K, M), dtype, DEVICE).t()
    assert torch.equal(gemm.grad_input(g, words, K, mask_words=mask_words, out=out, config=config), expected)


def test_empty_and_bad_masks(gemm):
    M, N, K = 3, 20, 40
    generator, words, mask_words = case(M, N, K, torch.float32, seed=5)
    g = small_integers((M, N), torch.float32, generator).to(DEVICE)
    # An empty reduction: y = 0, blocked or not.
    empty = torch.zeros(0, words.shape[1], dtype=torch.int32, device=DEVICE)
    y = gemm.grad_input(g[:, :0], empty, K, mask_words=mask_words, out=poisoned((M, K), torch.float32, DEVICE))
    assert torch.equal(bits(y), torch.zeros(M, K, dtype=torch.int32))
    assert gemm.grad_input(g[:0], words, K, mask_words=mask_words[:0]).shape == (0, K)
    for bad in (mask_words[:, :-1], mask_words[:-1], mask_words.float(), mask_words.to(torch.int64)):
        with pytest.raises(ValueError, match="mask_words must be int32"):
            gemm.grad_input(g, words, K, mask_words=bad)
    gemv = configs.gemv_config(M, K, N, configs.INTERPRETER_SMS)
    with pytest.raises(ValueError, match="GEMV"):
        gemm.grad_input(g, words, K, mask_words=mask_words, config=gemv)


def test_shapes_take_every_route_of_the_table():
    """The table's configs for SHAPES (as the launcher picks them on CPU tensors, bf16) cover the
    small-batch and the large-batch layout, each unsplit and split over K."""
    routes = set()
    for M, N, K in SHAPES:
        config = configs.default_config(configs.X_REAL, True, M, K, N, torch.bfloat16, torch.device("cpu"))
        routes.add((config.kwargs["SWAP_AB"], config.kwargs["SPLIT_K"] > 1, config.kwargs["BLOCK_M"] < M))
    assert routes == {(True, False, False), (True, True, False), (False, True, False), (False, False, True)}
