"""PPSGD: at every batch a non-private classifier step (lr ``classifier_lr``), then a DP-SGD step of the
representation; only the representation is uploaded (see :mod:`.representation_dp`)."""
from __future__ import annotations

from .representation_dp import RepresentationDP, batch_loss, classifier_step, private_representation_step


class PPSGD(RepresentationDP):
    name = "ppsgd"

    def train(self, model, data, cfg, round_idx, sigma):
        classifier_sgd, feature_sgd = self.optimizers(model, cfg)
        for epoch in range(cfg.local_epochs):
            losses = []
            for step, (x, y) in enumerate(data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)):
                losses.append(batch_loss(model, x, y))
                classifier_step(model, classifier_sgd, x, y)
                private_representation_step(model, feature_sgd, x, y, cfg, sigma, data.client_id, round_idx, epoch,
                                            step)
        return sum(losses) / len(losses)
