"""What every federated method is made of, declared: :class:`Method` (read it as the paper's algorithm box).

A method says what it is (class attributes: its name, what leaves a client, what a client keeps, its headline
figure, whether it is DP, which optional features it supports, its paper figures and its lockstep engine) and
what it does: what the server holds and each client keeps at the start (:meth:`Method.init_states`), what
the server sends a client (:meth:`Method.send`: the global state, or pFedHN's weights generated for it), how
one client trains in a round (:meth:`Method.client_update`: receive, train, return the upload and the new
private state), how the server aggregates the uploads (:meth:`Method.aggregate`) and what model a client
evaluates (:meth:`Method.predict`).  States are plain ``dict[str, Tensor]``, so an engine, a checkpoint
or a Flower message carries them as they are.

A method is one module of this package whose class is decorated with :func:`register`: the registry
(:data:`hyperfl_fast.methods.METHODS`) is the one list every command line, engine, the attack CLI, the
reproduction and Flower read.  Engines (:class:`hyperfl_fast.engines.Engine`) only supply the client dimension.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..dp import ClientNoise
from ..federation import ClientData, accuracy, weighted_average
from ..models import CNNSpec
from ..ops.sgd import SGD

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's round: what it sends to the server, what it keeps, and its figures for the log."""

    upload: State  # leaves the client (empty: nothing does)
    private: State  # stays on the client
    train_loss: float  # mean loss of the last local epoch
    local_acc: float  # test accuracy of the locally trained model


def sgd(params, cfg, lr: float) -> SGD:
    """The paper's optimizer: SGD with momentum and weight decay (``torch.optim.SGD``'s arithmetic), fresh state
    each round."""
    return SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def load_module(module: torch.nn.Module, state: State, copy: bool = True) -> torch.nn.Module:
    """``module`` (built on the meta device) holding ``state``'s tensors as its parameters: private copies to
    train, or (``copy=False``) the tensors themselves, for evaluation only."""
    module.load_state_dict({k: t.detach().clone() if copy else t.detach() for k, t in state.items()}, assign=True)
    return module


def detached(module: torch.nn.Module, prefix: str = "") -> State:
    """Copies of a module's tensors, optionally under ``prefix``."""
    return {prefix + k: t.detach().clone() for k, t in module.state_dict().items()}


def mean_loss_of_epoch(model, optimizer, batches) -> float:
    """One epoch of plain SGD on ``model``'s cross-entropy; returns the epoch's mean loss."""
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def record_loss(losses: list[float], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Append the model's loss on a batch, for the log (taken before the batch's steps; none for an empty one)."""
    if len(y):
        losses.append(F.cross_entropy(model(x), y).item())


def mean_loss(losses: list[float]) -> float:
    """The epoch's mean batch loss (0 if every Poisson batch was empty)."""
    return sum(losses) / len(losses) if losses else 0.0


# optional features a method may support (Method.supports)
CUDA_GRAPHS = "cuda_graphs"  # --cuda-graphs: its lockstep steps can be captured (static shapes, in-place state)
POISSON = "poisson"  # --poisson: Poisson-sampled DP-SGD batches
ATTACK = "attack"  # python -m hyperfl_fast.attack can attack its upload (Method.threat names the threat model)
FEATURES = (CUDA_GRAPHS, POISSON, ATTACK)
HEADLINE_NAMES = {"local_acc": "mean local accuracy", "global_acc": "global-model accuracy"}


