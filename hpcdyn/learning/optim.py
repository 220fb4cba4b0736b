"""Optimizers: Adam (torch's) by default, AdaBelief (the paper's choice) as an option."""

from __future__ import annotations

import math

import torch

from hpcdyn.learning.names import OPTIMIZERS


class AdaBelief(torch.optim.Optimizer):
    """AdaBelief (Zhuang et al. 2020): Adam with the second moment of (g - m) instead of g.

    The step shrinks where the gradient agrees with its running mean (the "belief") and grows
    where it does not. Bias-corrected, decoupled weight decay.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-16, weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                gradient = parameter.grad
                state = self.state[parameter]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["mean"] = torch.zeros_like(parameter)
                    state["belief"] = torch.zeros_like(parameter)
                state["step"] += 1
                step = float(state["step"])
                mean, belief = state["mean"], state["belief"]
                mean.mul_(beta1).add_(gradient, alpha=1 - beta1)
                surprise = gradient - mean
                belief.mul_(beta2).addcmul_(surprise, surprise, value=1 - beta2).add_(group["eps"])
                if group["weight_decay"]:
                    parameter.mul_(1 - group["lr"] * group["weight_decay"])
                corrected_mean = mean / (1 - beta1**step)
                denominator = (belief / (1 - beta2**step)).sqrt().add_(group["eps"])
                parameter.addcdiv_(corrected_mean, denominator, value=-group["lr"])
        return loss




def make_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "adabelief":
        return AdaBelief(parameters, lr=lr)
    raise ValueError(f"optimizer: must be one of {OPTIMIZERS}, got {name!r}")


def cosine_factor(epoch: int, epochs: int, floor: float = 0.05) -> float:
    """Learning-rate multiplier: cosine from 1 at epoch 0 down to ``floor`` at the last epoch."""
    if epochs <= 1:
        return 1.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / (epochs - 1)))
