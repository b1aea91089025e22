"""Fused hypernetwork weight generation for N clients: theta = heads(ReLU(fc(v))).

Two cases:

- shared hypernetwork (fc_weight (H, E), head_weight (P, H)): the heads are one GEMM over all clients
  (:mod:`.bmm`), reading the P x H matrix once;
- per-client hypernetworks (fc_weight (N, H, E), head_weight (N, P, H)): a batched GEMV, memory-bound,
  reading each client's matrix once.

Backward: ``dh = head_weightᵀ dtheta`` is a split-P GEMV (partial sums per block of rows, reduced
deterministically); the per-client head-weight gradient is the outer product ``dtheta ⊗ h`` and nothing
larger is materialised.  The first layer (H x E = 128 x 64 per client) is tiny; its backward is plain torch.

The per-client GEMV streams 20 x 59 MB of head matrices and is bound by memory bandwidth: it is autotuned
over ``GEMV_CONFIGS`` (32-256 rows per program, 2-8 warps) per shape on the GPU it runs on
(:mod:`.launch`).  Client offsets are int64: 20 clients' (P, H) heads are already 296 M values, and the
offsets of a few hundred clients pass 2³¹.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bmm import bmm
from .launch import launch, tuned

BLOCK_P = 64  # rows of the head matrix per program step (transposed GEMV, outer product)
GEMV_CONFIGS = [triton.Config({"BLOCK_R": 64}, num_warps=4),  # the configuration measured on an H100
                triton.Config({"BLOCK_R": 128}, num_warps=4),
                triton.Config({"BLOCK_R": 128}, num_warps=8),
                triton.Config({"BLOCK_R": 256}, num_warps=8),
                triton.Config({"BLOCK_R": 32}, num_warps=2)]


@tuned(GEMV_CONFIGS, ["R", "C", "RELU"])
@triton.jit
def _gemv_kernel(w_ptr, x_ptr, bias_ptr, out_ptr, R, C, stride_wn, stride_wr, stride_xn, stride_bn, stride_on,
                 RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, r] = act(sum_c w[n, r, c] * x[n, c] + bias[n, r]); stride_wn = 0 shares w."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + n * stride_wn + rr[:, None] * stride_wr + rc[None, :],
                    mask=(rr[:, None] < R) & (rc[None, :] < C), other=0.0)
        x = tl.load(x_ptr + n * stride_xn + rc, mask=rc < C, other=0.0)
        acc += tl.sum(w * x[None, :], axis=1)
    acc += tl.load(bias_ptr + n * stride_bn + rr, mask=rr < R, other=0.0)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + n * stride_on + rr, acc, mask=rr < R)


@triton.jit
def _gemv_t_partial_kernel(w_ptr, g_ptr, part_ptr, R, C, rows_per_prog, stride_wn, stride_wr, stride_gn,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[n, pid, c] = sum over this program's rows r of w[n, r, c] * g[n, r] (C <= BLOCK_C)."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rc = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        w = tl.load(w_ptr + n * stride_wn + rr[:, None] * stride_wr + rc[None, :],
                    mask=(rr[:, None] < R) & (rc[None, :] < C), other=0.0)
        g = tl.load(g_ptr + n * stride_gn + rr, mask=rr < R, other=0.0)
        acc += tl.sum(w * g[:, None], axis=0)
    tl.store(part_ptr + (n * tl.num_programs(0) + pid) * BLOCK_C + rc, acc)


@triton.jit
def _outer_kernel(a_ptr, b_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, r, c] = a[n, r] * b[n, c] (contiguous)."""
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.arange(0, BLOCK_C)
    a = tl.load(a_ptr + n * R + rr, mask=rr < R, other=0.0)
    b = tl.load(b_ptr + n * C + rc, mask=rc < C, other=0.0)
    mask = (rr[:, None] < R) & (rc[None, :] < C)
    tl.store(out_ptr + n * R * C + rr[:, None] * C + rc[None, :], a[:, None] * b[None, :], mask=mask)


def gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """act(w[n] @ x[n] + bias[n]) for every n: w (N, R, C) or shared (R, C), x (N, C) -> (N, R)."""
    n, c = x.shape
    r = w.shape[-2]
    out = torch.empty(n, r, device=x.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(r, meta["BLOCK_R"]), n

    launch(_gemv_kernel, grid, w, x, bias, out, r, c, 0 if w.dim() == 2 else w.stride(0), w.stride(-2),
           x.stride(0), 0 if bias.dim() == 1 else bias.stride(0), out.stride(0), RELU=relu,
           BLOCK_C=min(128, triton.next_power_of_2(c)))
    return out


def gemv_t(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """w[n]ᵀ @ g[n] for every n: w (N, R, C) or shared (R, C), g (N, R) -> (N, C); C <= 256."""
    n, r = g.shape
    c = w.shape[-1]
    block_c = triton.next_power_of_2(c)
    programs = min(triton.cdiv(r, BLOCK_P), 128)
    rows_per_prog = triton.cdiv(triton.cdiv(r, programs), BLOCK_P) * BLOCK_P
    programs = triton.cdiv(r, rows_per_prog)
    partial = torch.empty(n, programs, block_c, device=g.device, dtype=torch.float32)
    launch(_gemv_t_partial_kernel, (programs, n), w, g, partial, r, c, rows_per_prog,
           0 if w.dim() == 2 else w.stride(0), w.stride(-2), g.stride(0), BLOCK_R=BLOCK_P, BLOCK_C=block_c)
    return partial.sum(1)[:, :c]


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[n] ⊗ b[n]: (N, R), (N, C) -> (N, R, C)."""
    n, r = a.shape
    c = b.shape[1]
    out = torch.empty(n, r, c, device=a.device, dtype=torch.float32)
    launch(_outer_kernel, (triton.cdiv(r, BLOCK_P), n), a, b, out, r, c, BLOCK_R=BLOCK_P,
           BLOCK_C=triton.next_power_of_2(c))
    return out


class GenerateWeights(torch.autograd.Function):
    """theta (N, P) = heads(ReLU(fc(v))) (``relu``; else heads(fc(v))) with Triton kernels; shared or per-client
    weights."""

    @staticmethod
    def forward(ctx, embeddings, fc_weight, fc_bias, head_weight, head_bias, relu: bool, precision: str):
        hidden = gemv(fc_weight, embeddings, fc_bias, relu=relu)  # (N, H)
        if head_weight.dim() == 2:  # shared: one GEMM, head matrix read once
            theta = bmm(hidden.unsqueeze(0), head_weight.t().unsqueeze(0), head_bias.unsqueeze(0),
                        precision=precision).squeeze(0)
        else:  # per client: batched GEMV
            theta = gemv(head_weight, hidden, head_bias)
        ctx.save_for_backward(embeddings, fc_weight, head_weight, hidden)
        ctx.precision, ctx.relu = precision, relu
        return theta

    @staticmethod
    def backward(ctx, d_theta):
        embeddings, fc_weight, head_weight, hidden = ctx.saved_tensors
        d_theta = d_theta.contiguous()
        shared = head_weight.dim() == 2
        d_hidden = gemv_t(head_weight, d_theta)  # (N, H)
        if ctx.relu:
            d_hidden = d_hidden * (hidden > 0)  # through the ReLU
        d_head_w = d_head_b = d_fc_w = d_fc_b = d_emb = None
        if ctx.needs_input_grad[3]:
            d_head_w = (bmm(d_theta.t().unsqueeze(0), hidden.unsqueeze(0), precision=ctx.precision).squeeze(0)
                        if shared else outer(d_theta, hidden))
        if ctx.needs_input_grad[4]:
            d_head_b = d_theta.sum(0) if shared else d_theta
        shared_fc = fc_weight.dim() == 2
        if ctx.needs_input_grad[1]:
            d_fc_w = d_hidden.t() @ embeddings if shared_fc else d_hidden.unsqueeze(2) * embeddings.unsqueeze(1)
        if ctx.needs_input_grad[2]:
            d_fc_b = d_hidden.sum(0) if shared_fc else d_hidden
        if ctx.needs_input_grad[0]:
            d_emb = d_hidden @ fc_weight if shared_fc else torch.bmm(d_hidden.unsqueeze(1), fc_weight).squeeze(1)
        return d_emb, d_fc_w, d_fc_b, d_head_w, d_head_b, None, None
