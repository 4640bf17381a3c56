"""The Triton launchers of bnnops.kernels.gemm against the pure-PyTorch references, and the config
rules of bnnops.kernels.gemm_configs.

Every case uses ragged sizes (K not a multiple of 32, M and N not multiples of any block, M = 1)
that make several tiles in M, N and K: without CUDA the launchers run in Triton's interpreter (see
conftest.py), so shapes stay small and the interpreter's small block configs are added; natively,
larger shapes tile the shape table's own blocks.
"""

import itertools

import pytest
import torch
import triton
from helpers import DEVICE, FLOAT_DTYPES, poisoned, random_signs_input

from bnnops import kernels
from bnnops.ops.reference import grad_input_reference, w1a1_reference, w1a16_reference
from bnnops.packing import pack_signs_reference, unpack_bits

configs = kernels.load("gemm_configs")

if DEVICE == "cuda":
    # (M, N, K): M = 1 and sizes not multiples of any block or of 32, large enough for several
    # tiles of the shape table's blocks in every dimension, for the GEMV (M = 1), small-batch
    # (M <= 16) and large-batch configs. Each extra config is a native compile (about a second),
    # so only the table runs; and no N, K or ceil(K/32) is a multiple of 16 (Triton compiles
    # those separately), so the shapes of one kind share one compiled variant.
    SHAPES = [(1, 200, 970), (20, 150, 333), (130, 300, 700)]
    # These shapes make few output tiles, so the table splits K at M > 16: the large-batch layout
    # unsplit (what 8192^3 runs) gets a config of its own.
    UNSPLIT = triton.Config(
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=64, GROUP_M=8, SWAP_AB=False, SPLIT_K=1), num_warps=8, num_stages=2
    )
    SPLIT = configs.with_kwargs(UNSPLIT, SPLIT_K=3)
    CONFIGS, CONFIG_IDS = [None, UNSPLIT], ["table", "unsplit"]
else:
    # The interpreter is slow: small sizes, plus small blocks that make several tiles in M, N and
    # K, with the batch as the dot's M operand and (SWAP_AB, the small-batch layout) as its N;
    # split-K sums parts of K in separate programs, then a second kernel adds them up.
    SHAPES = [(1, 33, 70), (37, 45, 100), (20, 70, 33)]
    # "split": the large-batch layout split over K (what the table picks when there are few
    # output tiles); 3 shares of these K's 1 or 2 steps leave one or two shares empty.
    SPLIT = configs.INTERPRETER_CONFIGS["split"]
    CONFIG_IDS = ["table", "small", "swapped-split", "split"]
    CONFIGS = [None] + [configs.INTERPRETER_CONFIGS[name] for name in CONFIG_IDS[1:]]

# Rounding of one value to each dtype (half an ulp, relative).
ROUND = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def every_config_shape_dtype(test):
    """Run a test for each config, shape and float dtype."""
    test = pytest.mark.parametrize("dtype", FLOAT_DTYPES)(test)
    test = pytest.mark.parametrize("M,N,K", SHAPES)(test)
    return pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)(test)


@pytest.fixture(scope="module")
def gemm():
    return kernels.load("gemm")


def weight_words(N, K, device, garbage_padding=True):
    """Packed random signs (N, ceil(K/32)); by default with ones in the padding bits, which the
    format says are 0: the kernels mask k >= K, so they must not change any result."""
    words = pack_signs_reference(torch.randn(N, K))
    if garbage_padding and K % 32:
        words[:, -1] |= torch.tensor(-(1 << (K % 32)), dtype=torch.int32)
    return words.to(device)


def channel_vectors(N, device, with_scale, with_bias):
    scale = torch.rand(N, device=device) + 0.5 if with_scale else None
    bias = torch.randn(N, device=device) if with_bias else None
    return scale, bias


