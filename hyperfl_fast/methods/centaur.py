"""CENTAUR: one non-private classifier epoch (lr ``classifier_lr``) on the received representation, then
``local_epochs`` epochs of DP-SGD on the representation with the classifier frozen; only the representation
is uploaded (see :mod:`.representation_dp`)."""
from __future__ import annotations

from ..dp import dp_batches
from .base import mean_loss, record_loss
from .representation_dp import RepresentationDP, classifier_step, private_representation_step


class Centaur(RepresentationDP):
    name = "centaur"

    def train(self, model, data, cfg, round_idx, sigma):
        classifier_sgd, feature_sgd = self.optimizers(model, cfg)
        for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, 0):  # the classifier epoch (not private)
            classifier_step(model, classifier_sgd, x, y)
        for epoch in range(1, cfg.local_epochs + 1):
            losses = []
            for step, (x, y) in enumerate(dp_batches(data, cfg, round_idx, epoch)):
                record_loss(losses, model, x, y)
                private_representation_step(model, feature_sgd, x, y, cfg, sigma, data, round_idx, epoch, step)
        return mean_loss(losses)
