"""Building an engine for a run: the method's lockstep class (``batched``) or the per-client reference."""
from __future__ import annotations

import torch

from .config import Config
from .federation import ClientData
from .methods import get_method
from .models import CNNSpec
from .reference import ReferenceEngine


def build_engine(spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device,
                 engine: str | None = None):
    """The engine ``engine`` (default ``cfg.engine``) running ``cfg.method``; seeds initialisation with ``cfg.seed``.

    Both engines draw the initial states in the same order, so they start from the same tensors.
    """
    method = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    if (engine or cfg.engine) == "batched":
        return method.lockstep(method, spec, clients, cfg, device)
    return ReferenceEngine(method, spec, clients, cfg, device)


def build_batched(spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
    """The batched (lockstep) engine for ``cfg.method``."""
    return build_engine(spec, clients, cfg, device, "batched")


def build_reference(spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
    """The per-client reference engine for ``cfg.method``."""
    return build_engine(spec, clients, cfg, device, "reference")