def assert_close_dot(y, ref, abs_sum):
    """y (any dtype) against the fp32 reference ref of a dot product.

    Both accumulate in fp32 in different orders, and fp32 activations enter the tensor cores as
    two TF32 terms, each product exact to about 2^-20 |x|: together at most 2^-18 * sum |x_k| (with
    abs_sum = sum_k |x_k| times |scale|). Then y is rounded once to its dtype: half an ulp of |ref|.
    """
    bound = ROUND[y.dtype] * ref.abs() + 2.0**-18 * abs_sum + 1e-30
    err = (y.float().cpu() - ref.float().cpu()).abs()
    assert torch.isfinite(y).all()
    worst = err.argmax()
    assert (err <= bound.cpu()).all(), f"error {err.flatten()[worst]} > bound {bound.flatten()[worst]}"


@every_config_shape_dtype
def test_w1a1_float_input(gemm, device, config, M, N, K, dtype):
    # Binarized in the kernel: exact integer results, in fp32 and in the activation dtype.
    x = random_signs_input((M, K), dtype, device)
    words = weight_words(N, K, device)
    scale, bias = channel_vectors(N, device, with_scale=SHAPES[1] == (M, N, K), with_bias=SHAPES[0] != (M, N, K))
    out = poisoned((M, N), dtype, device)
    y = gemm.w1a1(x, words, K, scale=scale, bias=bias, out_dtype=dtype, out=out, config=config, prepack=False)
    assert y is out
    ref = w1a1_reference(x.cpu(), words.cpu(), K, _cpu(scale), _cpu(bias), dtype)
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_w1a1_fp8_route(gemm, device, M, N, K, dtype):
    """The fp8 route (the GEMM as a 1x1 convolution on bnnops.kernels.conv2d): the same exact result."""
    x = random_signs_input((M, K), dtype, device)
    words = weight_words(N, K, device)
    scale, bias = channel_vectors(N, device, with_scale=True, with_bias=True)
    out = poisoned((M, N), torch.float32, device)
    assert gemm.w1a1(x, words, K, scale=scale, bias=bias, out=out, route="fp8") is out
    assert torch.equal(out.cpu(), w1a1_reference(x.cpu(), words.cpu(), K, _cpu(scale), _cpu(bias)))
    # Integer sums rounded once to the output dtype, as the reference casts them.
    y = gemm.w1a1(x.t().contiguous().t(), words, K, out_dtype=dtype, route="fp8")
    assert torch.equal(y.cpu(), w1a1_reference(x.cpu(), words.cpu(), K, None, None, dtype))
    with pytest.raises(ValueError, match="takes float x"):
        gemm.w1a1(pack_signs_reference(x.cpu()).to(device), words, K, route="fp8")


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_w1a1_packed_input(gemm, device, M, N, K):
    x = random_signs_input((M, K), torch.float32, device)
    x_words = pack_signs_reference(x.cpu())
    # Random garbage in x's padding bits against W's all-ones garbage: unmasked, their products
    # would not all be +1 (the same garbage on both sides would hide a missing mask).
    garbage = torch.randint(-(2**31), 2**31, (M,), dtype=torch.int64).to(torch.int32)
    x_words[:, -1] |= garbage & torch.tensor(-(1 << (K % 32)), dtype=torch.int32)
    words = weight_words(N, K, device)
    ref = w1a1_reference(x.cpu(), words.cpu(), K)
    for config in CONFIGS:
        out = poisoned((M, N), torch.float32, device)
        assert torch.equal(gemm.w1a1(x_words.to(device), words, K, out=out, config=config).cpu(), ref)
    # Float input packed first by the pack kernel (what large shapes do), then the packed path.
    assert torch.equal(gemm.w1a1(x, words, K, prepack=True).cpu(), ref)


def test_w1a1_exact_at_large_k(gemm, device):
    # Integer results up to K must come out exact: all-minus x against all-plus rows gives -K.
    K = 970
    x = -torch.ones(2, K, device=device)
    words = weight_words(3, K, device, garbage_padding=False)
    words[0] = 0  # an all +1 row
    y = gemm.w1a1(x, words, K)
    assert y[:, 0].tolist() == [-K, -K]
    assert torch.equal(y.cpu(), w1a1_reference(x.cpu(), words.cpu(), K))


