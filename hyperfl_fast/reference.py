"""Reference engine: plain per-client PyTorch, one client after another.

This is the project's correctness oracle.  It is deliberately simple and is
not optimised: every fast path is checked against it.

Each method is a server holding the global state plus every client's private
state, with one ``run_round`` that reads like the paper's algorithm box:
sample clients -> local training -> upload -> aggregate.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .config import Config
from .dp import ClientPrivacy, noise_generator
from .federation import ClientData, ClientResult, accuracy, weighted_average
from .models import (CNNSpec, GeneratedCNN, HyperNetwork, TargetCNN, init_hyperfl, init_private_classifiers,
                     init_target_cnns)


def sgd(params, cfg: Config, lr: float) -> torch.optim.SGD:
    """The paper's optimizer: SGD with momentum and weight decay, fresh state each round."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- HyperFL

def hypernet_step(model: GeneratedCNN, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  grad_clip: float) -> float:
    """One hypernetwork-phase step: loss -> theta -> (psi, v) by the chain rule, clip, SGD.

    The gradient norm is clipped separately for the hypernetwork and for the
    embedding.  The classifier is not updated (it is not in ``optimizer``).
    """
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.hypernet.parameters(), grad_clip)
    torch.nn.utils.clip_grad_norm_([model.embedding], grad_clip)
    optimizer.step()
    return loss.item()


def train_hyperfl_client(model: GeneratedCNN, data: ClientData, cfg: Config, round_idx: int) -> float:
    """A HyperFL client's local training; returns the mean loss of its last epoch."""
    # 1. classifier phase: theta_i is generated but not trained
    with torch.no_grad():
        theta = model.generate()  # (P,)
    optimizer = sgd(model.classifier.parameters(), cfg, cfg.classifier_lr)
    losses = []
    for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, epoch=0):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x, theta), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    # 2. hypernetwork phase: psi and v_i are trained, the classifier is frozen
    optimizer = sgd([{"params": model.hypernet.parameters()}, {"params": [model.embedding]}], cfg, cfg.lr)
    model.classifier.requires_grad_(False)
    for epoch in range(1, cfg.local_epochs + 1):
        losses = [hypernet_step(model, optimizer, x, y, cfg.grad_clip)
                  for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)]
    model.classifier.requires_grad_(True)
    return sum(losses) / len(losses)


class HyperFLReference:
    """HyperFL: only the hypernetwork psi is shared; embeddings v_i and classifiers phi_i stay private."""

    method = "hyperfl"
    progress_unit = "client"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.clients, self.cfg = spec, clients, cfg
        # the global hypernetwork, and each client's private state (never uploaded)
        self.hypernet, self.client_embeddings, self.classifiers = init_hyperfl(
            spec, len(clients), cfg.embed_dim, cfg.hidden_dim, device, shared=cfg.client_init == "shared")

    def client_model(self, cid: int, hypernet: HyperNetwork) -> GeneratedCNN:
        return GeneratedCNN(self.spec, hypernet, self.client_embeddings[cid], self.classifiers[cid])

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        uploads, weights, local = [], [], []
        for cid in progress(sampled):
            model = self.client_model(cid, copy.deepcopy(self.hypernet))  # receive the global psi
            loss = train_hyperfl_client(model, self.clients[cid], self.cfg, round_idx)
            local.append((cid, loss, accuracy(model, self.clients[cid].test_x, self.clients[cid].test_y)))
            uploads.append(model.upload())  # hypernetwork tensors only
            weights.append(self.clients[cid].num_train)
        self.hypernet.load_state_dict(weighted_average(uploads, weights))
        return [ClientResult(cid, loss, acc, self.global_accuracy(cid)) for cid, loss, acc in local]

    def global_accuracy(self, cid: int) -> float:
        """Client ``cid``'s test accuracy with the global hypernetwork and its private parts."""
        data = self.clients[cid]
        return accuracy(self.client_model(cid, self.hypernet), data.test_x, data.test_y)

    def state_dict(self) -> dict:
        return {"hypernet": self.hypernet.state_dict(),
                "client_embeddings": torch.stack([v.detach() for v in self.client_embeddings]),
                "classifiers": [c.state_dict() for c in self.classifiers]}

    def load_state_dict(self, state: dict) -> None:
        self.hypernet.load_state_dict(state["hypernet"])
        with torch.no_grad():
            for v, saved in zip(self.client_embeddings, state["client_embeddings"]):
                v.copy_(saved)
        for c, saved in zip(self.classifiers, state["classifiers"]):
            c.load_state_dict(saved)


