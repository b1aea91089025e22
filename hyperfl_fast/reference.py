"""Reference engine: plain per-client PyTorch, one client after another.

This is the project's correctness oracle: it runs a method's per-client
update (:meth:`hyperfl_fast.methods.Method.client_update`) for each sampled
client in turn, then the server's aggregation, with nothing batched or fused.
Every fast path is checked against it.  A round reads like the algorithm box::

    for each sampled client: receive what the server sends it -> client update -> upload
    server: aggregate the uploads

(a method that steps per client, pFedHN, aggregates each upload as it arrives, before the next client
receives anything).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .config import Config
from .engines import Engine, State
from .federation import ClientData, ClientResult
from .methods import Method
from .models import CNNSpec


class ReferenceEngine(Engine):
    """Runs ``method`` client by client; holds the server's state and every client's private state."""

    progress_unit = "client"

    def __init__(self, method: Method, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        super().__init__(method, spec, clients, cfg)
        self.clients = clients
        self.shared, self.private = method.init_states(spec, len(clients), cfg, device)

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        uploads, weights, senders, local = [], [], [], []
        for cid in progress(sampled):
            noise = self.privacy.client(cid) if self.privacy else None
            received = self.method.send(self.spec, self.shared, cid)
            update = self.method.client_update(self.spec, received, self.private[cid], self.clients[cid],
                                               self.cfg, round_idx, noise)
            self.private[cid] = update.private  # stays with the client
            if update.upload:
                uploads.append(update.upload)
                weights.append(self.clients[cid].num_train)
                senders.append(cid)
            local.append((cid, update.train_loss, update.local_acc))
            if self.method.steps_per_client:  # the next client receives what this upload made of the state
                self.shared = self.method.aggregate(self.shared, uploads, weights, senders)
                uploads, weights, senders = [], [], []
        self.shared = self.method.aggregate(self.shared, uploads, weights, senders)
        epsilons = self.privacy.record_round(sampled) if self.privacy else [None] * len(sampled)
        return [ClientResult(cid, loss, acc, self.method.global_accuracy(self.spec, self.shared, self.private[cid],
                                                                          self.clients[cid], cid), eps)
                for (cid, loss, acc), eps in zip(local, epsilons)]

    def global_state(self) -> State:
        """The server's state (HyperFL: the hypernetwork; empty for ``local``)."""
        return self.shared

    def client_state(self, cid: int) -> State:
        """Client ``cid``'s private state."""
        return self.private[cid]

    def load_states(self, global_state: State, client_states: list[State]) -> None:
        device = next(iter({**self.shared, **self.private[0]}.values())).device
        self.shared = {k: t.to(device, copy=True) for k, t in global_state.items()}
        self.private = [{k: t.to(device, copy=True) for k, t in c.items()} for c in client_states]
