"""What every federated method is made of, read as the paper's algorithm box.

A method says what the server holds (``global_state``), what each client keeps
for itself (its ``private`` state), how one client trains in a round
(:meth:`Method.client_update`: receive the global state, train, and return
the upload and the new private state), and how the server aggregates the
uploads (:meth:`Method.aggregate`).  States are plain ``dict[str, Tensor]``,
so an engine, a checkpoint or a Flower message can carry them as they are.

Engines only supply the client dimension: :mod:`hyperfl_fast.reference` calls
:meth:`Method.client_update` client after client (and so does the Flower
``ClientApp``, on its one client), while a method's ``lockstep`` class trains
all sampled clients at once as stacked tensors (:mod:`hyperfl_fast.batched`
holds its building blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..federation import ClientData, accuracy, weighted_average
from ..models import CNNSpec

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's round: what it sends to the server, what it keeps, and its figures for the log."""

    upload: State  # leaves the client (empty: nothing does)
    private: State  # stays on the client
    train_loss: float  # mean loss of the last local epoch
    local_acc: float  # test accuracy of the locally trained model


def sgd(params, cfg, lr: float) -> torch.optim.SGD:
    """The paper's optimizer: SGD with momentum and weight decay, fresh state each round."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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


class Method:
    """One federated method.  Subclasses fill in the four parts of the algorithm box.

    ``dp``: the clients train with record-level DP-SGD (the engines then give
    each client its noise multiplier ``sigma`` and account for its steps).
    ``lockstep``: the class that trains every sampled client at once
    (``lockstep(method, spec, clients, cfg, device)``; it starts from :meth:`init_states`).
    """

    name: str = ""
    dp: bool = False
    lockstep: type | None = None

    def init_states(self, spec: CNNSpec, num_clients: int, cfg, device: torch.device) -> tuple[State, list[State]]:
        """The server's starting state and every client's starting private state (seeded by the caller)."""
        raise NotImplementedError

    def client_update(self, spec: CNNSpec, global_state: State, private: State, data: ClientData, cfg,
                      round_idx: int, sigma: float | None = None) -> ClientUpdate:
        """One client's local training in round ``round_idx``, starting from the received ``global_state``."""
        raise NotImplementedError

    def aggregate(self, global_state: State, uploads: list[State], weights: list[float]) -> State:
        """The server's new state: the uploads averaged by ``weights`` (data sizes)."""
        return {**global_state, **weighted_average(uploads, weights)} if uploads else global_state

    def predict(self, spec: CNNSpec, global_state: State, private: State) -> torch.nn.Module:
        """The model a client would use with the global state and its private part (images -> logits); it shares
        their tensors (no copies), so it is for evaluation, not training."""
        raise NotImplementedError

    def global_accuracy(self, spec: CNNSpec, global_state: State, private: State, data: ClientData) -> float:
        """A client's test accuracy with the global state and its private part."""
        return accuracy(self.predict(spec, global_state, private), data.test_x, data.test_y)
