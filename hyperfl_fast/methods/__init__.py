"""The federated methods, one module each, read like the paper's algorithm box
(receive -> client update -> upload -> aggregate; see :mod:`.base`):

- :mod:`.hyperfl`: HyperFL, only the hypernetwork is shared;
- :mod:`.fedavg`, :mod:`.local`: the non-private baselines;
- :mod:`.dp_fedavg`, :mod:`.ppsgd`, :mod:`.centaur`: the DP-SGD baselines;
- :mod:`.pfedhn`: pFedHN and pFedHN-PC, the server's hypernetwork generates each client's model.

Every module of this package is imported here, and each method class it defines with ``@register`` joins
:data:`METHODS`: adding a method is adding its module.  Engines supply the client dimension:
:mod:`hyperfl_fast.reference` (one client after another), a method's ``lockstep`` engine (all clients at once)
and the Flower ``ClientApp`` (:mod:`hyperfl_fast.flower`) all run these methods.
"""
import importlib
import pkgutil
from collections.abc import Mapping

from .base import ATTACK, CUDA_GRAPHS, FEATURES, HEADLINE_NAMES, POISSON, REGISTRY, ClientUpdate, Method, State

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


class _Methods(Mapping):
    """The registry as a read-only mapping, name -> method, in Table 1's order (``paper_row``)."""

    def __getitem__(self, name: str) -> Method:
        return REGISTRY[name]

    def __iter__(self):
        return iter(sorted(REGISTRY, key=lambda name: REGISTRY[name].paper_row))

    def __len__(self) -> int:
        return len(REGISTRY)


METHODS: Mapping[str, Method] = _Methods()


def get_method(name: str) -> Method:
    """The method called ``name`` (as ``--method``); a ValueError naming the choices for another name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_names(feature: str | None = None) -> list[str]:
    """Every method's name, in Table 1's order; with ``feature``, the ones that support it."""
    return [name for name, m in METHODS.items() if feature is None or feature in m.supports]


__all__ = ["ATTACK", "CUDA_GRAPHS", "ClientUpdate", "FEATURES", "HEADLINE_NAMES", "METHODS", "Method", "POISSON",
           "State", "get_method", "method_names"]