# --------------------------------------------------------------------------- baselines

def train_full_model(model: TargetCNN, data: ClientData, cfg: Config, round_idx: int) -> float:
    """Train the whole CNN for ``local_epochs`` epochs; returns the mean loss of the last epoch."""
    optimizer = sgd(model.parameters(), cfg, cfg.lr)
    for epoch in range(cfg.local_epochs):
        losses = []
        for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


class LocalReference:
    """Local-only: every client trains its own full CNN; nothing is shared."""

    method = "local"
    progress_unit = "client"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.clients, self.cfg = spec, clients, cfg
        self.models = init_target_cnns(spec, len(clients), device, shared=cfg.client_init == "shared")

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        results = []
        for cid in progress(sampled):
            data = self.clients[cid]
            loss = train_full_model(self.models[cid], data, self.cfg, round_idx)
            acc = accuracy(self.models[cid], data.test_x, data.test_y)
            results.append(ClientResult(cid, loss, acc, acc))  # no global model: both figures are local
        return results

    def state_dict(self) -> dict:
        return {"models": [m.state_dict() for m in self.models]}

    def load_state_dict(self, state: dict) -> None:
        for m, saved in zip(self.models, state["models"]):
            m.load_state_dict(saved)


class FedAvgReference:
    """FedAvg: every client trains the global CNN; the server averages the whole model."""

    method = "fedavg"
    progress_unit = "client"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.clients, self.cfg = spec, clients, cfg
        self.model = TargetCNN(spec).to(device)

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        uploads, weights, local = [], [], []
        for cid in progress(sampled):
            data = self.clients[cid]
            model = copy.deepcopy(self.model)  # receive the global model
            loss = self.train_client(model, cid, round_idx)
            local.append((cid, loss, accuracy(model, data.test_x, data.test_y)))
            uploads.append({k: t.detach().clone() for k, t in model.state_dict().items()})
            weights.append(data.num_train)
        self.model.load_state_dict(weighted_average(uploads, weights))
        return [ClientResult(cid, loss, acc, accuracy(self.model, self.clients[cid].test_x, self.clients[cid].test_y))
                for cid, loss, acc in local]

    def train_client(self, model: TargetCNN, cid: int, round_idx: int) -> float:
        """Local training of one client's copy of the global model; returns its last epoch's mean loss."""
        return train_full_model(model, self.clients[cid], self.cfg, round_idx)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])


# --------------------------------------------------------------------------- DP baselines

