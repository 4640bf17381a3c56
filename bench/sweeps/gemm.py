"""Block-config sweep of the binary GEMM kernels (GPU): the table's config, a few candidates and the
public op, timed per shape.

    python -m bench.sweeps.gemm                                  # the benchmark shapes, under 40 s
    python -m bench.sweeps.gemm --case w1a16 --batch 1 2 4 8 16  # W1A16 at those M, N = K = 8192

About 12 compiles (1 to 4 s each on an H100 host) plus about 0.2 s of timing each for the default
shapes. Each row: median us, TOPS, GB/s of packed weight, and the config (``*``: the table's
choice; "op" rows time ``torch.ops.bnnops.*`` itself). Batches up to SMALL_M are timed as CUDA
graph replays (:func:`graph_replay`: GPU time only, split-K's second kernel included), larger ones
eagerly (host cost included, op dispatch in the "op" rows).

Importing this module needs neither a GPU nor Triton (``bench/cases/gemm.py`` imports
:func:`graph_replay`); :func:`sweep` loads the kernels.
"""

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from bnnops import kernels

if TYPE_CHECKING:
    import triton

# (name, M, N, K): the benchmark's shapes (bench/cases/gemm.py).
DEFAULT_SHAPES = [
    ("w1a16", 1, 8192, 8192),
    ("w1a16", 16, 8192, 8192),
    ("w1a16", 128, 8192, 8192),
    ("w1a1-packed", 8192, 8192, 8192),
    ("w1a1", 8192, 8192, 8192),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OP = "op"


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """One call of fn captured in a CUDA graph, returned as the graph's replay: fn's GPU work without
    the host's launch cost (how a latency-bound caller runs small batches). fn runs once first, so
    compiling and allocating happen outside the capture."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _describe(config) -> str:
    """A config as one dict of its kwargs and launch options (the sweep files' format)."""
    return str(dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages))


def _same(a, b) -> bool:
    return (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)


def _candidates(table, name, M, N, K, default, sms):
    """The configs tried besides the table's, and whether the op is timed too.

    What the table does not decide from measurements yet (docs/design.md, "Untimed"): where the
    GEMV stops beating the tensor-core small-batch layout, the GEMV's split and rows per program,
    and the large W1A16 config at M = 128.
    """
    import triton

    if name == "w1a16" and M <= table.SMALL_M:
        # The GEMV at 256 // BLOCK_M and 128 // BLOCK_M rows a program, within 16..128 (its
        # registers grow with BLOCK_M * BLOCK_N), the first with its split halved and doubled;
        # then the tensor-core small-batch layout.
        bm = triton.next_power_of_2(M)
        gemv = [table.gemv_config(M, N, K, sms, rows) for rows in (256 // bm, 128 // bm) if 16 <= rows <= 128]
        split = gemv[0].kwargs["SPLIT_K"]
        gemv += [
            table.with_kwargs(gemv[0], SPLIT_K=max(split // 2, 1)),
            table.with_kwargs(gemv[0], SPLIT_K=2 * split),
        ]
        small_batch = triton.Config(
            dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=256, GROUP_M=1, SWAP_AB=True, SPLIT_K=3), num_warps=4, num_stages=4
        )
        return [c for c in gemv + [small_batch] if not _same(c, default)], True
    if name == "w1a16":
        large = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_R=128, GROUP_M=8, SWAP_AB=False, SPLIT_K=1)
        return [triton.Config(large, num_warps=8, num_stages=3)], True
    if name == "w1a1-packed":
        large = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_R=128, GROUP_M=8, SWAP_AB=False, SPLIT_K=1)
        return [triton.Config(large, num_warps=8, num_stages=4)], False
    return [], True


def _runner(gemm, x_mode, x, words, K, dtype, config):
    """What one row times: the public op (config OP, the table's config) or the launcher with config."""
    if config is OP and x_mode == gemm.X_REAL:
        return lambda: torch.ops.bnnops.binary_linear_w1a16(x, words, None, None)
    if config is OP:
        return lambda: torch.ops.bnnops.binary_linear_w1a1(x, words, K, None, None, dtype)
    if x_mode == gemm.X_REAL:
        return lambda: gemm.w1a16(x, words, config=config)
    return lambda: gemm.w1a1(x, words, K, out_dtype=dtype, config=config)


def sweep(
    shapes: Sequence[tuple[str, int, int, int]] | None = None,
    configs: Sequence["triton.Config"] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Time the table's config and a few others per case on the GPU; print median us and rates.

    Args:
        shapes: (name, M, N, K) cases, name one of "w1a1" (the public call with float x: large x is
            packed first; only the op and ``configs`` are timed), "w1a1-packed" (x given packed),
            "w1a16"; default :data:`DEFAULT_SHAPES`.
        configs: extra ``triton.Config`` block configs (see ``bnnops.kernels.gemm_configs``) to try
            in every case.
        dtype: the activations' dtype.
    """
    import triton
    from triton.testing import do_bench

    gemm = kernels.load("gemm")
    table = kernels.load("gemm_configs")
    pack_signs = kernels.load("pack").pack_signs

    sms = torch.cuda.get_device_properties().multi_processor_count
    for name, M, N, K in shapes or DEFAULT_SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        # do_bench flushes L2 before every call, so the weight is read from HBM each time.
        words = torch.randint(-(2**31), 2**31, (N, triton.cdiv(K, 32)), device="cuda", dtype=torch.int64).to(
            torch.int32
        )
        x_mode = {"w1a1": gemm.X_SIGN, "w1a1-packed": gemm.X_PACKED, "w1a16": gemm.X_REAL}[name]
        if x_mode == gemm.X_PACKED:
            x = pack_signs(x)
        default = table.default_config(x_mode, False, M, N, K, x.dtype, x.device)
        others, with_op = _candidates(table, name, M, N, K, default, sms)
        tried = ([default] if x_mode != gemm.X_SIGN else []) + others + ([OP] if with_op else [])
        for config in tried + list(configs or []):
            call = _runner(gemm, x_mode, x, words, K, dtype, config)
            what = "torch.ops.bnnops (the table's config)" if config is OP else _describe(config)
            try:
                # Small batches as graph replays: eagerly the host's launch cost (tens of us) hides the kernel.
                small = M <= table.SMALL_M
                ms = do_bench(graph_replay(call) if small else call, warmup=10, rep=40, return_mode="median")
            except Exception as e:  # a config that does not fit (shared memory, registers) is skipped
                print(f"{name} M={M} N={N} K={K}: {what} failed: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            tops, weight_gbs = 2 * M * N * K / ms / 1e9, words.numel() * 4 / ms / 1e6
            print(
                f"{'*' if config is default else ' '} {name:11s} M={M:5d} N={N} K={K}: {ms * 1e3:9.1f} us "
                f"{tops:7.1f} TOPS {weight_gbs:7.1f} GB/s of packed W  {what}",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Block-config sweep of the binary GEMM kernels (GPU).")
    parser.add_argument(
        "--case",
        nargs="+",
        choices=["w1a1", "w1a1-packed", "w1a16"],
        help="only these cases (default: every case of the default shapes; with --batch: w1a16)",
    )
    parser.add_argument("--batch", nargs="+", type=int, metavar="M", help="these batch sizes at N = --n, K = --k")
    parser.add_argument("--n", type=int, default=8192, help="N (output features) with --batch; default 8192")
    parser.add_argument("--k", type=int, default=8192, help="K (input features) with --batch; default 8192")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the activations' dtype")
    args = parser.parse_args(argv)
    if args.batch:
        shapes = [(name, m, args.n, args.k) for name in args.case or ["w1a16"] for m in args.batch]
    else:
        shapes = [shape for shape in DEFAULT_SHAPES if args.case is None or shape[0] in args.case]
    sweep(shapes, dtype=DTYPES[args.dtype])


if __name__ == "__main__":
    main()
