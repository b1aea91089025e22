"""``torch.optim.SGD`` on stacked per-client tensors."""
from __future__ import annotations

import torch

from ..ops.sgd import masked_sgd_


class StackedSGD:
    """``torch.optim.SGD`` (momentum, weight decay) on stacked per-client tensors (N, ...): the arithmetic of
    :func:`hyperfl_fast.ops.sgd.masked_sgd_` (inactive clients keep their parameters and buffers)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float):
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in params]

    def step(self, grads: list[torch.Tensor], active: torch.Tensor) -> None:
        masked_sgd_(self.params, grads, self.bufs, active, self.lr, self.momentum, self.weight_decay)
