"""PPSGD: at every batch a non-private classifier step (lr ``classifier_lr``), then a DP-SGD step of the
representation; only the representation is uploaded (see :mod:`.representation_dp`)."""
from __future__ import annotations

from ..dp import dp_batches
from .base import mean_loss, record_loss
from .representation_dp import RepresentationDP, classifier_step, private_representation_step


class PPSGD(RepresentationDP):
    name = "ppsgd"

    def train(self, model, data, cfg, round_idx, sigma):
        classifier_sgd, feature_sgd = self.optimizers(model, cfg)
        for epoch in range(cfg.local_epochs):
            losses = []
            for step, (x, y) in enumerate(dp_batches(data, cfg, round_idx, epoch)):
                record_loss(losses, model, x, y)
                classifier_step(model, classifier_sgd, x, y)
                private_representation_step(model, feature_sgd, x, y, cfg, sigma, data, round_idx, epoch, step)
        return mean_loss(losses)
