"""batched_linear: per-client linear layer x (N, B, K), weight (N, M, K), bias (N, M) -> (N, B, M), optional leaky ReLU.

Triton: :mod:`hyperfl_fast.kernels.linear` (three launches forward and backward, the activation fused).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .activation import LEAKY_SLOPE
from .precision import triton_input_precision
from .validation import check_batch, check_tensors, client_blocks, expect


def reference(x, weight, bias, leaky):
    """Client by client: F.linear, then leaky ReLU if asked."""
    outs = []
    for n in range(x.shape[0]):
        y = F.linear(x[n], weight[n], bias[n])
        outs.append(F.leaky_relu(y, LEAKY_SLOPE) if leaky else y)
    return torch.stack(outs)


def vectorised(x, weight, bias, leaky):
    """One ``baddbmm`` over the clients."""
    y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return F.leaky_relu(y, LEAKY_SLOPE) if leaky else y


def fused(x, weight, bias, leaky):
    from ..kernels.linear import BatchedLinear

    return BatchedLinear.apply(x, client_blocks(weight), client_blocks(bias), LEAKY_SLOPE if leaky else None,
                               triton_input_precision())


OP = dispatch.register(dispatch.Op("batched_linear", reference, vectorised, fused, short="linear"))


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, leaky: bool = False,
                   path: str | None = None) -> torch.Tensor:
    """Per-client linear: x (N, B, K), weight (N, M, K), bias (N, M) -> (N, B, M), optional leaky ReLU."""
    op = OP.name
    check_tensors(op, dict(x=x, weight=weight, bias=bias))
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (N, B, K), got shape {tuple(x.shape)}")
    check_batch(op, x)
    n, _, k = x.shape
    if weight.dim() != 3 or weight.shape[0] != n or weight.shape[2] != k:
        raise ValueError(f"{op}: weight must be ({n}, M, {k}), got {tuple(weight.shape)}")
    expect(op, "bias", bias, (n, weight.shape[1]))
    return dispatch.call(OP, path, (x, weight, bias, bool(leaky)))
