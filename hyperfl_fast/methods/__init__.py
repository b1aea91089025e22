"""The federated methods, one module each, read like the paper's algorithm box
(receive -> client update -> upload -> aggregate; see :mod:`.base`):

- :mod:`.hyperfl`: HyperFL, only the hypernetwork is shared;
- :mod:`.fedavg`, :mod:`.local`: the non-private baselines;
- :mod:`.dp_fedavg`, :mod:`.ppsgd`, :mod:`.centaur`: the DP-SGD baselines.

Engines supply the client dimension: :mod:`hyperfl_fast.reference` (one client
after another), a method's ``lockstep`` class (all clients at once) and the
Flower ``ClientApp`` (:mod:`hyperfl_fast.flower`) all run these methods.
"""
from .base import ClientUpdate, Method, State
from .centaur import Centaur
from .dp_fedavg import DPFedAvg
from .fedavg import FedAvg
from .hyperfl import HyperFL
from .local import Local
from .ppsgd import PPSGD

METHODS = {m.name: m for m in (HyperFL(), FedAvg(), Local(), DPFedAvg(), PPSGD(), Centaur())}


def get_method(name: str) -> Method:
    """The method called ``name`` (as ``--method``)."""
    return METHODS[name]


__all__ = ["ClientUpdate", "METHODS", "Method", "State", "get_method"]
