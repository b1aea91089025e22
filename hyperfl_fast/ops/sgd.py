"""``torch.optim.SGD``'s update (momentum, weight decay) on stacked per-client tensors, for the active clients only.

Shared by the vectorised paths of the fused ops and by the lockstep engine's optimizers (``StackedSGD``): one
definition of the arithmetic.  Buffers start at zero, which equals SGD's first step (buf = d) exactly.
Masking is by per-client factors that are exactly 1 or 0, so active clients get torch's arithmetic and
inactive ones keep their parameters and buffers.
"""
from __future__ import annotations

import torch


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