class Method(ABC):
    """One federated method.  Concrete methods set the class attributes below and implement the abstract
    methods; :func:`register` checks the attributes when the module is imported."""

    name: ClassVar[str]  # as --method
    paper_row: ClassVar[int]  # its row in the paper's Table 1: tables list the methods in this order
    headline: ClassVar[str]  # the figure the paper reports: "local_acc" (personalised) or "global_acc"
    uploads: ClassVar[str]  # what leaves a client each round, in words ("" = nothing)
    keeps: ClassVar[str]  # what a client keeps between rounds, in words ("" = nothing)
    dp: ClassVar[bool] = False  # DP-SGD: engines give each client its noise (dp.ClientNoise) and account its steps
    # with dp: what its epsilon covers, in words (the log, metrics.json and --help say it)
    dp_guarantee: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset()  # of FEATURES
    threat: ClassVar[str | None] = None  # the attack CLI's threat model for its upload (with ATTACK)
    step_flags: ClassVar[tuple[str, ...]] = ("lr",)  # the settings to lower when its training diverges
    # the paper's Table 1 (200 rounds): its figure by dataset and clients (20: all train; 100: 30 sampled a round)
    paper: ClassVar[dict[str, dict[int, float]]] = {}
    paper_seconds_per_round: ClassVar[float | None] = None  # Table 4: EMNIST, 20 clients, the authors' GPU
    lockstep: ClassVar[type]  # its engine on stacked tensors (an Engine): every sampled client at once, or
    # (steps_per_client) one after the other
    # the server updates its state after each upload (aggregate of that one), and the next client of the round
    # receives what it made of it: the round's clients train one after the other (pFedHN's one client per step)
    steps_per_client: ClassVar[bool] = False
    needs_backbone: ClassVar[bool] = False  # runs only on a frozen pre-trained backbone (--backbone; HyperFL-LPM)
    runs_on_backbones: ClassVar[bool] = False  # may run on one (--backbone), else on the paper's small CNN
    # the client's SGD settings where they are the method's own, not --lr/--momentum/--weight-decay (pFedHN):
    # lr, momentum, weight_decay and clip (gradient norm), as the attack CLI's simulation of its training takes them
    client_optimizer: ClassVar[dict[str, float]] = {}

    @abstractmethod
    def init_states(self, spec: CNNSpec, num_clients: int, cfg, device: torch.device) -> tuple[State, list[State]]:
        """The server's starting state and every client's starting private state (seeded by the caller)."""

    @abstractmethod
    def client_update(self, spec: CNNSpec, global_state: State, private: State, data: ClientData, cfg,
                      round_idx: int, noise: ClientNoise | None = None) -> ClientUpdate:
        """One client's local training in round ``round_idx``, starting from what it received (``global_state``:
        :meth:`send`'s result)."""

    @abstractmethod
    def predict(self, spec: CNNSpec, global_state: State, private: State) -> torch.nn.Module:
        """The model a client would use with what it received (:meth:`send`'s result) and its private part
        (images -> logits); it shares their tensors (no copies), so it is for evaluation, not training."""

    @property
    def sends_per_client(self) -> bool:
        """Whether the server sends each client something of its own (:meth:`send` is overridden)."""
        return type(self).send is not Method.send

    @property
    def averages_uploads(self) -> bool:
        """Whether the server's new state is only the weighted mean of the uploads (the default
        :meth:`aggregate`), so that their weighted sum is all it needs (secure aggregation)."""
        return bool(self.uploads) and not self.sends_per_client and type(self).aggregate is Method.aggregate

    @property
    def checks_received(self) -> bool:
        """Whether its clients can check what they receive before training (:meth:`refusals`, ``--psi-check``)."""
        return type(self).refusals is not Method.refusals

    def refusals(self, received: State, privates: list[State]) -> list[str | None]:
        """For clients with private states ``privates`` that received ``received``: why each refuses to train
        on it, or None to accept (``--psi-check``).  By default every client accepts."""
        return [None] * len(privates)

    def send(self, spec: CNNSpec, global_state: State, cid: int) -> State:
        """What the server sends client ``cid`` at the start of a round: by default the global state itself
        (a method whose server holds per-client parts, like pFedHN's embeddings, sends only that client's)."""
        return global_state

    def aggregate(self, global_state: State, uploads: list[State], weights: list[float], cids: list[int]) -> State:
        """The server's new state from the uploads of clients ``cids`` (in that order): by default their
        average weighted by ``weights`` (data sizes)."""
        return {**global_state, **weighted_average(uploads, weights)} if uploads else global_state

    def global_accuracy(self, spec: CNNSpec, global_state: State, private: State, data: ClientData,
                        cid: int) -> float:
        """Client ``cid``'s test accuracy with what the server would send it now and its private part."""
        return accuracy(self.predict(spec, self.send(spec, global_state, cid), private), data.test_x, data.test_y,
                        spec.eval_chunk)


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: check a method's declaration and add one instance of it to the registry."""
    for attr in ("name", "paper_row", "headline", "uploads", "keeps", "lockstep"):
        if not hasattr(cls, attr):
            raise TypeError(f"method {cls.__name__} does not declare {attr!r}")
    if cls.headline not in HEADLINE_NAMES:
        raise TypeError(f"method {cls.name}: headline must be one of {', '.join(HEADLINE_NAMES)}, not {cls.headline!r}")
    if not cls.supports <= set(FEATURES):
        raise TypeError(f"method {cls.name}: unknown features {sorted(cls.supports - set(FEATURES))}")
    if (ATTACK in cls.supports) != (cls.threat is not None):
        raise TypeError(f"method {cls.name}: a method that supports the attack names its threat model, and only then")
    if not all(isinstance(by_clients, dict) and all(isinstance(c, int) for c in by_clients)
               for by_clients in cls.paper.values()):
        raise TypeError(f"method {cls.name}: paper maps dataset -> clients -> figure, e.g. {{'fmnist': {{20: 88.28}}}}")
    if cls.name in REGISTRY:
        raise TypeError(f"two methods are called {cls.name!r}")
    REGISTRY[cls.name] = cls()
    return cls
