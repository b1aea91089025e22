"""The full target CNN trained by every client: the building blocks of ``local``, ``fedavg`` and ``dp-fedavg``.

Per client: :func:`cnn_from` (a client's CNN from a state) and
:func:`train_full_model` (``local_epochs`` epochs of SGD on the whole CNN).
In lockstep: :class:`CNNLockstep`, all sampled clients' CNNs as stacked tensors.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..batched import (RoundSchedule, StackedData, StackedSGD, batched_accuracy, classify, client_losses,
                       client_results, private_step_grads, weighted_mean)
from ..config import Config
from ..dp import ClientPrivacy
from ..federation import ClientData, ClientResult
from ..models import CNNSpec, TargetCNN, extract_features_batched
from .base import Method, State, load_module, mean_loss_of_epoch, sgd


def cnn_from(spec: CNNSpec, state: State, copy: bool = True) -> TargetCNN:
    """A target CNN holding its own copies of ``state``'s tensors (``copy=False``: the tensors themselves)."""
    with torch.device("meta"):
        model = TargetCNN(spec)
    return load_module(model, state, copy)


def train_full_model(model: TargetCNN, data: ClientData, cfg: Config, round_idx: int) -> float:
    """Train the whole CNN for ``local_epochs`` epochs; returns the mean loss of the last epoch."""
    optimizer = sgd(model.parameters(), cfg, cfg.lr)
    for epoch in range(cfg.local_epochs):
        loss = mean_loss_of_epoch(model, optimizer, data.batches(cfg.batch_size, cfg.seed, round_idx, epoch))
    return loss


class CNNLockstep:
    """``local``, ``fedavg`` and ``dp-fedavg``: full per-client CNNs trained in lockstep as stacked tensors.

    ``dp-fedavg`` trains with record-level DP-SGD: every sample's gradient of
    every client at once (``torch.func``), clipped and noised as in
    :func:`hyperfl_fast.dp.private_gradient`, with the reference's keyed noise.
    """

    progress_unit = "epoch"

    def __init__(self, method: Method, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.cfg, self.data, self.method = spec, cfg, StackedData(clients), method.name
        self.privacy = ClientPrivacy.from_config([c.num_train for c in clients], cfg) if method.dp else None
        shared, privates = method.init_states(spec, len(clients), cfg, device)
        states = privates if self.method == "local" else [shared]
        # fedavg, dp-fedavg: the global model (1, ...); local: every client's model (Nc, ...)
        self.params = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        with torch.device("meta"):
            self.template = TargetCNN(spec)  # the module per-example gradients are taken through (no data)

    def logits(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = extract_features_batched(x, params, self.spec)
        return classify(feats, params["fc2.weight"], params["fc2.bias"])

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        cfg, n = self.cfg, len(sampled)
        idx = torch.tensor(sampled, device=self.data.train_y.device)
        if self.method != "local":  # every client receives the global model
            params = {k: t.expand(n, *t.shape[1:]).clone() for k, t in self.params.items()}
        else:
            params = {k: t[idx].clone() for k, t in self.params.items()}
        sgd = StackedSGD(list(params.values()), cfg.lr, cfg.momentum, cfg.weight_decay)
        poisson = range(cfg.local_epochs) if self.privacy is not None and cfg.poisson else ()
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx, range(cfg.local_epochs),
                                 poisson)
        for epoch in progress(range(cfg.local_epochs)):
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for step, batch in enumerate(schedule.batches(epoch)):
                if self.privacy is not None:
                    with torch.no_grad():
                        losses = client_losses(self.logits(batch.x, params), batch)
                    grads = private_step_grads(self.template, params, batch, cfg, self.privacy, sampled,
                                               round_idx, epoch, step)
                    sgd.step(grads, batch.active)
                else:
                    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
                    losses = client_losses(self.logits(batch.x, leaves), batch)
                    sgd.step(list(torch.autograd.grad(losses.sum(), list(leaves.values()))), batch.active)
                loss_sum += losses.detach() * batch.nonempty
                loss_count += batch.nonempty
        train_loss = loss_sum / loss_count.clamp(min=1)  # (0 if every batch of the epoch was empty)
        local_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, params))
        if self.method != "local":  # upload the whole model; the server averages by data size
            self.params = weighted_mean(self.data.weights(idx), params)
            global_params = {k: t.expand(n, *t.shape[1:]) for k, t in self.params.items()}
            global_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, global_params))
        else:
            for k, t in params.items():
                self.params[k][idx] = t
            global_acc = local_acc
        epsilons = self.privacy.record_round(sampled) if self.privacy is not None else None
        return client_results(sampled, train_loss, local_acc, global_acc, epsilons=epsilons)

    def global_state(self) -> State:
        """The server's CNN (empty for ``local``: there is none)."""
        return {} if self.method == "local" else {k: t[0] for k, t in self.params.items()}

    def client_state(self, cid: int) -> State:
        """Client ``cid``'s private CNN (``local``; the others keep nothing between rounds)."""
        return {k: t[cid] for k, t in self.params.items()} if self.method == "local" else {}

    def state_dict(self) -> dict:
        return {"params": self.params, **({"privacy": self.privacy.state_dict()} if self.privacy else {})}

    def load_state_dict(self, state: dict) -> None:
        self.params = {k: t.clone() for k, t in state["params"].items()}
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
