"""PPSGD: at every batch a non-private classifier step (lr ``classifier_lr``), then a DP-SGD step of the
representation; only the representation is uploaded (see :mod:`.representation_dp`)."""
from __future__ import annotations

from .base import register
from .representation_dp import RepresentationDP


@register
class PPSGD(RepresentationDP):
    name = "ppsgd"
    paper_row = 5
    classifier_epoch_first = False
