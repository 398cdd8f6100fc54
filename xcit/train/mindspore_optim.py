"""Optimisers whose MindSpore / MindCV formula is not one of torch's or timm's (used by :mod:`xcit.train.optim`).

Both keep torch's state layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter), so checkpoints resume.
"""

from __future__ import annotations

import math

import torch


class MindSporeAdam(torch.optim.Adam):
    """``mindspore.nn.Adam``: ``w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``, eps added before the bias
    correction of v. That is torch's Adam with ``eps / sqrt(1 - b2^t)`` at step t, which this sets before each step
    (so torch's fused and foreach kernels still run). Weight decay is an L2 gradient term, as in MindSpore."""

    def step(self, closure=None):
        for g in self.param_groups:
            g.setdefault("base_eps", g["eps"])
            t = next((float(self.state[p]["step"]) for p in g["params"] if p in self.state), 0.0) + 1
            g["eps"] = g["base_eps"] / math.sqrt(1 - g["betas"][1] ** t)
        return super().step(closure)


class MindCVNAdam(torch.optim.Optimizer):
    """``mindcv/optim/nadam.py`` as MindCV's train.py runs it: Dozat's NAdam (torch's NAdam formula, L2 weight
    decay), where the momentum schedule ``mu_t = b1 (1 - 0.5 x 0.96^(t x schedule_decay))`` reads the optimiser's
    step counter after the per-step lr lookup has advanced it: update t (from 1) uses ``mu_{t+1}`` and ``mu_{t+2}``,
    while v's bias correction uses t."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 schedule_decay: float = 4e-3) -> None:  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, schedule_decay=schedule_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            (b1, b2), lr, sd = g["betas"], g["lr"], g["schedule_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                s = self.state[p]
                if not s:
                    s.update(step=0, mu_product=1.0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                s["step"] += 1
                t = s["step"]
                grad = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                mu, mu_next = (b1 * (1 - 0.5 * 0.96 ** ((t + k) * sd)) for k in (1, 2))
                s["mu_product"] *= mu
                s["exp_avg"].lerp_(grad, 1 - b1)
                s["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (s["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(g["eps"])
                p.addcdiv_(grad, denom, value=-lr * (1 - mu) / (1 - s["mu_product"]))
                p.addcdiv_(s["exp_avg"], denom, value=-lr * mu_next / (1 - s["mu_product"] * mu_next))
        return loss