@every_config_shape_dtype
def test_w1a16(gemm, device, config, M, N, K, dtype):
    x = random_signs_input((M, K), dtype, device, finite=True)
    words = weight_words(N, K, device)
    scale, bias = channel_vectors(N, device, with_scale=SHAPES[2] != (M, N, K), with_bias=SHAPES[0] != (M, N, K))
    out = poisoned((M, N), dtype, device)
    y = gemm.w1a16(x, words, scale=scale, bias=bias, out=out, config=config)
    assert y is out and y.dtype == dtype
    ref = w1a16_reference(x.cpu().float(), words.cpu(), _cpu(scale), _cpu(bias))
    abs_sum = x.cpu().float().abs().sum(1, keepdim=True) * (scale.cpu().abs() if scale is not None else 1)
    assert_close_dot(y, ref, abs_sum)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M,block_n", [(2, 128), (3, 32), (5, 16)])
def test_w1a16_gemv_batches(gemm, device, dtype, M, block_n):
    # The CUDA-core kernel with several x rows (M = 1 runs it in test_w1a16; the table uses it up
    # to GEMV_M, the sweep tries it further), BLOCK_M > M, over several steps of K (K = 333 is
    # 11 words, two steps) in one program and split (3 shares of 1 step: one share is empty).
    N, K = 150, 333
    x = random_signs_input((M, K), dtype, device, finite=True)
    words = weight_words(N, K, device)
    scale, bias = channel_vectors(N, device, with_scale=True, with_bias=True)
    ref = w1a16_reference(x.cpu().float(), words.cpu(), scale.cpu(), bias.cpu())
    abs_sum = x.cpu().float().abs().sum(1, keepdim=True) * scale.cpu().abs()
    for split in (1, 3):
        config = configs.with_kwargs(configs.gemv_config(M, N, K, 132, block_n), SPLIT_K=split)
        assert configs.is_gemv(config)
        out = poisoned((M, N), dtype, device)
        assert_close_dot(gemm.w1a16(x, words, scale=scale, bias=bias, out=out, config=config), ref, abs_sum)


def split_of(x_mode, trans_w, M, N, K):
    """The table's SPLIT_K for bf16 x, chosen for a CPU tensor (the SM90 table, 132 SMs)."""
    config = configs.default_config(x_mode, trans_w, M, N, K, torch.bfloat16, torch.device("cpu"))
    return config.kwargs["SPLIT_K"]


def test_default_config_splits_k_when_output_tiles_leave_sms_idle():
    cpu = torch.device("cpu")
    X_PACKED, X_REAL = configs.X_PACKED, configs.X_REAL
    # BinaryNet's 8192 -> 1024 linear at batch 256, x packed first: 8 tiles of 128 x 256 for 132 SMs.
    config = configs.default_config(X_PACKED, False, 256, 1024, 8192, torch.bfloat16, cpu)
    assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["SPLIT_K"]) == (128, 256, 8)
    # Enough tiles (8192^3: 2048; grad_input at batch 256 into 8192 inputs: 128): no split.
    assert split_of(X_PACKED, False, 8192, 8192, 8192) == 1
    assert split_of(X_REAL, True, 256, 8192, 1024) == 1
    # The boundary: 66 tiles (half of 132 SMs) split in two, 67 do not; never a second wave.
    assert split_of(X_PACKED, False, 128 * 66, 256, 8192) == 2
    assert split_of(X_PACKED, False, 128 * 67, 256, 8192) == 1
    for tiles in (1, 8, 32, 40, 66):
        split = split_of(X_PACKED, False, 128 * tiles, 256, 8192)
        assert split >= 2 and tiles * split <= 132, (tiles, split)
    # The same rule from the SM count alone.
    assert configs.pick_config(X_PACKED, False, 256, 1024, 8192, torch.bfloat16, 132) == config


