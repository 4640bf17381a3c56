"""Block configs of the fused Bop step (``bnnops.kernels.bop``), as ``triton.Config``.

kwargs: ``BLOCK_WORDS``, the 32-element words one program steps (BLOCK_WORDS * 32 elements);
num_warps. num_stages is left at its default: the kernel has no loop to pipeline.

One config for every GPU and for the interpreter: the step is a bandwidth-bound stream with no
shared-memory or tensor-core tile to fit, tuned on the one GPU measured (H100, sm90). 32 words x 4 warps (8 elements per thread) keeps many small programs per SM in flight: 421 us at
105M weights against 488 us with 64 words x 4 warps (H100 run T1422, ``python -m bench.sweeps.bop``;
docs/design.md).
"""

import triton

__all__ = ["DEFAULT_CONFIG", "SWEEP_CONFIGS"]

DEFAULT_CONFIG = triton.Config({"BLOCK_WORDS": 32}, num_warps=4)

# The grid ``python -m bench.sweeps.bop`` times.
SWEEP_CONFIGS = [triton.Config({"BLOCK_WORDS": words}, num_warps=warps) for words in (32, 64, 128) for warps in (4, 8)]
