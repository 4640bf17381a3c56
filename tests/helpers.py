"""Helpers shared by the tests: the device, dtypes, poisoned buffers, random sign inputs, and
checks that several layer tests make. ``conftest.py`` sets TRITON_INTERPRET before this is imported."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# An int32 value that no correct packed word is likely to equal on random data.
WORD_POISON = 0x5EADBEEF


def poisoned(shape, dtype, device):
    """An output buffer whose unwritten elements show: NaN for floats, WORD_POISON for ints."""
    fill = float("nan") if dtype.is_floating_point else WORD_POISON
    return torch.full(shape, fill, dtype=dtype, device=device)


def random_signs_input(shape, dtype, device, generator=None, finite=False):
    """Random normal values plus the hard cases of a sign: +-0, tiny magnitudes, +-inf (unless finite)."""
    x = torch.randn(shape, generator=generator).to(dtype)
    flat = x.view(-1)
    specials = [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7] + ([] if finite else [float("inf"), float("-inf")])
    specials = torch.tensor(specials).to(dtype)
    n = min(flat.numel(), specials.numel())
    if n:
        idx = torch.randperm(flat.numel(), generator=generator)[:n]
        flat[idx] = specials[:n]
    return x.to(device)


def check_inference_runs_the_op_alone(monkeypatch, layer, x, autograd_function):
    """With nothing to differentiate (no_grad, or no parameter requiring grad) ``layer`` must call
    its op without ``autograd_function`` and give the output of the tracked call."""
    tracked = layer(x)

    def no_autograd_function(*args):
        raise AssertionError("the autograd function ran with nothing to differentiate")

    monkeypatch.setattr(autograd_function, "apply", no_autograd_function)
    with torch.no_grad():
        untracked = layer(x)
    layer.requires_grad_(False)
    frozen = layer(x)
    assert tracked.grad_fn is not None and untracked.grad_fn is None and frozen.grad_fn is None
    assert torch.equal(untracked, tracked.detach()) and torch.equal(frozen, untracked)


def check_learnable_scale_output_without_grad(call, scale):
    """A learnable ``scale`` is applied outside the op (to the op's fp32 product); under
    no_grad the output must be the same, bit for bit (checkpointing recomputes one with the other)."""
    assert scale.requires_grad
    tracked = call()
    with torch.no_grad():
        untracked = call()
    assert tracked.grad_fn is not None and untracked.grad_fn is None
    assert torch.equal(untracked, tracked.detach())


def randomize_batch_norms(model, generator):
    """``model`` in eval mode with every batch norm's eval statistics and affine parameters drawn at
    random (negative scales included), so a converted or folded model's output depends on every channel."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator))
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=generator))
                m.bias.copy_(torch.randn(m.num_features, generator=generator))
    return model.eval()
