"""FedAvg (McMahan et al., 2017): every client trains the global CNN; the server averages the whole model.

A round, per client: receive the global CNN, train it for ``local_epochs``
epochs (SGD, lr ``lr``), upload all of it; the server averages the uploads
weighted by data size.  Clients keep nothing between rounds.
"""
from __future__ import annotations

from ..federation import accuracy
from .base import ATTACK, ClientUpdate, Method, detached, register
from .full_model import CNNLockstep, cnn_from, init_models, train_full_model


@register
class FedAvg(Method):
    name = "fedavg"
    paper_row = 1
    headline = "global_acc"  # the paper's FedAvg column is its global model
    uploads = "the whole CNN"
    keeps = ""
    supports = frozenset({ATTACK})
    threat = "full-model"
    paper = {  # Table 1
        "emnist": {20: 72.77, 100: 78.87},
        "fmnist": {20: 85.67, 100: 88.11},
        "cifar10": {20: 70.02, 100: 76.24},
        "cinic10": {20: 57.00, 100: 59.11},
    }
    paper_seconds_per_round = 23
    lockstep = CNNLockstep
    runs_on_backbones = True  # Table 2's FedAvg columns (--backbone, --adapters off|on)

    def init_states(self, spec, num_clients, cfg, device):
        (model,) = init_models(spec, 1, device)
        return model, [{} for _ in range(num_clients)]

    def train(self, model, data, cfg, round_idx, noise):
        """Local training of the received CNN; returns the mean loss of the last epoch."""
        return train_full_model(model, data, cfg, round_idx)

    def client_update(self, spec, global_state, private, data, cfg, round_idx, noise=None):
        model = cnn_from(spec, global_state)  # receive the global CNN
        loss = self.train(model, data, cfg, round_idx, noise)
        return ClientUpdate(detached(model), {}, loss, accuracy(model, data.test_x, data.test_y, spec.eval_chunk))

    def predict(self, spec, global_state, private):
        return cnn_from(spec, global_state, copy=False)
