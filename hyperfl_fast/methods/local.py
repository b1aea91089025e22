"""Local training only: every client trains its own CNN and nothing leaves it (the paper's lower bar)."""
from __future__ import annotations

from ..federation import accuracy
from .base import ClientUpdate, Method, detached, register
from .full_model import LocalLockstep, cnn_from, init_models, train_full_model


@register
class Local(Method):
    name = "local"
    paper_row = 0
    headline = "local_acc"
    uploads = ""
    keeps = "its whole CNN"
    paper = {  # Table 1
        "emnist": {20: 73.41, 100: 75.68},
        "fmnist": {20: 85.93, 100: 87.01},
        "cifar10": {20: 65.47, 100: 66.11},
        "cinic10": {20: 63.60, 100: 64.84},
    }
    lockstep = LocalLockstep
    runs_on_backbones = True  # Table 2's Local columns (--backbone, --adapters off|on)

    def init_states(self, spec, num_clients, cfg, device):
        return {}, init_models(spec, num_clients, device, shared=cfg.client_init == "shared")

    def client_update(self, spec, global_state, private, data, cfg, round_idx, noise=None):
        model = cnn_from(spec, private)
        loss = train_full_model(model, data, cfg, round_idx)
        return ClientUpdate({}, detached(model), loss, accuracy(model, data.test_x, data.test_y, spec.eval_chunk))

    def predict(self, spec, global_state, private):
        return cnn_from(spec, private, copy=False)  # no global model: a client's figure is its own model's
