"""The full target CNN trained by every client: the building blocks of ``local``, ``fedavg`` and ``dp-fedavg``.

Per client: :func:`cnn_from` (a client's CNN from a state) and
:func:`train_full_model` (``local_epochs`` epochs of SGD on the whole CNN).
In lockstep: :class:`CNNLockstep` (a global CNN) and :class:`LocalLockstep` (private ones), all sampled
clients' CNNs as stacked tensors.

With ``--backbone`` (``local`` and ``fedavg``, the paper's Table 2 baselines) the model is instead a frozen
backbone's head and, with ``--adapters on``, its adapters (:class:`hyperfl_fast.backbones.BackboneModel`).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..config import Config
from ..engines import Engine
from ..federation import ClientData, ClientResult
from ..backbones import BackboneModel, LPMSpec, batched_logits, init_backbone_model
from ..lockstep.data import RoundSchedule, StackedData, weighted_mean
from ..lockstep.dp_step import private_step_grads
from ..lockstep.evaluation import batched_accuracy, client_losses, client_results, cnn_logits
from ..lockstep.optim import StackedSGD
from ..models import CNNSpec, TargetCNN, init_target_cnns
from .base import Method, State, detached, load_module, mean_loss_of_epoch, sgd


def cnn_from(spec: CNNSpec | LPMSpec, state: State, copy: bool = True) -> TargetCNN | BackboneModel:
    """A target CNN (or backbone model) holding its own copies of ``state``'s tensors (``copy=False``: the tensors
    themselves)."""
    if isinstance(spec, LPMSpec):
        return BackboneModel(spec, {k: t.detach().clone() if copy else t.detach() for k, t in state.items()})
    with torch.device("meta"):
        model = TargetCNN(spec)
    return load_module(model, state, copy)


def init_models(spec: CNNSpec | LPMSpec, count: int, device: torch.device, shared: bool = True) -> list[State]:
    """``count`` models' states: copies of one draw (``shared``, as the authors' code) or independent draws."""
    if not isinstance(spec, LPMSpec):
        return [detached(m) for m in init_target_cnns(spec, count, device, shared)]
    draws = [{k: t.to(device) for k, t in init_backbone_model(spec).items()} for _ in range(1 if shared else count)]
    return [{k: t.clone() for k, t in draws[0 if shared else c].items()} for c in range(count)]


def model_logits(x: torch.Tensor, params: State, spec: CNNSpec | LPMSpec) -> torch.Tensor:
    """Every client's model (its tensors stacked (N, ...) in ``params``): (N, B, C, H, W) -> (N, B, K)."""
    if not isinstance(spec, LPMSpec):
        return cnn_logits(x, params, spec)
    adapters = {name: params[name] for name, _ in spec.adapter_shapes()}
    return batched_logits(x, adapters, {name: params[name] for name, _ in spec.head_shapes()}, spec)


def train_full_model(model: TargetCNN | BackboneModel, data: ClientData, cfg: Config, round_idx: int) -> float:
    """Train the whole CNN (or a backbone model's head and adapters) for ``local_epochs`` epochs; returns the mean
    loss of the last epoch."""
    optimizer = sgd(model.parameters(), cfg, cfg.lr)
    for epoch in range(cfg.local_epochs):
        loss = mean_loss_of_epoch(model, optimizer, data.batches(cfg.batch_size, cfg.seed, round_idx, epoch))
    return loss


