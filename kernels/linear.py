"""Batched per-client linear layer with bias and optional leaky ReLU, forward and backward: three launches.

x (N, B, K), weight (N, M, K), bias (N, M) -> y (N, B, M).  All matmuls run on the strided :func:`bmm`
kernel with the transposes expressed as strides: forward ``x Wᵀ`` with bias and activation fused; backward
``dx = dz W`` and ``[dW | db] = [dzᵀ x | rowsum(dzᵀ)]`` with dz = dy * leaky'(y) formed as the operand is
loaded.  The weight and bias may be views with any client stride (slices of one flat theta).
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
        dy = dy.contiguous()
        gate = dict(gate=y, gate_slope=ctx.slope) if ctx.slope is not None else {}
        dx = bmm(dy, weight, precision=ctx.precision, **gate) if ctx.needs_input_grad[0] else None  # (N, B, K)
        dw = db = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gate_t = dict(gate=y.transpose(1, 2), gate_slope=ctx.slope) if ctx.slope is not None else {}
            dw, db = bmm(dy.transpose(1, 2), x, precision=ctx.precision, rowsum=True, **gate_t)  # (N, M, K), (N, M)
        return dx, dw, db, None, None
