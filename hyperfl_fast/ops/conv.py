"""batched_conv2d_leaky_pool: per-client conv2d (stride 1) + bias -> leaky ReLU -> 2x2 max-pool.

x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> (N, B, Cout, Hp, Wp), Hp = (H + 2 pad - k + 1) // 2.
Triton: :mod:`hyperfl_fast.kernels.conv` (one fused kernel forward, two backward, the conv output never stored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .activation import LEAKY_SLOPE
from .precision import triton_input_precision
from .validation import check_batch, check_tensors, client_blocks, expect

# On the CPU one grouped convolution's output is kept under this size by splitting the clients into chunks:
# it stays in cache and off glibc's mmap path (a fresh, page-faulting buffer for every call above 32 MiB).
# Fashion-MNIST's first layer, N=20, B=50: 37 MB whole, fwd+bwd 55 ms -> 42 ms in 3 chunks (2-core EPYC).
CPU_CHUNK_BYTES = 16 * 2**20


def reference(x, weight, bias, padding):
    """Client by client: conv2d, leaky ReLU, max-pool."""
    return torch.stack([
        F.max_pool2d(F.leaky_relu(F.conv2d(x[n], weight[n], bias[n], padding=padding), LEAKY_SLOPE), 2)
        for n in range(x.shape[0])
    ])


def vectorised(x, weight, bias, padding):
    """Grouped convolutions over the client axis (in client chunks on the CPU, see ``CPU_CHUNK_BYTES``).

    Pooling runs before the activation: leaky ReLU is increasing, so pool(act(z)) == act(pool(z)) exactly
    (values and gradients), on 4x fewer elements.  Channels-last makes the grouped convolution faster on the CPU.
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


def fused(x, weight, bias, padding):
    from ..kernels.conv import Conv2dLeakyPool

    return Conv2dLeakyPool.apply(client_blocks(x), client_blocks(weight), client_blocks(bias), padding, LEAKY_SLOPE,
                                 triton_input_precision())


# Measured on random images: real ones have flat regions whose pooling windows tie exactly, and two correct
# paths then route a tie's gradient by their own rounding (seen on an H200: relative errors 4e-4 and 8e-2).
OP = dispatch.register(dispatch.Op("batched_conv2d_leaky_pool", reference, vectorised, fused, short="conv",
                                   measure_on=dispatch.random_at(0)))


def batched_conv2d_leaky_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int = 0,
                              path: str | None = None) -> torch.Tensor:
    """Per-client conv2d (stride 1) + bias -> leaky ReLU -> 2x2 max-pool.

    x (N, B, C, H, W), weight (N, Cout, C, k, k), bias (N, Cout) -> (N, B, Cout, Hp, Wp)
    with Hp = (H + 2 padding - k + 1) // 2.
    """
    op = OP.name
    check_tensors(op, dict(x=x, weight=weight, bias=bias))
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be (N, B, C, H, W), got shape {tuple(x.shape)}")
    check_batch(op, x)
    n, _, c, h, w = x.shape
    if weight.dim() != 5 or weight.shape[0] != n or weight.shape[2] != c or weight.shape[3] != weight.shape[4]:
        raise ValueError(f"{op}: weight must be ({n}, Cout, {c}, k, k), got {tuple(weight.shape)}")
    expect(op, "bias", bias, (n, weight.shape[1]))
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{op}: padding must be a non-negative int, got {padding!r}")
    k = weight.shape[-1]
    if min(h, w) + 2 * padding - k + 1 < 2:
        raise ValueError(f"{op}: a {h}x{w} input with kernel {k} and padding {padding} leaves nothing to pool")
    return dispatch.call(OP, path, (x, weight, bias, padding))
