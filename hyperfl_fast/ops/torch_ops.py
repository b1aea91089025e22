"""Vectorised PyTorch paths of the fused ops: one batched call per op, all clients at once.

This is the fast path on machines without a GPU (grouped conv with
``groups=N``, ``bmm``/``baddbmm``); PyTorch's autograd gives the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import LEAKY_SLOPE


def generate_weights(embeddings, fc_weight, fc_bias, head_weight, head_bias):
    """(N, E) -> (N, P); a shared layer is one GEMM, a per-client layer a batched GEMV (each layer on its own)."""
    if fc_weight.dim() == 2:
        h = F.relu(F.linear(embeddings, fc_weight, fc_bias))  # (N, H)
    else:
        h = F.relu(torch.baddbmm(fc_bias.unsqueeze(-1), fc_weight, embeddings.unsqueeze(-1)).squeeze(-1))
    if head_weight.dim() == 2:
        return F.linear(h, head_weight, head_bias)
    return torch.baddbmm(head_bias.unsqueeze(-1), head_weight, h.unsqueeze(-1)).squeeze(-1)  # (N, P)


# On the CPU one grouped convolution's output is kept under this size by splitting the clients into chunks:
# it stays in cache and off glibc's mmap path (a fresh, page-faulting buffer for every call above 32 MiB).
# Fashion-MNIST's first layer, N=20, B=50: 37 MB whole, fwd+bwd 55 ms -> 42 ms in 3 chunks (2-core EPYC).
CPU_CHUNK_BYTES = 16 * 2**20


def conv2d_leaky_pool(x, weight, bias, padding: int):
    """(N, B, C, H, W) -> (N, B, Cout, Hp, Wp) as grouped convolutions over the client axis.

    Pooling runs before the activation: leaky ReLU is increasing, so
    pool(act(z)) == act(pool(z)) exactly (values and gradients), on 4x fewer
    elements.  Channels-last makes the grouped convolution faster on the CPU.
    """
    n, b, _, h, w = x.shape
    cout, k = weight.shape[1], weight.shape[-1]
    out_bytes = b * n * cout * (h + 2 * padding - k + 1) * (w + 2 * padding - k + 1) * x.element_size()
    chunks = -(-out_bytes // CPU_CHUNK_BYTES) if x.device.type == "cpu" else 1
    if chunks == 1:
        return _grouped_conv_leaky_pool(x, weight, bias, padding)
    return torch.cat([_grouped_conv_leaky_pool(*part, padding)
                      for part in zip(x.chunk(chunks), weight.chunk(chunks), bias.chunk(chunks))])


def _grouped_conv_leaky_pool(x, weight, bias, padding: int):
    n, b, c, h, w = x.shape
    cout, k = weight.shape[1], weight.shape[-1]
    grouped = x.transpose(0, 1).reshape(b, n * c, h, w)  # clients become channel groups
    grouped = grouped.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(grouped, weight.reshape(n * cout, c, k, k), bias.reshape(n * cout), padding=padding, groups=n)
    y = F.leaky_relu(F.max_pool2d(y, 2), LEAKY_SLOPE)  # (B, N*Cout, Hp, Wp)
    return y.reshape(b, n, cout, *y.shape[-2:]).transpose(0, 1)


def linear(x, weight, bias, leaky: bool = False):
    """(N, B, K) x (N, M, K) + (N, M) -> (N, B, M), optionally leaky ReLU."""
    y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return F.leaky_relu(y, LEAKY_SLOPE) if leaky else y


@torch.no_grad()
def head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef,
                  lr: float, momentum: float, weight_decay: float) -> None:
    """In-place clipped SGD step of the per-client heads; see :func:`naive.head_sgd_step`."""
    scaled = d_theta * clip_coef.unsqueeze(1)  # (N, P)
    weight_buf.mul_(momentum).add_(head_weight, alpha=weight_decay)
    weight_buf.baddbmm_(scaled.unsqueeze(2), hidden.unsqueeze(1))  # += outer product, per client
    head_weight.sub_(weight_buf, alpha=lr)
    bias_buf.mul_(momentum).add_(head_bias, alpha=weight_decay).add_(scaled)
    head_bias.sub_(bias_buf, alpha=lr)
