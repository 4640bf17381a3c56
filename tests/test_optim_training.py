"""Training with Bop: Bop + Adam in one optimizer object, GradScaler, schedulers, a tiny model,
and DDP across two processes."""

import copy
import functools
import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnnops import BinaryTensor
from bnnops.optim import BinaryAndReal, Bop, ThresholdScheduler, split_parameters


class TinyBNN(nn.Module):
    """y = alpha * (x @ w.T) + b with a binary w (read densely: the gradient of w is dense)."""

    def __init__(self, n_in, n_out, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(BinaryTensor.from_float(torch.randn(n_out, n_in, generator=gen)))
        self.alpha = nn.Parameter(torch.full((n_out,), 0.1))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x):
        return self.alpha * (x.unsqueeze(-2) * self.weight).sum(-1) + self.bias


def make(device, fused=None, seed=0, lr=1e-2):
    model = TinyBNN(70, 6, seed).to(device)
    binary, real = split_parameters(model)
    opt = BinaryAndReal(Bop(binary, lr=lr, threshold=1e-6, fused=fused), torch.optim.Adam(real, lr=1e-2))
    return model, opt


def teacher_data(device, n=256, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 70, generator=gen)
    w = torch.where(torch.randn(6, 70, generator=gen) < 0, -1.0, 1.0)
    return x.to(device), (0.3 * x @ w.T + 0.5).to(device)


def test_split_and_claims(device):
    model, opt = make(device)
    binary, real = split_parameters(model)
    assert binary == [model.weight] and real == [model.alpha, model.bias]  # frozen is in neither
    assert split_parameters(list(model.parameters()) * 2) == (binary, real)
    assert opt.param_groups == opt.binary.param_groups + opt.real.param_groups
    with pytest.raises(ValueError, match="claimed by both"):
        BinaryAndReal(Bop([model.weight, model.alpha]), torch.optim.Adam([model.alpha]))
    with pytest.raises(ValueError, match="BinaryTensor"):
        BinaryAndReal(Bop([model.bias]), torch.optim.Adam([model.weight, model.alpha]))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        BinaryAndReal(Bop([model.weight]), object())


@pytest.mark.parametrize("fused", [False, True])
def test_bop_and_adam_lower_the_loss(device, fused):
    model, opt = make(device, fused)
    x, y = teacher_data(device)
    gamma_decay = torch.optim.lr_scheduler.StepLR(opt.binary, step_size=20, gamma=0.5)
    adam_decay = torch.optim.lr_scheduler.ExponentialLR(opt.real, gamma=0.99)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    for step in range(60):
        opt.zero_grad()
        loss = opt.step(functools.partial(_backward, model, x[step % 4 :: 4], y[step % 4 :: 4]))
        gamma_decay.step()
        adam_decay.step()
    end = torch.nn.functional.mse_loss(model(x), y).item()
    assert end < 0.1 * start, (start, end)  # Adam alone (alpha, bias) stays near the teacher variance
    assert opt.binary.param_groups[0]["lr"] == 1e-2 * 0.5**3
    assert opt.real.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.99**60)
    assert loss.item() > 0 and opt.binary.state[model.weight]["flips"].dtype == torch.int64


def _backward(model, x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def test_state_dict_round_trip(device):
    model, opt = make(device)
    x, y = teacher_data(device)
    tau = ThresholdScheduler(opt.binary, lambda t: 2.0**-t)
    for _ in range(3):
        opt.zero_grad()
        _backward(model, x, y)
        opt.step()
        tau.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tau": tau.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = make(device, seed=7)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    tau2 = ThresholdScheduler(opt2.binary, lambda t: 2.0**-t)
    tau2.load_state_dict(saved["tau"])
    for m, o, t in ((model, opt, tau), (model2, opt2, tau2)):
        o.zero_grad()
        _backward(m, x, y)
        o.step()
        t.step()
    assert torch.equal(model.weight.words, model2.weight.words)
    assert torch.equal(model.alpha, model2.alpha) and torch.equal(model.bias, model2.bias)
    assert opt2.binary.param_groups[0]["threshold"] == opt.binary.param_groups[0]["threshold"] == 1e-6 * 2.0**-4
    assert torch.equal(opt.binary.state[model.weight]["m"], opt2.binary.state[model2.weight]["m"])


def test_grad_scaler(device):
    """GradScaler unscales every gradient of both parts and skips the whole step on inf."""
    x, y = teacher_data(device, n=32)
    scaled_model, scaled_opt = make(device, lr=0.5)
    plain_model, plain_opt = copy.deepcopy(scaled_model), None
    binary, real = split_parameters(plain_model)
    plain_opt = BinaryAndReal(Bop(binary, lr=0.5, threshold=1e-6), torch.optim.Adam(real, lr=1e-2))
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)

    # A finite step: the power-of-two scale unscales exactly, so both runs agree bit for bit.
    scaler.scale(torch.nn.functional.mse_loss(scaled_model(x), y)).backward()
    scaler.step(scaled_opt)
    scaler.update()
    _backward(plain_model, x, y)
    plain_opt.step()
    assert plain_opt.binary.state[plain_model.weight]["flips"].item() > 0
    assert torch.equal(scaled_model.weight.words, plain_model.weight.words)
    assert torch.equal(
        scaled_opt.binary.state[scaled_model.weight]["m"], plain_opt.binary.state[plain_model.weight]["m"]
    )
    assert torch.equal(scaled_model.alpha, plain_model.alpha)

    # An inf in one real-valued gradient: neither part steps, the scale backs off.
    scaled_opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(scaled_model(x), y)).backward()
    scaled_model.bias.grad[0] = float("inf")
    words, m = scaled_model.weight.words.clone(), scaled_opt.binary.state[scaled_model.weight]["m"].clone()
    alpha = scaled_model.alpha.detach().clone()
    scaler.step(scaled_opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert torch.equal(scaled_model.weight.words, words) and torch.equal(
        scaled_opt.binary.state[scaled_model.weight]["m"], m
    )
    assert torch.equal(scaled_model.alpha, alpha)


def _ddp_worker(rank, init_file, fused):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = TinyBNN(70, 6, seed=rank)  # different weights on each rank: rank 0's are broadcast
        ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's packed weights
        binary, real = split_parameters(model)
        opt = BinaryAndReal(Bop(binary, lr=0.05, threshold=1e-6, fused=fused), torch.optim.Adam(real, lr=1e-2))
        x, y = teacher_data("cpu", n=64, seed=10 + rank)  # each rank its own data
        start = model.weight.words.clone()
        flips = 0
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            flips += opt.binary.state[model.weight]["flips"].item()
        words = [torch.empty_like(model.weight.words) for _ in range(2)]
        dist.all_gather(words, model.weight.words)
        ms = [torch.empty_like(opt.binary.state[model.weight]["m"]) for _ in range(2)]
        dist.all_gather(ms, opt.binary.state[model.weight]["m"].contiguous())
        assert flips > 0 and not torch.equal(model.weight.words, start)
        assert torch.equal(words[0], words[1]) and torch.equal(ms[0], ms[1])
        # Every rank done communicating before any tears down. Without it, a clean-clone CI run saw
        # rank 1 abort in teardown (SIGABRT, "terminate called without an active exception") about
        # once in three full runs; not reproduced when this test runs alone (0 in 20).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_identical_words(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), None), nprocs=2)
