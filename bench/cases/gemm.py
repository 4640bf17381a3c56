"""Cases of the binary GEMM kernels (kernels/gemm.py and its family), timed through the ops a user calls.

- ``gemm_w1a1``: ``torch.ops.bnnops.binary_linear_w1a1`` on bf16 activations (binarized by the op:
  packed first at these sizes, then the packed x packed-W kernel) against ``torch.matmul`` in bf16 on
  the same +-1 values and ``torch._int_mm`` on them as int8. int8-bound: 2*M*N*K ops.
- ``gemm_w1a1_fp8``: the same on the launcher's "fp8" route (the GEMM as a 1x1 convolution, fp8
  e4m3 +-1 operands written by one prepare launch, then a pipelined fp8 wgmma).
- ``gemm_w1a1_packed``: the same with activations already packed (a binary network can keep them
  packed between layers): the kernel alone.
- ``gemm_w1a16``: ``torch.ops.bnnops.binary_linear_w1a16`` (real bf16 activations, packed +-1
  weight) against ``torch.matmul`` in bf16 on the dense +-1 weight. Memory-bound on the packed
  weight at M = 1 and 16 (it is 16x fewer bytes than bf16), bf16-bound at M = 128.

At M <= 16 an eager call spends tens of microseconds on the host (op dispatch, Triton's
launcher, the split-K epilogue's launch) against a few on the GPU, so on CUDA both ours and the
baseline are timed as CUDA graph replays there (:func:`bench.sweeps.gemm.graph_replay`), which is
how a latency-bound user runs them. Larger shapes are timed eagerly. Block-config sweep:
``python -m bench.sweeps.gemm``.
"""

import torch

from bench import Workload, case
from bench.sweeps.gemm import graph_replay
from bnnops import kernels
from bnnops.packing import pack_signs, packed_length

W1A1_CPU = {"M=N=K=512 fp32": dict(M=512, N=512, K=512, dtype=torch.float32)}
W1A1_TINY = dict(M=3, N=5, K=33, dtype=torch.float32)


def _signs(shape, device, dtype):
    """Random +-1 values (from randn: never zeros) as dtype."""
    return torch.where(torch.randn(shape, device=device) < 0, -1.0, 1.0).to(dtype)


def _graphed(fn, device):
    """fn as a CUDA graph replay on CUDA (see the module docstring); fn itself elsewhere."""
    return graph_replay(fn) if torch.device(device).type == "cuda" else fn


def _matmul_name(dtype):
    # The GPU shapes run in bf16, the CPU ones in fp32: name the baseline by what it runs.
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype] + " matmul"


def _w1a1_baselines(xs, ws, device):
    """bf16 matmul on the +-1 values, and int8 _int_mm on them where it runs (CUDA, M > 16)."""
    baselines = {_matmul_name(xs.dtype): lambda: torch.matmul(xs, ws.T)}
    if torch.device(device).type == "cuda" and xs.shape[0] > 16 and xs.shape[1] % 8 == 0 and ws.shape[0] % 8 == 0:
        xi, wi = xs.to(torch.int8), ws.to(torch.int8)
        baselines["int8 _int_mm"] = lambda: torch._int_mm(xi, wi.T)
    return baselines


W1A1_CUDA = {
    "M=N=K=8192 bf16": dict(M=8192, N=8192, K=8192, dtype=torch.bfloat16),
    "M=N=K=4096 bf16": dict(M=4096, N=4096, K=4096, dtype=torch.bfloat16),
}


def gemm_w1a1(device, M, N, K, dtype, route="int8"):
    """Float x binarized by the op; ``route="fp8"`` runs the launcher's fp8 route instead (the
    GEMM as a 1x1 conv with pipelined fp8 wgmma), which the op does not take; on the CPU there
    are no routes: the op's reference."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = _signs((N, K), device, dtype)
    words = pack_signs(w)
    if route == "fp8" and torch.device(device).type == "cuda":
        gemm = kernels.load("gemm")
        ours = lambda: gemm.w1a1(x, words, K, out_dtype=dtype, route="fp8")
    else:
        ours = lambda: torch.ops.bnnops.binary_linear_w1a1(x, words, K, None, None, dtype)
    return Workload(
        ours=ours,
        baselines=_w1a1_baselines(torch.where(x < 0, -1.0, 1.0).to(dtype), w, device),
        bound="int8",
        bytes=M * K * dtype.itemsize + N * packed_length(K) * 4 + M * N * dtype.itemsize,
        ops=2 * M * N * K,
    )


case("gemm_w1a1", cuda=W1A1_CUDA, cpu=W1A1_CPU, tiny=W1A1_TINY)(gemm_w1a1)
case(
    "gemm_w1a1_fp8", cuda={label: dict(p, route="fp8") for label, p in W1A1_CUDA.items()}, cpu=W1A1_CPU, tiny=W1A1_TINY
)(gemm_w1a1)


@case(
    "gemm_w1a1_packed",
    cuda={"M=N=K=8192 packed x, bf16 y": dict(M=8192, N=8192, K=8192, dtype=torch.bfloat16)},
    cpu=W1A1_CPU,
    tiny=W1A1_TINY,
)
def gemm_w1a1_packed(device, M, N, K, dtype):
    xs = _signs((M, K), device, dtype)
    w = _signs((N, K), device, dtype)
    x_words, words = pack_signs(xs), pack_signs(w)
    return Workload(
        ours=lambda: torch.ops.bnnops.binary_linear_w1a1(x_words, words, K, None, None, dtype),
        baselines=_w1a1_baselines(xs, w, device),
        bound="int8",
        bytes=(M + N) * packed_length(K) * 4 + M * N * dtype.itemsize,
        ops=2 * M * N * K,
    )


@case(
    "gemm_w1a16",
    cuda={
        "M=1 N=K=8192 bf16": dict(M=1, N=8192, K=8192, dtype=torch.bfloat16),
        "M=16 N=K=8192 bf16": dict(M=16, N=8192, K=8192, dtype=torch.bfloat16),
        "M=128 N=K=8192 bf16": dict(M=128, N=8192, K=8192, dtype=torch.bfloat16),
    },
    cpu={"M=16 N=K=1024 fp32": dict(M=16, N=1024, K=1024, dtype=torch.float32)},
    tiny=dict(M=1, N=5, K=33, dtype=torch.float32),
)
def gemm_w1a16(device, M, N, K, dtype):
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = _signs((N, K), device, dtype)
    words = pack_signs(w)

    def ours():
        return torch.ops.bnnops.binary_linear_w1a16(x, words, None, None)

    def dense_matmul():
        return torch.matmul(x, w.T)

    small = M <= 16
    return Workload(
        ours=_graphed(ours, device) if small else ours,
        baselines={_matmul_name(x.dtype): _graphed(dense_matmul, device) if small else dense_matmul},
        bound="memory" if small else "bf16",
        bytes=M * K * dtype.itemsize + N * packed_length(K) * 4 + M * N * dtype.itemsize,
        ops=2 * M * N * K,
    )