def test_every_table_has_a_config_for_every_call():
    # Every (layout, role) the rules can reach, in every architecture's table and the fallback.
    roles = [(configs.X_REAL, False), (configs.X_REAL, True), (configs.X_SIGN, False), (configs.X_PACKED, False)]
    for table in [*configs.TABLES.values(), configs.DEFAULT_TABLE]:
        for (x_mode, trans_w), dtype, M in itertools.product(roles, FLOAT_DTYPES, (1, 16, 17)):
            config = configs.pick_config(x_mode, trans_w, M, 100, 100, dtype, 132, table)
            assert configs.is_gemv(config) == (x_mode == configs.X_REAL and not trans_w and M <= configs.GEMV_M)


@pytest.mark.parametrize("mode", ["w1a1-packed", "w1a1", "w1a16", "grad_input"])
def test_split_k_shares_of_several_steps(gemm, device, mode):
    # K = 300 in 64-wide steps is 5 steps: 3 shares of 2, 2 and 1 (one not starting at 0, the last
    # owning the padded step), in the large-batch layout.
    M, N, K = 20, 40, 300
    config = SPLIT
    x = random_signs_input((M, K if mode != "grad_input" else N), torch.bfloat16, device, finite=True)
    words = weight_words(N, K, device)
    if mode == "w1a1-packed":
        y = gemm.w1a1(pack_signs_reference(x.cpu()).to(device), words, K, config=config)
        assert torch.equal(y.cpu(), w1a1_reference(x.cpu(), words.cpu(), K))
    elif mode == "w1a1":
        y = gemm.w1a1(x, words, K, config=config, prepack=False)
        assert torch.equal(y.cpu(), w1a1_reference(x.cpu(), words.cpu(), K))
    elif mode == "w1a16":
        y = gemm.w1a16(x, words, config=config)
        assert_close_dot(y, w1a16_reference(x.cpu().float(), words.cpu()), x.cpu().float().abs().sum(1, keepdim=True))
    else:
        y = gemm.grad_input(x, words, K, config=config)
        assert_close_dot(
            y, grad_input_reference(x.cpu().float(), words.cpu(), K), x.cpu().float().abs().sum(1, keepdim=True)
        )


