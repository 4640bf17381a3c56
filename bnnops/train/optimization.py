"""The optimizer of a training run, its rate schedule, and each binary layer's flip count."""

from typing import Any

import torch
from torch import nn

from bnnops.optim import BinaryAndReal, Bop, Bop2ndOrder, split_parameters
from bnnops.summary import is_binary_weight
from bnnops.train.config import OPTIMIZERS, TrainConfig

__all__ = ["Optimization", "binary_weights"]


def binary_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(qualified name, parameter) of every binary weight of ``model``: packed, or latent with a
    weight quantizer (:func:`bnnops.summary.is_binary_weight`)."""
    return [
        (f"{name}.{pname}" if name else pname, p)
        for name, module in model.named_modules()
        for pname, p in module.named_parameters(recurse=False)
        if is_binary_weight(module, pname, p)
    ]


class Optimization:
    """The optimizer of a run (``cfg.optimizer``), its rate schedule, and per-layer flip counting.

    - ``bop`` / ``bop2``: Bop (or Bop2ndOrder) on the BinaryTensor weights, Adam(``cfg.adam_lr``,
      eps ``cfg.adam_eps``) on the rest, as one :class:`bnnops.optim.BinaryAndReal`; the schedule
      decays Bop's gamma.
    - ``latent-adam``: Adam(``cfg.adam_lr``, eps ``cfg.adam_eps``) on every trainable parameter;
      after each step the latent binary weights are clipped to [-1, 1] (larq's ``weight_clip``);
      the schedule decays Adam's lr.

    The schedule multiplies the rate by ``cfg.decay`` every ``cfg.decay_every`` epochs.

    Raises:
        ValueError for an unknown optimizer, or Bop on a model without BinaryTensor weights.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.weights = binary_weights(model)
        if cfg.optimizer in ("bop", "bop2"):
            binary, real = split_parameters(model)
            if not binary:
                raise ValueError(f"{cfg.model} has no BinaryTensor weights for Bop to train")
            bop = (
                Bop(binary, lr=cfg.gamma, threshold=cfg.threshold)
                if cfg.optimizer == "bop"
                else Bop2ndOrder(binary, lr=cfg.gamma, threshold=cfg.threshold, sigma=cfg.sigma)
            )
            self.optimizer = BinaryAndReal(bop, torch.optim.Adam(real, lr=cfg.adam_lr, eps=cfg.adam_eps))
            decayed = bop
        elif cfg.optimizer == "latent-adam":
            self.optimizer = decayed = torch.optim.Adam(
                [p for p in model.parameters() if p.requires_grad], lr=cfg.adam_lr, eps=cfg.adam_eps
            )
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        step = cfg.decay_every if cfg.decay_every > 0 else 1 << 30
        self.scheduler = torch.optim.lr_scheduler.StepLR(decayed, step, cfg.decay)
        self.flips = {name: torch.zeros((), dtype=torch.int64, device=p.device) for name, p in self.weights}
        self.steps = 0

    @property
    def rate(self) -> float:
        """The binary weights' current rate: Bop's gamma or latent-adam's lr."""
        return self.scheduler.get_last_lr()[0]

    def step(self) -> None:
        """One optimizer step (gradients already computed), then count each layer's sign flips."""
        latent = self.cfg.optimizer == "latent-adam"
        if latent:
            signs = [p.detach() < 0 for _, p in self.weights]
        self.optimizer.step()
        with torch.no_grad():
            for i, (name, p) in enumerate(self.weights):
                if latent:
                    p.clamp_(-1.0, 1.0)  # larq's weight_clip on latent weights
                    self.flips[name] += ((p < 0) != signs[i]).sum()
                else:
                    self.flips[name] += self.optimizer.binary.state[p]["flips"]
        self.steps += 1

    def end_epoch(self) -> dict[str, float]:
        """Per layer (name without ``.weight``) the epoch's flip ratio, flips / weights / steps;
        then reset the counts and step the schedule."""
        ratios = {
            name.removesuffix(".weight"): self.flips[name].item() / (p.numel() * max(self.steps, 1))
            for name, p in self.weights
        }
        for t in self.flips.values():
            t.zero_()
        self.steps = 0
        self.scheduler.step()
        return ratios

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
