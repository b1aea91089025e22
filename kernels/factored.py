"""Per-client head matrices in factored form, W_n = alpha_n W0 + sum_s beta_{n,s} u_{n,s} v_{n,s}ᵀ: products.

W0 (P, H) is shared; u (N, S, P), v (N, S, H), alpha (N,), beta (N, S) are each client's; only the first
``span`` slots are read.  Both products stream the factors once and are bound by memory bandwidth:

- :func:`generate`: the hypernetwork's forward, h_n = ReLU(fc_w_n e_n + fc_b_n) and theta_n = W_n h_n + bias_n.
  A small kernel (one program per client) forms h_n and c_{n,s} = beta_{n,s} (v_{n,s}·h_n); the main one gives
  each program BLOCK_P rows of W0 for BLOCK_N clients at once (W0 is read once per client block: one GEMM
  ``(alpha h) W0ᵀ``), adds ``sum_s c_{n,s} u_{n,s}`` slot by slot and the bias.
- :func:`rmatvec`: W_nᵀ g_n and ‖g_n‖².  Each program reduces a contiguous range of P: the W0 part as a GEMM
  ``g W0``, the slots' dots u_{n,s}·g_n and the squared norm, into partial sums; a finishing kernel (one
  program per client) adds the partials in a fixed order (deterministic) and applies alpha, beta and v.

Client offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch, tuned

MATVEC_CONFIGS = [triton.Config({"BLOCK_P": 128, "BLOCK_N": 32, "BLOCK_H": 32}, num_warps=4),
                  triton.Config({"BLOCK_P": 64, "BLOCK_N": 32, "BLOCK_H": 32}, num_warps=4),
                  triton.Config({"BLOCK_P": 256, "BLOCK_N": 16, "BLOCK_H": 32}, num_warps=8)]
RMATVEC_CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_N": 32}, num_warps=4),
                   triton.Config({"BLOCK_P": 64, "BLOCK_N": 16}, num_warps=4),
                   triton.Config({"BLOCK_P": 32, "BLOCK_N": 16}, num_warps=8)]
PROGRAMS_P = 256  # rmatvec: programs along P (each sums about P / 256 rows)


@triton.jit
def _hidden_kernel(e_ptr, fcw_ptr, fcb_ptr, v_ptr, alpha_ptr, beta_ptr, h_ptr, ah_ptr, c_ptr, E, H, S, SPAN,
                   stride_vn, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """h[n] = ReLU(fc_w[n] e[n] + fc_b[n]), (alpha h)[n], and c[n, s] = beta[n, s] (v[n, s] · h[n]) for s < SPAN."""
    n = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    ee = tl.arange(0, BLOCK_E)
    e = tl.load(e_ptr + n * E + ee, mask=ee < E, other=0.0)
    fc_w = tl.load(fcw_ptr + n * H * E + hh[:, None] * E + ee[None, :], mask=(hh[:, None] < H) & (ee[None, :] < E),
                   other=0.0)
    h = tl.maximum(tl.sum(fc_w * e[None, :], axis=1) + tl.load(fcb_ptr + n * H + hh, mask=hh < H, other=0.0), 0.0)
    tl.store(h_ptr + n * H + hh, h, mask=hh < H)
    tl.store(ah_ptr + n * H + hh, tl.load(alpha_ptr + n) * h, mask=hh < H)
    for s0 in range(0, SPAN, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(v_ptr + n * stride_vn + s[:, None] * H + hh[None, :], mask=(s[:, None] < SPAN) & (hh[None, :] < H),
                    other=0.0)
        beta = tl.load(beta_ptr + n * S + s, mask=s < SPAN, other=0.0)
        tl.store(c_ptr + n * S + s, beta * tl.sum(v * h[None, :], axis=1), mask=s < SPAN)


@tuned(MATVEC_CONFIGS, ["N", "P", "H", "PRECISION"])
@triton.jit
def _matvec_kernel(w0_ptr, ah_ptr, u_ptr, c_ptr, bias_ptr, out_ptr, N, P, H, S, SPAN, stride_un, stride_biasn,
                   PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[n, p] = (alpha h)[n] · W0[p] + sum_{s < SPAN} c[n, s] u[n, s, p] + bias[n, p]."""
    pid_p, pid_n = tl.program_id(0), tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    p_ok, n_ok = p < P, n < N
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        ah = tl.load(ah_ptr + n[:, None] * H + hh[None, :], mask=n_ok[:, None] & (hh[None, :] < H), other=0.0)
        w0t = tl.load(w0_ptr + p[None, :] * H + hh[:, None], mask=p_ok[None, :] & (hh[:, None] < H), other=0.0)
        acc += tl.dot(ah, w0t, input_precision=PRECISION)  # (BLOCK_N, BLOCK_P)
    u_rows = u_ptr + n[:, None] * stride_un + p[None, :]
    mask = n_ok[:, None] & p_ok[None, :]
    for s in range(0, SPAN):
        c = tl.load(c_ptr + n * S + s, mask=n_ok, other=0.0)
        acc += c[:, None] * tl.load(u_rows + s * P, mask=mask, other=0.0)
    acc += tl.load(bias_ptr + n[:, None] * stride_biasn + p[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + n[:, None] * P + p[None, :], acc, mask=mask)


@tuned(RMATVEC_CONFIGS, ["N", "P", "H", "PRECISION"])
@triton.jit
def _rmatvec_partial_kernel(g_ptr, w0_ptr, u_ptr, part_h_ptr, part_u_ptr, part_sq_ptr, N, P, H, S, SPAN,
                            ROWS, stride_gn, stride_un, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_HF: tl.constexpr):
    """Over rows [pid ROWS, (pid+1) ROWS) of P: partial g W0 (N, H), u_s · g (N, SPAN) and ‖g‖² (N,)."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = n < N
    hh = tl.arange(0, BLOCK_HF)
    start = pid * ROWS
    end = tl.minimum(start + ROWS, P)
    acc = tl.zeros((BLOCK_N, BLOCK_HF), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        g = tl.load(g_ptr + n[:, None] * stride_gn + p[None, :], mask=n_ok[:, None] & (p[None, :] < end), other=0.0)
        w0 = tl.load(w0_ptr + p[:, None] * H + hh[None, :], mask=(p[:, None] < end) & (hh[None, :] < H), other=0.0)
        acc += tl.dot(g, w0, input_precision=PRECISION)
        sq += tl.sum(g * g, axis=1)
    base = pid.to(tl.int64) * N + n
    tl.store(part_h_ptr + base[:, None] * H + hh[None, :], acc, mask=n_ok[:, None] & (hh[None, :] < H))
    tl.store(part_sq_ptr + base, sq, mask=n_ok)
    for s in range(0, SPAN):  # this program's g slab stays in cache across the slots
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = n_ok[:, None] & (p[None, :] < end)
            g = tl.load(g_ptr + n[:, None] * stride_gn + p[None, :], mask=mask, other=0.0)
            u = tl.load(u_ptr + n[:, None] * stride_un + s * P + p[None, :], mask=mask, other=0.0)
            dot += tl.sum(u * g, axis=1)
        tl.store(part_u_ptr + base * S + s, dot, mask=n_ok)


@triton.jit
def _rmatvec_finish_kernel(part_h_ptr, part_u_ptr, part_sq_ptr, v_ptr, alpha_ptr, beta_ptr, out_ptr, sq_ptr,
                           N, H, S, SPAN, PROGRAMS, stride_vn, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """out[n] = alpha_n sum_r part_h[r, n] + sum_s beta[n, s] (sum_r part_u[r, n, s]) v[n, s]; sq[n] = sum_r part_sq."""
    n = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(0, PROGRAMS, BLOCK_R):
        rows = r0 + r
        ok = rows < PROGRAMS
        acc += tl.sum(tl.load(part_h_ptr + (rows[:, None] * N + n) * H + hh[None, :],
                              mask=ok[:, None] & (hh[None, :] < H), other=0.0), axis=0)
        sq += tl.load(part_sq_ptr + rows * N + n, mask=ok, other=0.0)
    acc *= tl.load(alpha_ptr + n)
    for s0 in range(0, SPAN, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < SPAN
        dots = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for r0 in range(0, PROGRAMS):
            dots += tl.load(part_u_ptr + (r0 * N + n) * S + s, mask=s_ok, other=0.0)
        coeff = tl.load(beta_ptr + n * S + s, mask=s_ok, other=0.0) * dots
        v = tl.load(v_ptr + n * stride_vn + s[:, None] * H + hh[None, :], mask=s_ok[:, None] & (hh[None, :] < H),
                    other=0.0)
        acc += tl.sum(coeff[:, None] * v, axis=0)
    tl.store(out_ptr + n * H + hh, acc, mask=hh < H)
    tl.store(sq_ptr + n, tl.sum(sq, axis=0))


def _block(size: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(size))


def generate(embedding, fc_w, fc_b, bias, w0, u, v, alpha, beta, span: int, precision: str):
    """(theta (N, P), h (N, H)): h_n = ReLU(fc_w_n e_n + fc_b_n), theta_n = W_n h_n + bias_n.  u, v may be views
    with any client stride (the first ``span`` of S slots are read); everything else contiguous."""
    n, e = embedding.shape
    hdim = fc_w.shape[1]
    p, s = w0.shape[0], u.shape[1]
    hidden = torch.empty(n, hdim, device=embedding.device, dtype=torch.float32)
    ah = torch.empty_like(hidden)
    coeff = torch.empty(n, s, device=embedding.device, dtype=torch.float32)
    launch(_hidden_kernel, (n,), embedding, fc_w, fc_b, v, alpha, beta, hidden, ah, coeff, e, hdim, s, span,
           v.stride(0), BLOCK_E=_block(e), BLOCK_S=16, BLOCK_H=_block(hdim), num_warps=8)
    theta = torch.empty(n, p, device=embedding.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(n, meta["BLOCK_N"])

    launch(_matvec_kernel, grid, w0, ah, u, coeff, bias, theta, n, p, hdim, s, span, u.stride(0), bias.stride(0),
           PRECISION=precision)
    return theta, hidden


def rmatvec(g, w0, u, v, alpha, beta, span: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_nᵀ g_n (N, H), ‖g_n‖² (N,)) for every client; g (N, P) with unit inner stride."""
    n, p = g.shape
    hdim, s = w0.shape[1], u.shape[1]
    rows = triton.cdiv(triton.cdiv(p, PROGRAMS_P), 64) * 64
    programs = triton.cdiv(p, rows)
    part_h = torch.empty(programs, n, hdim, device=g.device, dtype=torch.float32)
    part_u = torch.empty(programs, n, s, device=g.device, dtype=torch.float32)
    part_sq = torch.empty(programs, n, device=g.device, dtype=torch.float32)

    def grid(meta):
        return programs, triton.cdiv(n, meta["BLOCK_N"])

    launch(_rmatvec_partial_kernel, grid, g, w0, u, part_h, part_u, part_sq, n, p, hdim, s, span, rows,
           g.stride(0), u.stride(0), PRECISION=precision, BLOCK_HF=_block(hdim))
    out = torch.empty(n, hdim, device=g.device, dtype=torch.float32)
    sq = torch.empty(n, device=g.device, dtype=torch.float32)
    launch(_rmatvec_finish_kernel, (n,), part_h, part_u, part_sq, v, alpha, beta, out, sq, n, hdim, s, span,
           programs, v.stride(0), BLOCK_S=16, BLOCK_H=_block(hdim), BLOCK_R=16)
    return out, sq
