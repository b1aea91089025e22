"""``torch.optim.SGD``'s update (momentum, weight decay): :class:`SGD` for one client's parameters, and
:func:`masked_sgd_` on stacked per-client tensors, for the active clients only.

:func:`masked_sgd_` is shared by the vectorised paths of the fused ops and by the lockstep engine's optimizers
(``StackedSGD``): one definition of the stacked arithmetic. Buffers start at zero, which equals SGD's first step
(buf = d) exactly. Masking is by per-client factors that are exactly 1 or 0, so active clients get torch's
arithmetic and inactive ones keep their parameters and buffers.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` (no dampening, no Nesterov) with torch's
    arithmetic in torch's order, so the results are equal bit for bit (tests/test_sgd.py); ``param_groups``,
    ``state[p]["momentum_buffer"]``, ``zero_grad`` (to None) and ``step`` behave as torch's.

    Why not ``torch.optim``: creating any of its optimizers imports ``torch._dynamo``, 1.7-3 s in a fresh
    process, and a Flower ClientApp runs every message in a fresh process."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{"lr": lr, "momentum": momentum, "weight_decay": weight_decay, **group,
                              "params": list(group["params"])} for group in groups]
        self.state: dict[torch.Tensor, dict] = defaultdict(dict)

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """p -= lr * buf, buf = momentum * buf + (grad + weight_decay * p) (buf = that sum at the first step)."""
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad if weight_decay == 0 else p.grad.add(p, alpha=weight_decay)
                if momentum != 0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-lr)


@torch.no_grad()
def masked_sgd_(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                active: torch.Tensor, lr: float, momentum: float, weight_decay: float) -> None:
    """In place, per tensor (N, ...): buf = m buf + (g + wd p); p -= lr buf, where ``active`` (N,) holds."""
    on = active.to(params[0].dtype)  # (N,) 1 = active, 0 = inactive
    keep = on.new_full(on.shape, momentum).masked_fill_(~active.bool(), 1.0)
    for p, g, buf in zip(params, grads, bufs):
        shape = (-1, *([1] * (p.dim() - 1)))
        d_p = g.add(p, alpha=weight_decay)  # as torch.optim.SGD: g + wd * p
        buf.mul_(keep.view(shape)).addcmul_(d_p, on.view(shape))  # m * buf + d  (inactive: buf)
        p.addcmul_(buf, (-lr * on).view(shape))  # p - lr * buf  (inactive: p)