def test_default_config_splits_k_without_empty_shares():
    cpu = torch.device("cpu")
    # The GEMV up to GEMV_M: 8192 = 32 steps of 8 words; 64 programs of 128 rows want 9 shares for
    # four programs per SM on 132 SMs, which would leave the ninth empty: 8 shares of 4 steps.
    for M in range(1, configs.GEMV_M + 1):
        config = configs.default_config(configs.X_REAL, False, M, 8192, 8192, torch.bfloat16, cpu)
        assert configs.is_gemv(config)
        assert config.kwargs == dict(BLOCK_M=1 << (M - 1).bit_length(), BLOCK_N=128, SPLIT_K=8)
        assert (config.num_warps, config.num_stages) == (4, 1)
    for M, N, K in [
        (1, 4096, 11008),
        (1, 100, 70),
        (16, 8192, 8192),
        (16, 512, 8000),
        (5, 8192, 300),
        (256, 1024, 8192),
        (128, 8192, 8192),
        (100, 50, 7000),
    ]:
        config = configs.default_config(configs.X_REAL, False, M, N, K, torch.bfloat16, cpu)
        block = config.kwargs
        steps = -(-K // (32 * configs.GEMV_LANES.value)) if configs.is_gemv(config) else -(-K // block["BLOCK_R"])
        share = -(-steps // block["SPLIT_K"])
        assert 1 <= block["SPLIT_K"] <= steps and (block["SPLIT_K"] - 1) * share < steps, (M, N, K, config)


@every_config_shape_dtype
def test_grad_input(gemm, device, config, M, N, K, dtype):
    g = random_signs_input((M, N), dtype, device, finite=True)
    words = weight_words(N, K, device)
    out = poisoned((M, K), dtype, device)
    y = gemm.grad_input(g, words, K, out=out, config=config)
    assert y is out and y.dtype == dtype
    ref = grad_input_reference(g.cpu().float(), words.cpu(), K)
    assert_close_dot(y, ref, g.cpu().float().abs().sum(1, keepdim=True))


def test_non_contiguous_inputs(gemm, device):
    K, N = 70, 40
    x = torch.randn(K, 9, device=device).t()  # (9, 70) with strides (1, 9)
    words = weight_words(N, K, device)
    assert torch.equal(gemm.w1a1(x, words, K, prepack=False).cpu(), w1a1_reference(x.cpu(), words.cpu(), K))
    y = gemm.w1a16(x, words)
    assert_close_dot(y, w1a16_reference(x.cpu(), words.cpu()), x.cpu().abs().sum(1, keepdim=True))
    g = torch.randn(N, 9, device=device).t()
    assert_close_dot(
        gemm.grad_input(g, words, K), grad_input_reference(g.cpu(), words.cpu(), K), g.cpu().abs().sum(1, keepdim=True)
    )


def test_empty(gemm, device):
    words = weight_words(5, 40, device)
    assert gemm.w1a1(torch.randn(0, 40, device=device), words, 40).shape == (0, 5)
    assert gemm.w1a16(torch.randn(0, 40, device=device), words).shape == (0, 5)
    # K = 0: an empty dot is 0, and the epilogue still applies.
    bias = torch.randn(5, device=device)
    y = gemm.w1a16(torch.randn(3, 0, device=device), torch.zeros(5, 0, dtype=torch.int32, device=device), bias=bias)
    assert torch.equal(y, bias.expand(3, 5))


def _cpu(t):
    return t.cpu() if t is not None else None


def test_cached_launch_plans_follow_every_change_of_signature(gemm, device):
    """The launch plan is cached per call signature: calls that alternate shapes, dtypes, strides,
    scale / bias, x's mode and masks each get their own plan and the reference's values (W1A1
    exact; real products within the dot bound), and a plan is reused when it repeats."""
    gemm._default_plan.cache_clear()
    K, N = 70, 40
    words = weight_words(N, K, device)
    scale, bias = channel_vectors(N, device, True, True)
    calls = []
    for M, dtype, transposed, epilogue in itertools.product((1, 20), FLOAT_DTYPES[:2], (False, True), (False, True)):
        x = random_signs_input((K, M) if transposed else (M, K), dtype, device, finite=True)
        x = x.t() if transposed else x
        calls.append((x, scale if epilogue else None, bias if epilogue else None))
    for _ in range(2):  # the second pass reuses the plans the first made
        for x, s, b in calls:
            cpu = (_cpu(s), _cpu(b))
            ref = w1a1_reference(x.cpu(), words.cpu(), K, *cpu)  # fp32, exact sums
            assert torch.equal(gemm.w1a1(x, words, K, scale=s, bias=b, prepack=False).cpu(), ref)
            packed = pack_signs_reference(x.cpu()).to(device)
            assert torch.equal(gemm.w1a1(packed, words, K, scale=s, bias=b).cpu(), ref)
            real = w1a16_reference(x.cpu(), words.cpu(), *cpu, out_dtype=torch.float32)
            scaled = x.cpu().float().abs().sum(1, keepdim=True) * (s.abs().cpu() if s is not None else 1)
            assert_close_dot(gemm.w1a16(x, words, scale=s, bias=b), real, scaled)
            g = random_signs_input((x.shape[0], N), x.dtype, device, finite=True)
            mask = pack_signs_reference(torch.randn(x.shape[0], K)).to(device)
            passes = unpack_bits(mask.cpu(), K)
            expected = grad_input_reference(g.cpu().float(), words.cpu(), K)
            masked = gemm.grad_input(g, words, K, mask_words=mask).cpu()
            assert (masked[~passes] == 0).all()
            passed = masked.where(passes, expected.to(masked.dtype))  # blocked positions compared above
            assert_close_dot(passed, expected, g.cpu().float().abs().sum(1, keepdim=True))
    info = gemm._default_plan.cache_info()
    assert info.hits >= info.misses > 0
