"""What every engine is (:class:`Engine`), the one checkpoint layout they all write, and building one for a run.

An engine runs a method's rounds: the reference engine one client after another
(:class:`hyperfl_fast.reference.ReferenceEngine`), a method's ``lockstep`` engine every sampled client at
once.  Whatever it stores inside, an engine exposes the server's state and each client's private state as
the method defines them, so every engine saves the same engine-independent state::

    {"format": STATE_FORMAT, "method": name, "global": State, "clients": [State, ...], "privacy": {...}}

(``privacy``: DP methods only).  :meth:`Engine.load_state_dict` checks the tag, the method and every tensor's
name and shape before loading anything, so a run saved by one engine resumes on the other, the attack CLI reads
any checkpoint without guessing, and the Flower server's checkpoint has the same layout (with no client
states: those stay on the SuperNodes).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable

import torch

from .config import Config
from .dp import ClientPrivacy
from .federation import ClientData, ClientResult

State = dict[str, torch.Tensor]
STATE_FORMAT = "hyperfl_fast/engine-state/1"


class Engine(ABC):
    """Runs ``method`` on ``clients``; subclasses hold the states however they like and expose them as States."""

    progress_unit: ClassVar[str] = "epoch"  # what a round's progress bar counts

    def __init__(self, method, spec, clients: list[ClientData], cfg: Config):
        self.method, self.spec, self.cfg = method, spec, cfg
        self.num_clients = len(clients)
        self.privacy = ClientPrivacy.from_config([c.num_train for c in clients], cfg) if method.dp else None

    @abstractmethod
    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        """Train the ``sampled`` clients for one round and aggregate; each client's figures."""

    @abstractmethod
    def global_state(self) -> State:
        """The server's state, as the method defines it (views allowed; empty when there is none)."""

    @abstractmethod
    def client_state(self, cid: int) -> State:
        """Client ``cid``'s private state, as the method defines it (views allowed)."""

    @abstractmethod
    def load_states(self, global_state: State, client_states: list[State]) -> None:
        """Take over these states (already checked against this engine's own)."""

    def state_dict(self) -> dict:
        """The engine-independent state (see the module docs)."""
        state = {"format": STATE_FORMAT, "method": self.method.name, "global": dict(self.global_state()),
                 "clients": [dict(self.client_state(c)) for c in range(self.num_clients)]}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state saved by any engine of the same method and model; a ValueError says what does not fit."""
        check_state(state, self.state_dict())
        self.load_states(state["global"], state["clients"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])


def check_format(state: dict) -> None:
    """Raise ValueError unless ``state`` is an engine state in this package's one layout."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError("it was written in an older, engine-specific layout (before one layout for every engine); "
                         "continue it with the version that wrote it, or start afresh")


def check_state(state: dict, expected: dict) -> None:
    """Raise ValueError unless ``state`` has ``expected``'s format, method, tensor names and shapes."""
    check_format(state)
    if state.get("method") != expected["method"]:
        raise ValueError(f"it holds a {state.get('method')} run, not {expected['method']}")
    _check_tensors("the server's state", state["global"], expected["global"])
    if len(state["clients"]) != len(expected["clients"]):
        raise ValueError(f"it holds {len(state['clients'])} clients' states, this run has {len(expected['clients'])}"
                         + (" (a Flower server keeps no client state)" if not state["clients"] else ""))
    for cid, (saved, own) in enumerate(zip(state["clients"], expected["clients"])):
        _check_tensors(f"client {cid}'s state", saved, own)
    if ("privacy" in state) != ("privacy" in expected):
        raise ValueError("its privacy accounting does not fit this method's")


def _check_tensors(what: str, saved: State, own: State) -> None:
    missing, extra = [k for k in own if k not in saved], [k for k in saved if k not in own]
    if missing or extra:
        parts = [f"{verb} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)} in all)"
                 for verb, names in (("lacks", missing), ("has what this run does not:", extra)) if names]
        raise ValueError(f"{what} {'; '.join(parts)}")
    for name, tensor in own.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: {name} is {tuple(saved[name].shape)}, this run's {tuple(tensor.shape)}")


def build_engine(spec, clients: list[ClientData], cfg: Config, device: torch.device,
                 engine: str | None = None) -> Engine:
    """The engine ``engine`` (default ``cfg.engine``) running ``cfg.method``; seeds initialisation with ``cfg.seed``.

    Both engines draw the initial states in the same order, so they start from the same tensors.
    """
    from .methods import get_method
    from .reference import ReferenceEngine

    method = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    if (engine or cfg.engine) == "batched":
        return method.lockstep(method, spec, clients, cfg, device)
    return ReferenceEngine(method, spec, clients, cfg, device)


def build_batched(spec, clients: list[ClientData], cfg: Config, device: torch.device) -> Engine:
    """The batched (lockstep) engine for ``cfg.method``."""
    return build_engine(spec, clients, cfg, device, "batched")


def build_reference(spec, clients: list[ClientData], cfg: Config, device: torch.device) -> Engine:
    """The per-client reference engine for ``cfg.method``."""
    return build_engine(spec, clients, cfg, device, "reference")
