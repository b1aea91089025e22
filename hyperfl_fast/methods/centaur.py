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
    classifier_epoch_first = True
