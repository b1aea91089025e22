"""Batched per-client linear layer with bias and optional leaky ReLU, forward and backward.

x (N, B, K), weight (N, M, K), bias (N, M) -> y (N, B, M).  All three matmuls
(forward ``x Wᵀ``, backward ``dz W`` and ``dzᵀ x``) run on the strided
:func:`bmm` kernel with the transposes expressed as strides; the forward fuses
bias and activation.
"""
from __future__ import annotations

import torch

from .bmm import bmm


class BatchedLinear(torch.autograd.Function):
    """y = x @ weightᵀ + bias per client, then leaky ReLU with negative slope ``slope`` unless it is None."""

    @staticmethod
    def forward(ctx, x, weight, bias, slope: float | None, precision: str):
        y = bmm(x, weight.transpose(1, 2), bias, slope, precision)
        ctx.save_for_backward(x, weight, y)
        ctx.slope, ctx.precision = slope, precision
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        dz = dy if ctx.slope is None else torch.where(y > 0, dy, dy * ctx.slope)  # through the activation
        dx = bmm(dz, weight, precision=ctx.precision) if ctx.needs_input_grad[0] else None  # (N, B, K)
        dw = bmm(dz.transpose(1, 2), x, precision=ctx.precision) if ctx.needs_input_grad[1] else None  # (N, M, K)
        db = dz.sum(1) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None
