"""Shared-representation DP methods (PPSGD, CENTAUR): the common part.

The representation (conv layers and fc1) is shared: trained with record-level
DP-SGD, uploaded and averaged by data size.  Each client's classifier (fc2)
is private, trained without noise, and never leaves it.  The methods differ
only in their local schedule, which each declares once
(:attr:`RepresentationDP.classifier_epoch_first`) and both engines follow:
CENTAUR trains the classifier for one epoch first, PPSGD steps it before
every DP-SGD step.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F

from ..config import Config
from ..dp import ClientNoise, dp_batches, dp_sgd_step, expected_batch_size
from ..engines import Engine
from ..federation import ClientData, ClientResult, accuracy
from ..lockstep.data import Batch, RoundSchedule, StackedData, weighted_mean
from ..lockstep.dp_step import private_step_grads
from ..lockstep.evaluation import batched_accuracy, client_losses, client_results, cnn_logits
from ..lockstep.optim import StackedSGD
from ..models import CNNSpec, TargetCNN, init_private_classifiers
from ..ops.sgd import SGD
from .base import ATTACK, POISSON, ClientUpdate, Method, State, detached, mean_loss, record_loss, sgd
from .full_model import cnn_from

CLASSIFIER_KEYS = ("fc2.weight", "fc2.bias")  # private, never uploaded


def classifier_step(model: TargetCNN, optimizer: SGD, x: torch.Tensor, y: torch.Tensor) -> None:
    """A non-private SGD step of the classifier alone (``optimizer`` holds only its parameters)."""
    if len(y):  # (an empty Poisson batch has nothing to train on)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def private_representation_step(model: TargetCNN, optimizer: SGD, x, y, cfg: Config,
                                noise: ClientNoise, data: ClientData, round_idx: int, epoch: int, step: int) -> None:
    """A DP-SGD step of the representation (``optimizer``'s parameters) with the client's noise."""
    features = [p for group in optimizer.param_groups for p in group["params"]]
    dp_sgd_step(model, features, optimizer, x, y, cfg.dp_clip, noise.sigma, noise.generator(round_idx, epoch, step,
                                                                                               x.device),
                expected_batch_size(cfg, data.num_train) if cfg.poisson else None, noise.sample)


class RepresentationDPLockstep(Engine):
    """``ppsgd`` and ``centaur`` in lockstep: the results of :meth:`RepresentationDP.client_update`, client by client.

    The global representation (conv layers and fc1) is stacked (N, ...) for the
    round's clients; each client's private classifier (Nc, K, D) stays in this
    engine's store.  DP-SGD steps take every sample's gradient of the
    representation at once, with the classifier frozen.
    """

    def __init__(self, method: Method, spec: CNNSpec, clients: list[ClientData], cfg: Config,
                 device: torch.device):
        super().__init__(method, spec, clients, cfg)
        self.data = StackedData(clients)
        shared, privates = method.init_states(spec, len(clients), cfg, device)
        self.representation = {k: t.unsqueeze(0) for k, t in shared.items()}  # (1, ...)
        # private, never uploaded: (Nc, K, D), (Nc, K)
        self.classifier = {k: torch.stack([p[k] for p in privates]) for k in CLASSIFIER_KEYS}

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        cfg, n = self.cfg, len(sampled)
        idx = torch.tensor(sampled, device=self.data.train_y.device)
        features = {k: t.expand(n, *t.shape[1:]).clone() for k, t in self.representation.items()}
        head = {k: t[idx].clone() for k, t in self.classifier.items()}
        classifier_sgd = StackedSGD(list(head.values()), cfg.classifier_lr, cfg.momentum, cfg.weight_decay)
        feature_sgd = StackedSGD(list(features.values()), cfg.lr, cfg.momentum, cfg.weight_decay)
        first = self.method.classifier_epoch_first
        epochs = self.method.private_epochs(cfg)
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx,
                                 range(cfg.local_epochs + 1) if first else epochs, epochs if cfg.poisson else ())

        def classifier_step(batch: Batch) -> None:
            leaves = {k: t.clone().requires_grad_() for k, t in head.items()}
            losses = client_losses(cnn_logits(batch.x, {**features, **leaves}, self.spec), batch)
            classifier_sgd.step(list(torch.autograd.grad(losses.sum(), list(leaves.values()))), batch.nonempty)

        if first:  # the classifier epoch, on the received representation
            for batch in schedule.batches(0):
                classifier_step(batch)
        for epoch in progress(epochs):
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for step, batch in enumerate(schedule.batches(epoch)):
                with torch.no_grad():
                    losses = client_losses(cnn_logits(batch.x, {**features, **head}, self.spec), batch)
                if not first:
                    classifier_step(batch)
                grads = private_step_grads(self.spec, {**features, **head}, list(features), batch.x, batch.y,
                                           batch.valid, cfg, self.privacy, sampled, round_idx, epoch, step)
                feature_sgd.step(grads, batch.active)
                loss_sum += losses * batch.nonempty
                loss_count += batch.nonempty
        train_loss = loss_sum / loss_count.clamp(min=1)  # (0 if every batch of the epoch was empty)
        local_acc = batched_accuracy(self.data, sampled, lambda x: cnn_logits(x, {**features, **head}, self.spec))

        # upload the representation only; the server averages it by data size; classifiers stay private
        self.representation = weighted_mean(self.data.weights(idx), features)
        for k, t in head.items():
            self.classifier[k][idx] = t
        shared = {k: t.expand(n, *t.shape[1:]) for k, t in self.representation.items()}
        global_acc = batched_accuracy(self.data, sampled, lambda x: cnn_logits(x, {**shared, **head}, self.spec))
        return client_results(sampled, train_loss, local_acc, global_acc, epsilons=self.privacy.record_round(sampled))

    def global_state(self) -> State:
        """The server's representation (conv layers and fc1)."""
        return {k: t[0] for k, t in self.representation.items()}

    def client_state(self, cid: int) -> State:
        """Client ``cid``'s private classifier."""
        return {k: t[cid] for k, t in self.classifier.items()}

    def load_states(self, global_state: State, client_states: list[State]) -> None:
        self.representation = {k: t.unsqueeze(0).clone() for k, t in global_state.items()}
        self.classifier = {k: torch.stack([c[k] for c in client_states]) for k in CLASSIFIER_KEYS}


class RepresentationDP(Method):
    """PPSGD and CENTAUR: what they share (state, upload, aggregation, local training); each declares its
    schedule with ``classifier_epoch_first``."""

    # True (CENTAUR): one non-private classifier epoch (epoch 0), then DP-SGD epochs 1..local_epochs with the
    # classifier frozen; False (PPSGD): DP-SGD epochs 0..local_epochs-1, a classifier step before each DP step
    classifier_epoch_first: ClassVar[bool]
    headline = "local_acc"
    uploads = "the representation (conv layers and fc1), trained with DP-SGD"
    keeps = "its classifier"
    dp = True
    supports = frozenset({POISSON, ATTACK})
    threat = "dp-representation"
    step_flags = ("lr", "classifier_lr", "dp_clip")
    dp_guarantee = ("the representation's DP-SGD steps given the classifier, as the authors report it; not a "
                    "record-level guarantee for the client's data (the classifier trains on the same records "
                    "without noise)")
    lockstep = RepresentationDPLockstep

    def init_states(self, spec, num_clients, cfg, device):
        model = TargetCNN(spec).to(device)  # the global representation (its fc2 only seeds the classifiers)
        classifiers = init_private_classifiers(model, num_clients, shared=cfg.client_init == "shared")
        representation = {k: t for k, t in detached(model).items() if k not in CLASSIFIER_KEYS}
        return representation, [detached(c, "fc2.") for c in classifiers]

    def private_epochs(self, cfg: Config) -> range:
        """The epochs (as the schedule numbers them, for the keyed draws) of DP-SGD steps."""
        return range(1, cfg.local_epochs + 1) if self.classifier_epoch_first else range(cfg.local_epochs)

    def train(self, model: TargetCNN, data: ClientData, cfg: Config, round_idx: int, noise: ClientNoise) -> float:
        """Local training of the received representation and the private classifier; the last epoch's mean loss."""
        classifier_sgd, feature_sgd = self.optimizers(model, cfg)
        if self.classifier_epoch_first:  # the classifier epoch (not private), on the received representation
            for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, 0):
                classifier_step(model, classifier_sgd, x, y)
        for epoch in self.private_epochs(cfg):
            losses = []
            for step, (x, y) in enumerate(dp_batches(data, cfg, round_idx, epoch)):
                record_loss(losses, model, x, y)
                if not self.classifier_epoch_first:
                    classifier_step(model, classifier_sgd, x, y)
                private_representation_step(model, feature_sgd, x, y, cfg, noise, data, round_idx, epoch, step)
        return mean_loss(losses)

    def optimizers(self, model: TargetCNN, cfg: Config) -> tuple[SGD, SGD]:
        """(classifier SGD at ``classifier_lr``, representation SGD at ``lr``)."""
        features = [p for name, p in model.named_parameters() if name not in CLASSIFIER_KEYS]
        return sgd(model.fc2.parameters(), cfg, cfg.classifier_lr), sgd(features, cfg, cfg.lr)

    def client_update(self, spec, global_state, private, data, cfg, round_idx, noise=None):
        model = cnn_from(spec, {**global_state, **private})  # the global representation, the own classifier
        loss = self.train(model, data, cfg, round_idx, noise)
        state = detached(model)
        upload = {k: t for k, t in state.items() if k not in CLASSIFIER_KEYS}  # the representation only
        private = {k: state[k] for k in CLASSIFIER_KEYS}
        return ClientUpdate(upload, private, loss, accuracy(model, data.test_x, data.test_y))

    def predict(self, spec, global_state, private):
        return cnn_from(spec, {**global_state, **private}, copy=False)
