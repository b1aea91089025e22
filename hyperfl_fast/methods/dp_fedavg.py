"""DP-FedAvg: FedAvg whose clients train the whole CNN with record-level DP-SGD and upload it (noised).

Each step: every sample's gradient clipped to ``dp_clip``, their sum plus
N(0, (sigma dp_clip)^2) noise, divided by the batch size, then SGD (lr ``lr``,
momentum, weight decay), as the authors' code does.  sigma spends
(``epsilon``, ``delta``) over the whole run (:class:`hyperfl_fast.dp.ClientPrivacy`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dp import dp_sgd_step, noise_generator
from .base import sgd
from .fedavg import FedAvg


class DPFedAvg(FedAvg):
    name = "dp-fedavg"
    dp = True

    def train(self, model, data, cfg, round_idx, sigma):
        optimizer = sgd(model.parameters(), cfg, cfg.lr)
        for epoch in range(cfg.local_epochs):
            losses = []
            for step, (x, y) in enumerate(data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)):
                with torch.no_grad():
                    losses.append(F.cross_entropy(model(x), y).item())
                dp_sgd_step(model, list(model.parameters()), optimizer, x, y, cfg.dp_clip, sigma,
                            noise_generator(cfg.seed, round_idx, data.client_id, epoch, step))
        return sum(losses) / len(losses)
