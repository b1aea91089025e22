"""CENTAUR: one non-private classifier epoch (lr ``classifier_lr``) on the received representation, then
``local_epochs`` epochs of DP-SGD on the representation with the classifier frozen; only the representation
is uploaded (see :mod:`.representation_dp`)."""
from __future__ import annotations

from .base import register
from .representation_dp import RepresentationDP


@register
class Centaur(RepresentationDP):
    name = "centaur"
    paper_row = 4
    paper = {  # Table 1
        "emnist": {20: 68.82, 100: 67.24},
        "fmnist": {20: 83.07, 100: 79.77},
        "cifar10": {20: 50.85, 100: 51.86},
        "cinic10": {20: 48.82, 100: 51.01},
    }
    paper_seconds_per_round = 210
    classifier_epoch_first = True