class CNNLockstep(Engine):
    """``fedavg`` and ``dp-fedavg``: every sampled client trains the global CNN, all of them at once as stacked
    tensors; the server averages the whole model.  (``local``: :class:`LocalLockstep`.)

    ``dp-fedavg`` trains with record-level DP-SGD: every sample's gradient of every client at once
    (``torch.func``), clipped and noised as in :func:`hyperfl_fast.dp.private_gradient`, with the reference's
    keyed noise.
    """

    def __init__(self, method: Method, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        super().__init__(method, spec, clients, cfg)
        self.data = StackedData(clients)
        shared, privates = method.init_states(spec, len(clients), cfg, device)
        self.params = self.stored(shared, privates)

    # what varies between a shared model and private ones
    def stored(self, shared: State, privates: list[State]) -> dict[str, torch.Tensor]:
        """The engine's store: the global CNN (1, ...)."""
        return {k: t.unsqueeze(0) for k, t in shared.items()}

    def received(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CNN each sampled client starts from: the global one, (N, ...)."""
        return {k: t.expand(len(idx), *t.shape[1:]).clone() for k, t in self.params.items()}

    def aggregate(self, idx: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Upload the whole model; the server averages it by data size.  The new global model, (N, ...)."""
        self.params = weighted_mean(self.data.weights(idx), params)
        return {k: t.expand(len(idx), *t.shape[1:]) for k, t in self.params.items()}

    def global_state(self) -> State:
        """The server's CNN."""
        return {k: t[0] for k, t in self.params.items()}

    def client_state(self, cid: int) -> State:
        """Nothing: clients keep nothing between rounds."""
        return {}

    def load_states(self, global_state: State, client_states: list[State]) -> None:
        self.params = {k: t.clone() for k, t in self.stored(global_state, client_states).items()}

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        cfg, n = self.cfg, len(sampled)
        idx = torch.tensor(sampled, device=self.data.train_y.device)
        params = self.received(idx)
        sgd = StackedSGD(list(params.values()), cfg.lr, cfg.momentum, cfg.weight_decay)
        poisson = range(cfg.local_epochs) if self.privacy is not None and cfg.poisson else ()
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx, range(cfg.local_epochs),
                                 poisson)
        for epoch in progress(range(cfg.local_epochs)):
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for step, batch in enumerate(schedule.batches(epoch)):
                if self.privacy is not None:
                    with torch.no_grad():
                        losses = client_losses(cnn_logits(batch.x, params, self.spec), batch)
                    grads = private_step_grads(self.spec, params, list(params), batch.x, batch.y, batch.valid, cfg,
                                               self.privacy, sampled, round_idx, epoch, step)
                    sgd.step(grads, batch.active)
                else:
                    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
                    losses = client_losses(model_logits(batch.x, leaves, self.spec), batch)
                    sgd.step(list(torch.autograd.grad(losses.sum(), list(leaves.values()))), batch.active)
                loss_sum += losses.detach() * batch.nonempty
                loss_count += batch.nonempty
        train_loss = loss_sum / loss_count.clamp(min=1)  # (0 if every batch of the epoch was empty)
        chunk = self.spec.eval_chunk
        local_acc = batched_accuracy(self.data, sampled, lambda x: model_logits(x, params, self.spec), chunk)
        global_params = self.aggregate(idx, params)
        global_acc = local_acc if global_params is None else \
            batched_accuracy(self.data, sampled, lambda x: model_logits(x, global_params, self.spec), chunk)
        epsilons = self.privacy.record_round(sampled) if self.privacy is not None else None
        return client_results(sampled, train_loss, local_acc, global_acc, epsilons=epsilons)


class LocalLockstep(CNNLockstep):
    """``local``: every client trains its own CNN, all sampled ones at once; nothing is uploaded."""

    def stored(self, shared: State, privates: list[State]) -> dict[str, torch.Tensor]:
        """Every client's CNN (Nc, ...)."""
        return {k: torch.stack([p[k] for p in privates]) for k in privates[0]}

    def received(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t[idx].clone() for k, t in self.params.items()}  # its own CNN: there is no global one

    def aggregate(self, idx: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        for k, t in params.items():  # nothing leaves a client: each keeps its CNN
            self.params[k][idx] = t

    def global_state(self) -> State:
        return {}

    def client_state(self, cid: int) -> State:
        """Client ``cid``'s private CNN."""
        return {k: t[cid] for k, t in self.params.items()}
