"""The launches a paper-scale HyperFL step makes, at its real shapes, on ``meta`` tensors (for :mod:`.report`).

Shapes are the paper's: N = 20 clients, B = 50 samples, embedding 64, hidden 128, the factored heads at their
full span (12 steps x 5 epochs = 60 slots), and the two target CNNs (``tests/test_kernel_report.py`` checks
these layer shapes against :func:`hyperfl_fast.models.cnn_spec`).  Nothing runs: the launchers are called
inside :func:`.launch.recording`, which keeps their arguments.
"""
from __future__ import annotations

import torch

from . import classifier, conv, factored, generate, head_sgd, hypernet_sgd
from .linear import BatchedLinear

N, B, E, H, K, SLOTS = 20, 50, 64, 128, 10, 60
LEAKY = 0.01
# (in_channels, image size, convs (C, Cout, k, padding), fc1 input features)
MODELS = {
    "fmnist": (1, 28, ((1, 16, 5, 0), (16, 32, 5, 1)), 800),
    "cifar": (3, 32, ((3, 16, 5, 0), (16, 32, 5, 1), (32, 64, 3, 1)), 576),
}


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def num_params(model: str) -> int:
    """P: the length of the model's flat theta."""
    _, _, convs, flat = MODELS[model]
    return sum(cout * c * k * k + cout for c, cout, k, _ in convs) + H * flat + H


def cnn_stack(model: str, precision: str) -> None:
    """Every conv layer forward (with and without saving codes) and backward (dW; dx except the first layer)."""
    channels, size, convs, _ = MODELS[model]
    for i, (c, cout, k, pad) in enumerate(convs):
        x = meta(N, B, c, size, size)
        w, b = meta(N, cout, c, k, k), meta(N, cout)
        for save in (False, True):  # the codes of the second serve the backward
            y, code = conv.conv_pool_forward(x, w, b, pad, LEAKY, precision, save_code=save)
        conv.conv_pool_weight_grad(x, y, code, cout, k, pad, LEAKY, precision)
        if i:
            conv.conv_pool_input_grad(y, code, w, x.shape, pad, LEAKY, precision)
        size = y.shape[-1]


def fc_and_classifier(model: str, precision: str) -> None:
    """fc1 (leaky) forward and backward, the classifier loss both ways, and the classifier's SGD step."""
    _, _, _, flat = MODELS[model]
    x, w, b = meta(N, B, flat), meta(N, H, flat), meta(N, H)
    y = BatchedLinear.forward(_Ctx(), x, w, b, LEAKY, precision)
    ctx = _Ctx(x, w, y, slope=LEAKY, precision=precision)
    BatchedLinear.backward(ctx, meta(N, B, H))
    feats, cw, cb = meta(N, B, H), meta(N, K, H), meta(N, K)
    labels, valid, active = meta(N, B, dtype=torch.int64), meta(N, B, dtype=torch.bool), meta(N, dtype=torch.bool)
    loss, lse = classifier.classifier_loss_forward(feats, cw, cb, labels, valid, precision)
    classifier.classifier_loss_backward(feats, cw, cb, labels, valid, lse, loss, True, False, precision)
    classifier.classifier_loss_backward(feats, cw, cb, labels, valid, lse, loss, True, True, precision)
    classifier.classifier_sgd_step(feats, cw, cb, labels, valid, active, meta(N, K, H), meta(N, K), 0.1, 0.5, 5e-4,
                                   precision)


def hypernetwork(model: str, precision: str) -> None:
    """The hypernetwork step in factored form at its full span, its updates, and the standalone generation ops."""
    p = num_params(model)
    w0, u, v = meta(p, H), meta(N, SLOTS, p), meta(N, SLOTS, H)
    alpha, beta = meta(N), meta(N, SLOTS)
    emb, fc_w, fc_b, head_b = meta(N, E), meta(N, H, E), meta(N, H), meta(N, p)
    theta, hidden = factored.generate(emb, fc_w, fc_b, head_b, w0, u, v, alpha, beta, SLOTS, precision)
    d_hidden, g_sq = factored.rmatvec(theta, w0, u, v, alpha, beta, SLOTS, precision)
    slot, active = meta(1, dtype=torch.int64), meta(N, dtype=torch.bool)
    hypernet_sgd.client_update(d_hidden, hidden, g_sq, emb, fc_w, fc_b, meta(N, E), meta(N, H, E), meta(N, H), alpha,
                               meta(N), beta, meta(N, SLOTS), v, slot, active, meta(N), meta(N), meta(N), meta(N),
                               0.02, 0.5, 5e-4, 50.0)
    hypernet_sgd.heads_update(theta, meta(N), u, slot, head_b, meta(N, p), active, 0.02, 0.5, 5e-4)
    # generate_weights: shared (one GEMM) and per client (GEMV forward, transposed GEMV and outer product backward)
    generate.bmm(hidden.unsqueeze(0), w0.t().unsqueeze(0), head_b[0].unsqueeze(0), precision=precision)
    generate.gemv(fc_w, emb, fc_b, relu=True)
    heads = meta(N, p, H)
    generate.gemv(heads, hidden, head_b)
    generate.gemv_t(heads, theta)
    generate.outer(theta, hidden)
    head_sgd.head_sgd_step(heads, head_b, meta(N, p, H), meta(N, p), theta, hidden, meta(N), 0.02, 0.5, 5e-4)


class _Ctx:
    """A stand-in for an autograd context, to call a Function's forward and backward directly."""

    def __init__(self, *saved, needs=(True, True, True), **attrs):
        self.saved_tensors, self.needs_input_grad = saved, needs
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


WORKLOADS = {
    "fmnist-cnn": lambda precision: cnn_stack("fmnist", precision),
    "cifar-cnn": lambda precision: cnn_stack("cifar", precision),
    "fmnist-fc": lambda precision: fc_and_classifier("fmnist", precision),
    "cifar-fc": lambda precision: fc_and_classifier("cifar", precision),
    "fmnist-hypernetwork": lambda precision: hypernetwork("fmnist", precision),
    "cifar-hypernetwork": lambda precision: hypernetwork("cifar", precision),
}
