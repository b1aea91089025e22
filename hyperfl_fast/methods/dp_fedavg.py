"""DP-FedAvg: FedAvg whose clients train the whole CNN with record-level DP-SGD and upload it (noised).

Each step: every sample's gradient clipped to ``dp_clip``, their sum plus
N(0, (sigma dp_clip)^2) noise, divided by the batch size (the expected one
under ``--poisson``), then SGD (lr ``lr``, momentum, weight decay), as the
authors' code does.  sigma spends (``epsilon``, ``delta``) over the whole run
(:class:`hyperfl_fast.dp.ClientPrivacy`).
"""
from __future__ import annotations

from ..dp import dp_batches, dp_sgd_step, expected_batch_size
from .base import ATTACK, POISSON, mean_loss, record_loss, register, sgd
from .fedavg import FedAvg


@register
class DPFedAvg(FedAvg):
    name = "dp-fedavg"
    paper_row = 3
    uploads = "the whole CNN, trained with DP-SGD"
    dp = True
    supports = frozenset({POISSON, ATTACK})
    threat = "dp-full-model"
    step_flags = ("lr", "dp_clip")
    runs_on_backbones = False  # its per-example gradients are the small CNN's
    dp_guarantee = "record-level: every DP-SGD step of the whole CNN, which is all that leaves a client"
    paper = {  # Table 1
        "emnist": {20: 35.12, 100: 45.73},
        "fmnist": {20: 59.88, 100: 68.29},
        "cifar10": {20: 29.12, 100: 32.03},
        "cinic10": {20: 27.30, 100: 29.94},
    }
    paper_seconds_per_round = 194

    def train(self, model, data, cfg, round_idx, noise):
        optimizer = sgd(model.parameters(), cfg, cfg.lr)
        denominator = expected_batch_size(cfg, data.num_train) if cfg.poisson else None
        for epoch in range(cfg.local_epochs):
            losses = []
            for step, (x, y) in enumerate(dp_batches(data, cfg, round_idx, epoch)):
                record_loss(losses, model, x, y)
                dp_sgd_step(model, list(model.parameters()), optimizer, x, y, cfg.dp_clip, noise.sigma,
                            noise.generator(round_idx, epoch, step, x.device), denominator, noise.sample)
        return mean_loss(losses)
