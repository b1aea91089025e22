"""HyperFL-LPM (Guo et al., AAAI 2025, the paper's second framework): HyperFL for large pre-trained models.

The backbone (ResNet-18 or ViT-S/16, :mod:`hyperfl_fast.backbones`) is frozen and shared; the hypernetwork
generates each client's adapters theta_i = h(v_i; psi) from its private embedding v_i, and each client keeps a
private head.  A round, per client (the authors' ``resnet/`` and ``vit/`` code):

1. receive the global psi;
2. head phase: one epoch of SGD on the head (lr ``classifier_lr``, 0.1) with theta_i generated once and frozen;
3. hypernetwork phase: ``local_epochs`` epochs of SGD on (psi, v_i) through the adapters, the gradient norms of
   psi and of v_i each clipped to ``grad_clip``; the head frozen;
4. upload psi; the server averages the uploads weighted by data size.

The client's private state: its embedding and its head.  Deviations from the authors' code are listed in
:mod:`hyperfl_fast.backbones` and the README; here: the ResNet head's ``Linear(512, 128)`` is trained with the
classifier in the head phase (the authors' HyperFL-LPM puts it in no optimizer while their baselines train it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..backbones import LPMSpec, batched_logits, client_logits, init_backbone_model
from ..engines import Engine
from ..federation import accuracy
from ..lockstep.data import RoundSchedule, StackedData
from ..lockstep.evaluation import batched_accuracy, client_losses, client_results
from ..lockstep.hypernet import LockstepHypernetwork
from ..lockstep.optim import StackedSGD
from ..models import HyperNetwork, split_flat
from .base import ATTACK, ClientUpdate, Method, State, detached, register, sgd
from .hyperfl import hypernet_from, hypernet_step


class LPMClient(nn.Module):
    """One client's HyperFL-LPM model: the shared frozen backbone, the hypernetwork, and the client's embedding
    and head.  Only :attr:`hypernet` ever leaves the client."""

    def __init__(self, spec: LPMSpec, hypernet: HyperNetwork, private: State, copy: bool = True):
        super().__init__()
        self.spec, self.hypernet = spec, hypernet
        own = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
        self.embedding = nn.Parameter(own(private["embedding"]))
        self.head = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(own(private[k]))
                                      for k, _ in spec.head_shapes()})

    def head_tensors(self) -> State:
        return {k: self.head[k.replace(".", "_")] for k, _ in self.spec.head_shapes()}

    def generate(self) -> torch.Tensor:
        """theta_i = h(v_i; psi): the adapters, flat (P,)."""
        return self.hypernet(self.embedding)

    def forward(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``x`` (B, C, H, W); pass ``theta`` to reuse adapters generated earlier."""
        adapters = split_flat(self.generate() if theta is None else theta, self.spec.adapter_shapes())
        return client_logits(x, adapters, self.head_tensors(), self.spec)

    def private(self) -> State:
        return {"embedding": self.embedding.detach().clone(),
                **{k: t.detach().clone() for k, t in self.head_tensors().items()}}


def train_lpm_client(model: LPMClient, data, cfg, round_idx: int) -> float:
    """Steps 2 and 3 of a client's round; returns the mean loss of its last epoch."""
    with torch.no_grad():
        theta = model.generate()  # (P,)
    optimizer = sgd(model.head.parameters(), cfg, cfg.classifier_lr)
    for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, epoch=0):
        optimizer.zero_grad()
        F.cross_entropy(model(x, theta), y).backward()
        optimizer.step()

    optimizer = sgd([{"params": model.hypernet.parameters()}, {"params": [model.embedding]}], cfg, cfg.lr)
    model.head.requires_grad_(False)
    for epoch in range(1, cfg.local_epochs + 1):
        losses = [hypernet_step(model, optimizer, x, y, cfg.grad_clip)  # HyperFL's step: psi and v clipped apart
                  for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)]
    model.head.requires_grad_(True)
    return sum(losses) / len(losses)


