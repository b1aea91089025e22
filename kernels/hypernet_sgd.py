"""The end of a HyperFL hypernetwork step, fused: chain rule to (psi_n, v_n), clipping, and every SGD update.

Given, per client n, the heads' input h = ReLU(fc(v)) (N, H), the loss gradient at theta dθ (N, P), its
back-projection dh = W_nᵀ dθ and ‖dθ‖² (from :func:`.factored.rmatvec`), two launches finish the step:

:func:`client_update` (one program per client; everything here is H x E or smaller):

- d_pre = dh * (h > 0); dfc_w = d_pre ⊗ v, dfc_b = d_pre, dv = fc_wᵀ d_pre;
- the hypernetwork's gradient norm in closed form, ‖dθ‖²(‖h‖² + 1) + ‖d_pre‖²‖v‖² + ‖d_pre‖² (the heads'
  weight gradient is dθ ⊗ h), and ``clip_grad_norm_``'s coefficients for psi and for v;
- SGD (momentum, weight decay) on fc_w, fc_b and v, and on the factored heads' scalars (alpha, gamma, beta,
  delta; see :mod:`hyperfl_fast.batched`), with slot ``slot`` taking this step's rank-one term; v's slot
  of the factors is h;
- the loss bookkeeping of the epoch (sum and count over active clients).

:func:`heads_update` (over P): the slot's u factor c·dθ and the SGD step of the heads' bias (gradient c·dθ).

An inactive client (no batch this step) keeps every parameter and buffer, as ``StackedSGD`` does.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch import launch

BLOCK_P = 1024


@triton.jit
def _client_update_kernel(dh_ptr, h_ptr, gsq_ptr, v_ptr, fcw_ptr, fcb_ptr, v_buf_ptr, fcw_buf_ptr, fcb_buf_ptr,
                          alpha_ptr, gamma_ptr, beta_ptr, delta_ptr, vfac_ptr, slot_ptr, active_ptr, loss_ptr,
                          loss_sum_ptr, loss_count_ptr, coef_ptr, H, E, S, stride_vfn,
                          lr, momentum, weight_decay, max_norm,
                          BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, BLOCK_H)
    ee = tl.arange(0, BLOCK_E)
    h_ok, e_ok = hh < H, ee < E
    h = tl.load(h_ptr + n * H + hh, mask=h_ok, other=0.0)
    d_pre = tl.where(h > 0, tl.load(dh_ptr + n * H + hh, mask=h_ok, other=0.0), 0.0)
    v = tl.load(v_ptr + n * E + ee, mask=e_ok, other=0.0)
    w_offs = n * H * E + hh[:, None] * E + ee[None, :]
    w_mask = h_ok[:, None] & e_ok[None, :]
    fc_w = tl.load(fcw_ptr + w_offs, mask=w_mask, other=0.0)
    dv = tl.sum(fc_w * d_pre[:, None], axis=0)  # (E,)
    pre_sq = tl.sum(d_pre * d_pre, axis=0)
    hyper_sq = tl.load(gsq_ptr + n) * (tl.sum(h * h, axis=0) + 1.0) + pre_sq * tl.sum(v * v, axis=0) + pre_sq
    c_hyper = tl.minimum(max_norm / (tl.sqrt(hyper_sq) + 1e-6), 1.0)
    c_v = tl.minimum(max_norm / (tl.sqrt(tl.sum(dv * dv, axis=0)) + 1e-6), 1.0)
    tl.store(coef_ptr + n, c_hyper)
    slot = tl.load(slot_ptr)
    tl.store(vfac_ptr + n * stride_vfn + slot * H + hh, h, mask=h_ok)  # the step's rank-one v factor
    on = tl.load(active_ptr + n) != 0
    if on:
        buf = momentum * tl.load(fcw_buf_ptr + w_offs, mask=w_mask, other=0.0) \
            + (c_hyper * d_pre[:, None] * v[None, :] + weight_decay * fc_w)
        tl.store(fcw_buf_ptr + w_offs, buf, mask=w_mask)
        tl.store(fcw_ptr + w_offs, fc_w - lr * buf, mask=w_mask)
        fc_b = tl.load(fcb_ptr + n * H + hh, mask=h_ok, other=0.0)
        buf_b = momentum * tl.load(fcb_buf_ptr + n * H + hh, mask=h_ok, other=0.0) \
            + (c_hyper * d_pre + weight_decay * fc_b)
        tl.store(fcb_buf_ptr + n * H + hh, buf_b, mask=h_ok)
        tl.store(fcb_ptr + n * H + hh, fc_b - lr * buf_b, mask=h_ok)
        buf_v = momentum * tl.load(v_buf_ptr + n * E + ee, mask=e_ok, other=0.0) + (c_v * dv + weight_decay * v)
        tl.store(v_buf_ptr + n * E + ee, buf_v, mask=e_ok)
        tl.store(v_ptr + n * E + ee, v - lr * buf_v, mask=e_ok)
        # the heads in factored form: gamma, delta are the momentum buffer's coefficients of W0 and of each slot
        alpha = tl.load(alpha_ptr + n)
        gamma = momentum * tl.load(gamma_ptr + n) + weight_decay * alpha
        tl.store(gamma_ptr + n, gamma)
        tl.store(alpha_ptr + n, alpha - lr * gamma)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < S
            beta = tl.load(beta_ptr + n * S + s, mask=s_ok, other=0.0)
            delta = momentum * tl.load(delta_ptr + n * S + s, mask=s_ok, other=0.0) + weight_decay * beta
            delta = tl.where(s == slot, 1.0, delta)
            tl.store(delta_ptr + n * S + s, delta, mask=s_ok)
            tl.store(beta_ptr + n * S + s, beta - lr * delta, mask=s_ok)
        tl.store(loss_sum_ptr + n, tl.load(loss_sum_ptr + n) + tl.load(loss_ptr + n))
        tl.store(loss_count_ptr + n, tl.load(loss_count_ptr + n) + 1.0)


@triton.jit
def _heads_update_kernel(g_ptr, coef_ptr, ufac_ptr, slot_ptr, b_ptr, b_buf_ptr, active_ptr, P, stride_gn,
                         stride_ufn, stride_bn, lr, momentum, weight_decay, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = p < P
    grad = tl.load(coef_ptr + n) * tl.load(g_ptr + n * stride_gn + p, mask=ok, other=0.0)
    tl.store(ufac_ptr + n * stride_ufn + tl.load(slot_ptr) * P + p, grad, mask=ok)
    if tl.load(active_ptr + n) != 0:
        b = tl.load(b_ptr + n * stride_bn + p, mask=ok, other=0.0)
        buf = momentum * tl.load(b_buf_ptr + n * P + p, mask=ok, other=0.0) + (grad + weight_decay * b)
        tl.store(b_buf_ptr + n * P + p, buf, mask=ok)
        tl.store(b_ptr + n * stride_bn + p, b - lr * buf, mask=ok)


def client_update(d_hidden, hidden, g_sq, embedding, fc_w, fc_b, embedding_buf, fc_w_buf, fc_b_buf, alpha, gamma,
                  beta, delta, v_factors, slot, active, losses, loss_sum, loss_count, coef, lr: float,
                  momentum: float, weight_decay: float, max_norm: float) -> None:
    """In place (see the module docs); writes clip coefficients of psi into ``coef`` (N,)."""
    n, hdim = hidden.shape
    e, s = embedding.shape[1], beta.shape[1]
    launch(_client_update_kernel, (n,), d_hidden, hidden, g_sq, embedding, fc_w, fc_b, embedding_buf, fc_w_buf,
           fc_b_buf, alpha, gamma, beta, delta, v_factors, slot, active, losses, loss_sum, loss_count, coef,
           hdim, e, s, v_factors.stride(0), float(lr), float(momentum), float(weight_decay), float(max_norm),
           BLOCK_H=max(16, triton.next_power_of_2(hdim)), BLOCK_E=max(16, triton.next_power_of_2(e)),
           BLOCK_S=16, num_warps=8)  # fc_w and its buffer (H x E each) in registers: 8 warps halve the pressure


def heads_update(d_theta, coef, u_factors, slot, head_b, head_b_buf, active, lr: float, momentum: float,
                 weight_decay: float) -> None:
    """In place: u[n, slot] = coef_n dθ_n for every client; SGD on the heads' bias of the active ones."""
    n, p = d_theta.shape
    launch(_heads_update_kernel, (triton.cdiv(p, BLOCK_P), n), d_theta, coef, u_factors, slot, head_b, head_b_buf,
           active, p, d_theta.stride(0), u_factors.stride(0), head_b.stride(0), float(lr), float(momentum),
           float(weight_decay), BLOCK_P=BLOCK_P, num_warps=4)
