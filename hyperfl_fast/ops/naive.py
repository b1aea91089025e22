"""Readable per-client reference of every fused op: the oracle the fast paths are tested against.

Each function loops over clients and uses plain ``torch.nn.functional`` calls.
Shapes: N clients, B samples per client, E embedding size, H hypernetwork
hidden size, P generated parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import LEAKY_SLOPE


def _client(t: torch.Tensor, n: int, shared_dim: int) -> torch.Tensor:
    """Client n's slice of a per-client tensor, or the tensor itself when it is shared."""
    return t if t.dim() == shared_dim else t[n]


def generate_weights(embeddings, fc_weight, fc_bias, head_weight, head_bias):
    """theta_n = heads(ReLU(fc(v_n))) for every client: (N, E) -> (N, P).

    Weights are shared (fc_weight (H, E), head_weight (P, H)) or per client
    (fc_weight (N, H, E), head_weight (N, P, H)), biases likewise.
    """
    thetas = []
    for n, v in enumerate(embeddings):
        h = F.relu(F.linear(v, _client(fc_weight, n, 2), _client(fc_bias, n, 1)))  # (H,)
        thetas.append(F.linear(h, _client(head_weight, n, 2), _client(head_bias, n, 1)))  # (P,)
    return torch.stack(thetas)


def conv2d_leaky_pool(x, weight, bias, padding: int):
    """Per-client conv2d + bias -> leaky ReLU -> 2x2 max-pool.

    x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> (N, B, Cout, Hp, Wp).
    """
    return torch.stack([
        F.max_pool2d(F.leaky_relu(F.conv2d(x[n], weight[n], bias[n], padding=padding), LEAKY_SLOPE), 2)
        for n in range(x.shape[0])
    ])


def linear(x, weight, bias, leaky: bool = False):
    """Per-client linear (+ optional leaky ReLU): x (N, B, K), weight (N, M, K), bias (N, M) -> (N, B, M)."""
    outs = []
    for n in range(x.shape[0]):
        y = F.linear(x[n], weight[n], bias[n])
        outs.append(F.leaky_relu(y, LEAKY_SLOPE) if leaky else y)
    return torch.stack(outs)


def head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef,
                  lr: float, momentum: float, weight_decay: float) -> None:
    """In place, per client: grad = clip_coef * (d_theta outer hidden); SGD with momentum and weight decay.

    head_weight / weight_buf (N, P, H), head_bias / bias_buf (N, P), d_theta (N, P),
    hidden (N, H), clip_coef (N,).  Buffers start at zero, which matches
    ``torch.optim.SGD``'s first step.  Semantics: ``clip_grad_norm_`` scaled the
    gradient by ``clip_coef``, then ``SGD.step``.
    """
    for n in range(head_weight.shape[0]):
        for param, buf, grad in ((head_weight[n], weight_buf[n], torch.outer(d_theta[n], hidden[n])),
                                 (head_bias[n], bias_buf[n], d_theta[n])):
            d = clip_coef[n] * grad + weight_decay * param
            buf.mul_(momentum).add_(d)
            param.sub_(lr * buf)