class HyperFLLPMLockstep(Engine):
    """HyperFL-LPM with every sampled client at once: one generation call gives every client its adapters, the
    frozen backbone runs once per step over all clients' batches, and each client's adapters are applied as
    per-client batched ops (:func:`hyperfl_fast.backbones.batched_adapt`).  psi_n and v_n train in
    :class:`LockstepHypernetwork`, as in HyperFL's lockstep engine."""

    def __init__(self, method: Method, spec: LPMSpec, clients, cfg, device: torch.device):
        super().__init__(method, spec, clients, cfg)
        self.data = StackedData(clients)
        psi, privates = method.init_states(spec, len(clients), cfg, device)
        self.hypernet = hypernet_from(psi)  # the global psi
        self.private = {k: torch.stack([p[k] for p in privates]) for k in privates[0]}  # every client's, (Nc, ...)
        largest = max(c.num_train for c in clients)
        self.capacity = -(-largest // min(cfg.batch_size, largest)) * cfg.local_epochs
        self.hypernet_n: LockstepHypernetwork | None = None  # the sampled clients' psi_n (round_hypernetwork)

    def round_hypernetwork(self, n: int) -> LockstepHypernetwork:
        """psi_n for ``n`` sampled clients: allocated at the first round with n (its factors hold capacity x P
        values per client, gigabytes for ResNet-18's adapters) and reset by ``start`` every round."""
        if self.hypernet_n is None or self.hypernet_n.fc_w.shape[0] != n:
            self.hypernet_n = LockstepHypernetwork(n, self.cfg.embed_dim, self.cfg.hidden_dim,
                                                   self.spec.num_feature_params, self.capacity,
                                                   self.hypernet.fc.weight.device, self.hypernet.fc.weight.dtype)
        return self.hypernet_n

    def logits(self, x: torch.Tensor, theta: torch.Tensor, head: State) -> torch.Tensor:
        """Every client's logits: x (N, B, C, H, W), theta (N, P) -> (N, B, classes)."""
        return batched_logits(x, split_flat(theta, self.spec.adapter_shapes()), head, self.spec)

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list:
        cfg, spec = self.cfg, self.spec
        idx = torch.tensor(sampled, device=self.private["embedding"].device)
        psi = {k: t.detach() for k, t in self.hypernet.state_dict().items()}
        embedding = self.private["embedding"][idx]  # (N, E), trained in place
        head = {k: self.private[k][idx] for k, _ in spec.head_shapes()}
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx, range(cfg.local_epochs + 1))

        # 2. head phase: every client's adapters from the received psi in one generation call, frozen
        theta = ops.generate_weights(embedding, psi["fc.weight"], psi["fc.bias"], psi["heads.weight"],
                                     psi["heads.bias"])  # (N, P)
        head_sgd = StackedSGD(list(head.values()), cfg.classifier_lr, cfg.momentum, cfg.weight_decay)
        for t in head.values():
            t.requires_grad_()
        for batch in schedule.batches(0):
            losses = client_losses(self.logits(batch.x, theta, head), batch)
            grads = torch.autograd.grad(losses.sum(), list(head.values()))
            with torch.no_grad():
                head_sgd.step(list(grads), batch.active)
        head = {k: t.detach() for k, t in head.items()}

        # 3. hypernetwork phase: psi_n and v_n in lockstep through the adapters, the head frozen
        hypernet = self.round_hypernetwork(len(sampled))
        hypernet.start(psi)
        for epoch in progress(range(1, cfg.local_epochs + 1)):
            hypernet.new_epoch()
            for batch in schedule.batches(epoch):
                theta, hidden = hypernet.generate(embedding)
                theta.requires_grad_()
                losses = client_losses(self.logits(batch.x, theta, head), batch)
                (d_theta,) = torch.autograd.grad(losses, theta, hypernet.ones)
                hypernet.sgd_step(d_theta, hidden, embedding, losses.detach(), batch.active, cfg.lr, cfg.momentum,
                                  cfg.weight_decay, cfg.grad_clip)
        train_loss = hypernet.mean_loss()

        with torch.no_grad():
            local_theta, _ = hypernet.generate(embedding)
        local_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, local_theta, head),
                                     chunk=spec.eval_chunk)

        # 4. upload psi_n; the server's new psi is their weighted mean (nothing else leaves a client)
        self.hypernet.load_state_dict(hypernet.weighted_sum(self.data.weights(idx)))
        self.private["embedding"][idx] = embedding
        for k, t in head.items():
            self.private[k][idx] = t
        return client_results(sampled, train_loss, local_acc, self.global_accuracy(sampled))

    @torch.no_grad()
    def global_accuracy(self, cids: list[int]) -> torch.Tensor:
        """Clients' test accuracy with the global psi and their private parts: (N,)."""
        idx = torch.tensor(cids, device=self.private["embedding"].device)
        hn = self.hypernet
        theta = ops.generate_weights(self.private["embedding"][idx], hn.fc.weight, hn.fc.bias, hn.heads.weight,
                                     hn.heads.bias)
        head = {k: self.private[k][idx] for k, _ in self.spec.head_shapes()}
        return batched_accuracy(self.data, cids, lambda x: self.logits(x, theta, head),
                                chunk=self.spec.eval_chunk)

    def global_state(self) -> State:
        return detached(self.hypernet)

    def client_state(self, cid: int) -> State:
        return {k: t[cid] for k, t in self.private.items()}

    def load_states(self, global_state: State, client_states: list[State]) -> None:
        self.hypernet.load_state_dict(global_state)
        for k, t in self.private.items():
            t.copy_(torch.stack([c[k] for c in client_states]))


