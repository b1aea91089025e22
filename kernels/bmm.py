"""Strided batched matmul with fused prologue and epilogue: the GEMM behind the linear layer and shared generation.

``C[b] = act(A'[b] @ B[b] + bias[b])`` for A (Bt, M, K), B (Bt, K, N) given by arbitrary strides, so transposed
operands (the backward's ``dY @ W`` and ``dYᵀ @ X``) and shared operands (batch stride 0) cost no copy.

- ``gate``: A' = A * leaky'(gate) elementwise, with ``gate`` laid out like A (the forward's output y when A is
  dy): the backward of a leaky ReLU costs no separate pass.
- ``rowsum``: also write ``sum_k A'[b, m, k]`` (the bias gradient when A is dyᵀ).
- ``bias`` and ``leaky_slope``: the forward's epilogue.

The batch offset is int64 (any number of clients); offsets within one batch entry are int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, tuned

# Chosen with the report: no spills for sm_80 and sm_90, both precisions, every use (including the gated one)
CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8),
           triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4),
           triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
           triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]


@tuned(CONFIGS, ["M", "N", "K", "HAS_BIAS", "LEAKY", "GATED", "ROWSUM", "PRECISION"])
@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, gate_ptr, rowsum_ptr, M, N, K,
                stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                stride_cb, stride_cm, stride_cn, stride_biasb,
                HAS_BIAS: tl.constexpr, LEAKY: tl.constexpr, SLOPE: tl.constexpr, GATED: tl.constexpr,
                ROWSUM: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_offs = batch * stride_ab + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask = (rm[:, None] < M) & (rk[None, :] + k0 < K)
        a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
        if GATED:
            a = tl.where(tl.load(gate_ptr + a_offs, mask=a_mask, other=0.0) > 0, a, a * SLOPE)
        if ROWSUM:
            row_sum += tl.sum(a, axis=1)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k0 < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_offs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + batch * stride_biasb + rn, mask=rn < N, other=0.0)[None, :]
    if LEAKY:
        acc = tl.where(acc > 0, acc, acc * SLOPE)
    c_ptrs = c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + batch * M + rm, row_sum, mask=rm < M)


def bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, leaky_slope: float | None = None,
        precision: str = "ieee", gate: torch.Tensor | None = None, gate_slope: float = 0.0,
        rowsum: bool = False, out: torch.Tensor | None = None):
    """act(a' @ b + bias) -> (Bt, M, N) float32 (written into ``out`` if given, any strides); with ``rowsum`` also
    the row sums of a' (Bt, M).  a' = a * leaky'(gate) with negative slope ``gate_slope`` when ``gate`` is given
    (gate must have a's strides).  ``precision`` is ``tl.dot``'s input precision ("ieee" or "tf32")."""
    batch, m, k = a.shape
    n = b.shape[2]
    if gate is not None and gate.stride() != a.stride():
        raise ValueError("bmm: gate must be laid out like a")
    if out is None:
        out = torch.empty(batch, m, n, device=a.device, dtype=torch.float32)
    sums = torch.empty(batch, m, device=a.device, dtype=torch.float32) if rowsum else out
    if leaky_slope is not None and gate is not None:
        raise ValueError("bmm: a leaky epilogue and a gated prologue share one slope argument; use one")

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), batch

    launch(_bmm_kernel, grid, a, b, out, bias if bias is not None else out, gate if gate is not None else a, sums,
           m, n, k, *a.stride(), *b.stride(), *out.stride(), bias.stride(0) if bias is not None else 0,
           HAS_BIAS=bias is not None, LEAKY=leaky_slope is not None, SLOPE=leaky_slope or gate_slope,
           GATED=gate is not None, ROWSUM=rowsum, PRECISION=precision)
    return (out, sums) if rowsum else out
