"""A training step captured as one CUDA graph: warm-up on a side stream, capture, replay.

What ``torch.cuda.graph`` asks of a whole training step (forward, loss, backward, optimizer step),
in one place for the benchmark cases and the report: the step reads its inputs from static
buffers (tensors it closes over, which the caller refills in place), every optimizer is
capturable (``torch.optim.Adam(capturable=True)``, ``bnnops.optim.Bop(capturable=True)``), the
warm-up runs before capture (Triton compiles its kernels and the optimizers create their state
there), and the gradients are set to None before capture, so that the captured backward writes
them afresh (a replay then overwrites them, it does not accumulate).
"""

from collections.abc import Callable

import torch

__all__ = ["capture_step"]


def capture_step(
    zero_grad: Callable[[], None], body: Callable[[], torch.Tensor], device: str | torch.device, warmup: int = 3
) -> Callable[[], torch.Tensor]:
    """Capture ``body`` (forward, loss, backward, optimizer step; returns the loss) as a CUDA graph.

    Args:
        zero_grad: sets every gradient to None (``optimizer.zero_grad(set_to_none=True)``); runs
            before each warm-up step and once before capture, never inside the graph.
        body: one step on static buffers; its returned tensor is the graph's output.
        device: where the step runs; must be a CUDA device.
        warmup: eager steps on a side stream before capture (at least 1: the first creates the
            optimizers' state, which a capture cannot hold).

    Returns:
        A zero-argument replay: runs the captured step again and returns the captured loss tensor
        (overwritten by the next replay; no sync). Its ``graph`` attribute is the CUDAGraph.

    Raises:
        ValueError: ``device`` is not CUDA (CUDA graphs record CUDA kernels: not applicable on a
            CPU), or ``warmup`` < 1.
    """
    if torch.device(device).type != "cuda":
        raise ValueError(f"CUDA graphs record CUDA kernels: not applicable on {device}")
    if warmup < 1:
        raise ValueError(f"capture_step needs warmup >= 1 (the first step creates the optimizer state), got {warmup}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            zero_grad()
            body()
    torch.cuda.current_stream().wait_stream(side)
    zero_grad()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = body()

    def replay() -> torch.Tensor:
        graph.replay()
        return loss

    replay.graph = graph
    return replay