def dp_sgd_step(model: TargetCNN, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, clip: float, sigma: float, generator: torch.Generator) -> None:
    """One record-level DP-SGD step on ``params`` the authors' way: a backward pass per sample, each gradient
    clipped to ``clip``, their sum plus N(0, (sigma clip)^2) noise divided by the batch size, then the step."""
    total = [torch.zeros_like(p) for p in params]
    for xi, yi in zip(x, y):
        grads = torch.autograd.grad(F.cross_entropy(model(xi[None]), yi[None]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)
        for t, g in zip(total, grads):
            t.add_(g * scale)
    for p, t in zip(params, total):
        p.grad = (t + sigma * clip * torch.randn(t.shape, generator=generator).to(t)) / len(y)
    optimizer.step()


class DPFedAvgReference(FedAvgReference):
    """DP-FedAvg: FedAvg whose clients train the whole CNN with record-level DP-SGD and upload it."""

    method = "dp-fedavg"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        super().__init__(spec, clients, cfg, device)
        self.privacy = ClientPrivacy([c.num_train for c in clients], cfg.batch_size, cfg.epsilon, cfg.delta,
                                     cfg.rounds, cfg.local_epochs)

    def train_client(self, model: TargetCNN, cid: int, round_idx: int) -> float:
        cfg, data = self.cfg, self.clients[cid]
        optimizer = sgd(model.parameters(), cfg, cfg.lr)
        for epoch in range(cfg.local_epochs):
            losses = []
            for step, (x, y) in enumerate(data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)):
                with torch.no_grad():
                    losses.append(F.cross_entropy(model(x), y).item())
                dp_sgd_step(model, list(model.parameters()), optimizer, x, y, cfg.dp_clip, self.privacy.sigmas[cid],
                            noise_generator(cfg.seed, round_idx, cid, epoch, step))
        return sum(losses) / len(losses)

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        results = super().run_round(round_idx, sampled, progress)
        for result, epsilon in zip(results, self.privacy.record_round(sampled)):
            result.epsilon = epsilon
        return results

    def state_dict(self) -> dict:
        return {**super().state_dict(), "privacy": self.privacy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.privacy.load_state_dict(state["privacy"])


def classifier_step(model: TargetCNN, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """A non-private SGD step of the classifier alone (``optimizer`` holds only its parameters)."""
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


class RepresentationDPReference:
    """PPSGD and CENTAUR: a shared representation trained with DP-SGD, a private classifier per client.

    - ``ppsgd``: at every batch a non-private classifier step (lr ``classifier_lr``),
      then a DP-SGD step of the representation;
    - ``centaur``: one non-private classifier epoch, then ``local_epochs`` of
      DP-SGD on the representation with the classifier frozen.
    Only the representation (conv layers and fc1) is uploaded and averaged.
    """

    progress_unit = "client"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.clients, self.cfg, self.method = spec, clients, cfg, cfg.method
        self.model = TargetCNN(spec).to(device)  # the global representation (its fc2 is never used)
        self.classifiers = init_private_classifiers(self.model, len(clients), shared=cfg.client_init == "shared")
        self.privacy = ClientPrivacy([c.num_train for c in clients], cfg.batch_size, cfg.epsilon, cfg.delta,
                                     cfg.rounds, cfg.local_epochs)
        self.feature_keys = [name for name, _ in spec.feature_shapes()]

    def client_model(self, cid: int, representation: TargetCNN) -> TargetCNN:
        model = copy.deepcopy(representation)
        model.fc2.load_state_dict(self.classifiers[cid].state_dict())
        return model

    def train_client(self, model: TargetCNN, cid: int, round_idx: int) -> float:
        cfg, data = self.cfg, self.clients[cid]
        features = [p for name, p in model.named_parameters() if name in self.feature_keys]
        classifier_sgd = sgd(model.fc2.parameters(), cfg, cfg.classifier_lr)
        feature_sgd = sgd(features, cfg, cfg.lr)
        sigma = self.privacy.sigmas[cid]
        if self.method == "centaur":  # the classifier epoch, on the received representation
            for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, 0):
                classifier_step(model, classifier_sgd, x, y)
        epochs = range(1, cfg.local_epochs + 1) if self.method == "centaur" else range(cfg.local_epochs)
        for epoch in epochs:
            losses = []
            for step, (x, y) in enumerate(data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)):
                with torch.no_grad():
                    losses.append(F.cross_entropy(model(x), y).item())
                if self.method == "ppsgd":
                    classifier_step(model, classifier_sgd, x, y)
                dp_sgd_step(model, features, feature_sgd, x, y, cfg.dp_clip, sigma,
                            noise_generator(cfg.seed, round_idx, cid, epoch, step))
        return sum(losses) / len(losses)

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        uploads, weights, local = [], [], []
        for cid in progress(sampled):
            data = self.clients[cid]
            model = self.client_model(cid, self.model)  # the global representation, the private classifier
            loss = self.train_client(model, cid, round_idx)
            local.append((cid, loss, accuracy(model, data.test_x, data.test_y)))
            self.classifiers[cid].load_state_dict(model.fc2.state_dict())  # stays with the client
            uploads.append({k: t.detach().clone() for k, t in model.state_dict().items() if k in self.feature_keys})
            weights.append(data.num_train)
        self.model.load_state_dict(weighted_average(uploads, weights), strict=False)
        epsilons = self.privacy.record_round(sampled)
        return [ClientResult(cid, loss, acc, accuracy(self.client_model(cid, self.model), self.clients[cid].test_x,
                                                      self.clients[cid].test_y), eps)
                for (cid, loss, acc), eps in zip(local, epsilons)]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "classifiers": [c.state_dict() for c in self.classifiers],
                "privacy": self.privacy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for classifier, saved in zip(self.classifiers, state["classifiers"]):
            classifier.load_state_dict(saved)
        self.privacy.load_state_dict(state["privacy"])


ENGINES = {"hyperfl": HyperFLReference, "fedavg": FedAvgReference, "local": LocalReference,
           "dp-fedavg": DPFedAvgReference, "ppsgd": RepresentationDPReference, "centaur": RepresentationDPReference}


def build_reference(spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
    """The reference engine for ``cfg.method``; seeds model initialisation with ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return ENGINES[cfg.method](spec, clients, cfg, device)
