"""Strided batched matmul with a fused bias + leaky-ReLU epilogue.

``C[b] = act(A[b] @ B[b] + bias[b])`` for A (Bt, M, K), B (Bt, K, N) given by
arbitrary strides, so transposed operands (the backward's ``dY @ W`` and
``dYᵀ @ X``) and shared operands (batch stride 0, from ``expand``) cost no
copy.  Used by the shared-hypernetwork weight generation and by the batched
per-client linear layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                stride_cb, stride_cm, stride_cn, stride_biasb,
                HAS_BIAS: tl.constexpr, LEAKY: tl.constexpr, SLOPE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + batch * stride_biasb + rn, mask=rn < N, other=0.0)[None, :]
    if LEAKY:
        acc = tl.where(acc > 0, acc, acc * SLOPE)
    c_ptrs = c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _block(size: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(size)))


def bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, leaky_slope: float | None = None,
        precision: str = "ieee"):
    """act(a @ b + bias): a (Bt, M, K), b (Bt, K, N), bias (Bt, N) or None -> (Bt, M, N) float32.

    Any strides are accepted (including batch stride 0); ``leaky_slope`` None
    means no activation; ``precision`` is ``tl.dot``'s input precision ("ieee" or "tf32").
    """
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.empty(batch, m, n, device=a.device, dtype=torch.float32)
    block_m, block_n, block_k = _block(m, 16, 64), _block(n, 16, 64), _block(k, 16, 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), batch)
    bias_arg = bias if bias is not None else out
    _bmm_kernel[grid](a, b, out, bias_arg, m, n, k, *a.stride(), *b.stride(), *out.stride(),
                      bias.stride(0) if bias is not None else 0,
                      HAS_BIAS=bias is not None, LEAKY=leaky_slope is not None, SLOPE=leaky_slope or 0.0,
                      PRECISION=precision,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
