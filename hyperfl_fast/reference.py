"""Reference engine: plain per-client PyTorch, one client after another.

This is the project's correctness oracle: it runs a method's per-client
update (:meth:`hyperfl_fast.methods.Method.client_update`) for each sampled
client in turn, then the server's aggregation, with nothing batched or fused.
Every fast path is checked against it.  A round reads like the algorithm box::

    for each sampled client: receive the global state -> client update -> upload
    server: aggregate the uploads (weighted by data size)
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .config import Config
from .dp import ClientPrivacy
from .federation import ClientData, ClientResult
from .methods import Method, State
from .models import CNNSpec


class ReferenceEngine:
    """Runs ``method`` client by client; holds the server's state and every client's private state."""

    progress_unit = "client"

    def __init__(self, method: Method, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.method, self.spec, self.clients, self.cfg = method, spec, clients, cfg
        self.shared, self.private = method.init_states(spec, len(clients), cfg, device)
        self.privacy = ClientPrivacy.from_config([c.num_train for c in clients], cfg) if method.dp else None

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        uploads, weights, local = [], [], []
        for cid in progress(sampled):
            sigma = self.privacy.sigmas[cid] if self.privacy else None
            update = self.method.client_update(self.spec, self.shared, self.private[cid], self.clients[cid],
                                               self.cfg, round_idx, sigma)
            self.private[cid] = update.private  # stays with the client
            if update.upload:
                uploads.append(update.upload)
                weights.append(self.clients[cid].num_train)
            local.append((cid, update.train_loss, update.local_acc))
        self.shared = self.method.aggregate(self.shared, uploads, weights)
        epsilons = self.privacy.record_round(sampled) if self.privacy else [None] * len(sampled)
        return [ClientResult(cid, loss, acc, self.method.global_accuracy(self.spec, self.shared, self.private[cid],
                                                                          self.clients[cid]), eps)
                for (cid, loss, acc), eps in zip(local, epsilons)]

    def global_state(self) -> State:
        """The server's state (HyperFL: the hypernetwork; empty for ``local``)."""
        return self.shared

    def client_state(self, cid: int) -> State:
        """Client ``cid``'s private state."""
        return self.private[cid]

    def state_dict(self) -> dict:
        return {"global": self.shared, "clients": self.private,
                **({"privacy": self.privacy.state_dict()} if self.privacy else {})}

    def load_state_dict(self, state: dict) -> None:
        if set(state["global"]) != set(self.shared) or len(state["clients"]) != len(self.private):
            raise KeyError("the saved states do not match this method's")
        self.shared = {k: t.clone() for k, t in state["global"].items()}
        self.private = [{k: t.clone() for k, t in c.items()} for c in state["clients"]]
        if self.privacy:
            self.privacy.load_state_dict(state["privacy"])