# The paper's Table 2 (accuracy %, 20 clients): per (dataset, backbone), its columns in order.  dagger: a fixed
# backbone (--adapters off), double dagger: adapters fine-tuned (--adapters on); (method, --adapters) per column.
TABLE_2_COLUMNS = {"Local†": ("local", "off"), "Local††": ("local", "on"), "FedAvg†": ("fedavg", "off"),
                   "FedAvg††": ("fedavg", "on"), "HyperFL-LPM": ("hyperfl-lpm", None)}
TABLE_2 = {
    ("emnist", "resnet18"): (72.83, 80.35, 68.99, 75.21, 80.32),
    ("emnist", "vit-s16"): (76.95, 80.04, 70.92, 76.42, 79.92),
    ("cifar10", "resnet18"): (68.57, 73.57, 62.35, 75.57, 75.03),
    ("cifar10", "vit-s16"): (91.82, 89.70, 92.32, 95.56, 95.40),
}


@register
class HyperFLLPM(Method):
    name = "hyperfl-lpm"
    paper_row = 8  # after Table 1's rows: its figures are the paper's Table 2 (TABLE_2)
    headline = "local_acc"
    uploads = "the hypernetwork"
    keeps = "its embedding and head"
    needs_backbone = runs_on_backbones = True
    supports = frozenset({ATTACK})
    threat = "lpm-hypernetwork"
    step_flags = ("lr", "classifier_lr", "grad_clip")
    lockstep = HyperFLLPMLockstep

    def init_states(self, spec: LPMSpec, num_clients, cfg, device):
        """psi, then per client (one draw for all with the shared start, as the authors' deep copies): the head
        (PyTorch's default init) and the embedding (N(0, 1), as ``nn.Embedding``)."""
        hypernet = HyperNetwork(cfg.embed_dim, cfg.hidden_dim, spec.num_feature_params).to(device)
        head_only = dataclasses.replace(spec, adapters=False)  # (the adapters are generated)
        draws = [{**{k: t.to(device) for k, t in init_backbone_model(head_only).items()},
                  "embedding": torch.randn(cfg.embed_dim).to(device)}
                 for _ in range(1 if cfg.client_init == "shared" else num_clients)]
        privates = [{k: t.clone() for k, t in draws[0 if len(draws) == 1 else c].items()} for c in range(num_clients)]
        return detached(hypernet), privates

    def client_update(self, spec, global_state, private, data, cfg, round_idx, noise=None):
        model = LPMClient(spec, hypernet_from(global_state), private)  # 1. receive the global psi
        loss = train_lpm_client(model, data, cfg, round_idx)  # 2., 3.
        upload = {k: t.detach().clone() for k, t in model.hypernet.state_dict().items()}
        return ClientUpdate(upload, model.private(), loss, accuracy(model, data.test_x, data.test_y,
                                                                    chunk=spec.eval_chunk))  # 4.

    def predict(self, spec, global_state, private):
        return LPMClient(spec, hypernet_from(global_state, copy=False), private, copy=False).eval()
