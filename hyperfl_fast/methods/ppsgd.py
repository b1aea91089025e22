"""PPSGD: at every batch a non-private classifier step (lr ``classifier_lr``), then a DP-SGD step of the
representation; only the representation is uploaded (see :mod:`.representation_dp`)."""
from __future__ import annotations

from .base import register
from .representation_dp import RepresentationDP


@register
class PPSGD(RepresentationDP):
    name = "ppsgd"
    paper_row = 5
    paper = {  # Table 1
        "emnist": {20: 71.16, 100: 71.18},
        "fmnist": {20: 84.47, 100: 82.94},
        "cifar10": {20: 52.17, 100: 53.92},
        "cinic10": {20: 49.98, 100: 52.91},
    }
    paper_seconds_per_round = 223
    classifier_epoch_first = False
