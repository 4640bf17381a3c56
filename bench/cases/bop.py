"""Cases of the fused Bop step (``bnnops.kernels.bop``), timed as a user calls it: ``bnnops.optim.Bop.step()``.

Ours: ``Bop.step()`` over ``BinaryTensor`` weights with fp32 gradients and fp32 state, paper
hyperparameters (gamma 1e-4, threshold 1e-8): on CUDA one fused kernel launch for all layers.
Baselines (docs/design.md: an eager PyTorch Bop over dense float weights, and the same compiled), on
the same gradients and the same weights stored as dense fp32 +-1 tensors:

- "eager Bop": ``Bop(fused=False).step()``, bnnops' PyTorch reference: the same rule and the same
  bits, one torch op at a time, tensor by tensor.
- "compiled Bop": that reference (``bnnops.optim.bop_reference_``) per tensor under
  ``torch.compile`` (CUDA only: compiling on CPU takes tens of seconds).

Every call steps again: m keeps moving and weights keep flipping, which is a fair repeated measure.
Fewest bytes per weight: g read (4), m read and written (8), the word read and written (2 x 4 bytes
per 32 weights): 12.25.

do_bench times from a CUDA event after its L2 flush (a 256 MB memset) to one after the step, so
host work shorter than the flush is hidden, longer host work is counted. ``bench/sweeps/bop.py``
separates the two (host cost of ``Bop.step()``, GPU time per block config).
"""

import math

import torch
from torch import nn

from bench import Workload, case
from bnnops import BinaryTensor
from bnnops.optim import Bop, bop_reference_

# Binary ResNet-18 (every conv but the first): 3x3 convs and the 1x1 downsamples, 11.2M weights.
# Their gradients are contiguous (O, C, kh, kw), which the kernel reads with a stride along C.
RESNET18_CONVS = (
    *[(64, 64, 3, 3)] * 4,
    (128, 64, 3, 3),
    *[(128, 128, 3, 3)] * 3,
    (128, 64, 1, 1),
    (256, 128, 3, 3),
    *[(256, 256, 3, 3)] * 3,
    (256, 128, 1, 1),
    (512, 256, 3, 3),
    *[(512, 512, 3, 3)] * 3,
    (512, 256, 1, 1),
)

_COMPILED = {}


def _compiled_reference():
    # Compiled once per process (the setup runs several times per shape).
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(bop_reference_)
    return _COMPILED["step"]


CUDA_SHAPES = {
    "105M: 25 x 2048x2048 fp32": dict(shapes=((2048, 2048),) * 25),
    "10.5M: 10 x 1024x1024 fp32": dict(shapes=((1024, 1024),) * 10),
    "1.07B: 64 x 4096x4096 fp32": dict(shapes=((4096, 4096),) * 64),
    "11.2M: ResNet-18 convs fp32": dict(shapes=RESNET18_CONVS),
}


@case(
    "bop_step",
    cuda=CUDA_SHAPES,
    cpu={
        "1M: 1024x1024 fp32": dict(shapes=((1024, 1024),)),
        "147k: 4 x 64x64x3x3 fp32": dict(shapes=((64, 64, 3, 3),) * 4),
    },
    tiny=dict(shapes=((3, 33), (2, 40, 3, 3))),
)
def bop_step(device: str, shapes: tuple[tuple[int, ...], ...]) -> Workload:
    signs = [torch.where(torch.randn(s, device=device) < 0, -1.0, 1.0) for s in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    binary = [nn.Parameter(BinaryTensor.from_float(w)) for w in signs]
    dense = [nn.Parameter(w) for w in signs]
    for params in (binary, dense):
        for p, g in zip(params, grads):
            p.grad = g
    baselines = {"eager Bop": Bop(dense, fused=False).step}
    if device == "cuda":
        step, ms = _compiled_reference(), [torch.zeros_like(w) for w in signs]
        weights = [p.detach() for p in dense]
        baselines["compiled Bop"] = lambda: [step(w, g, m, 1e-4, 1e-8) for w, g, m in zip(weights, grads, ms)]
    numel = sum(math.prod(s) for s in shapes)
    words = sum(p.words.numel() for p in binary)
    return Workload(
        ours=Bop(binary).step,
        baselines=baselines,
        bound="memory",
        bytes=12 * numel + 2 * 4 * words,
    )
