"""Fused backward + clipped SGD step for the per-client hypernetwork heads.

For one client the heads' weight gradient is the outer product ``dtheta ⊗ h``
(P x H).  This kernel never materialises it: each program forms its tile of
the gradient in registers and applies, in the same single pass over the head
matrix W and its momentum buffer (each read once and written once)::

    g   = clip_coef * dtheta[p] * h[c] + weight_decay * W[p, c]
    buf = momentum * buf + g
    W   = W - lr * buf

which is ``clip_grad_norm_`` (scale by ``clip_coef``) followed by
``torch.optim.SGD.step`` with zero-initialised buffers (identical to SGD's
first step).  The bias (P,) is updated the same way with gradient ``dtheta``.
The clip coefficient comes from the closed-form norm in
:func:`hyperfl_fast.ops.head_grad_sq_norm`, computed without touching W.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch import launch

BLOCK_P = 32


@triton.jit
def _head_sgd_kernel(w_ptr, wbuf_ptr, b_ptr, bbuf_ptr, dtheta_ptr, hidden_ptr, coef_ptr, P, H,
                     lr, momentum, weight_decay, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)  # N P H passes 2**31 at about 145 clients of the fmnist model
    rp = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rh = tl.arange(0, BLOCK_H)
    coef = tl.load(coef_ptr + n)
    g_row = tl.load(dtheta_ptr + n * P + rp, mask=rp < P, other=0.0) * coef  # (BLOCK_P,)
    h = tl.load(hidden_ptr + n * H + rh, mask=rh < H, other=0.0)  # (BLOCK_H,)

    mask = (rp[:, None] < P) & (rh[None, :] < H)
    offs = n * P * H + rp[:, None] * H + rh[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    buf = tl.load(wbuf_ptr + offs, mask=mask, other=0.0)
    buf = momentum * buf + (g_row[:, None] * h[None, :] + weight_decay * w)
    tl.store(wbuf_ptr + offs, buf, mask=mask)
    tl.store(w_ptr + offs, w - lr * buf, mask=mask)

    b = tl.load(b_ptr + n * P + rp, mask=rp < P, other=0.0)
    bbuf = tl.load(bbuf_ptr + n * P + rp, mask=rp < P, other=0.0)
    bbuf = momentum * bbuf + (g_row + weight_decay * b)
    tl.store(bbuf_ptr + n * P + rp, bbuf, mask=rp < P)
    tl.store(b_ptr + n * P + rp, b - lr * bbuf, mask=rp < P)


def head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef,
                  lr: float, momentum: float, weight_decay: float) -> None:
    """In-place fused step; all tensors contiguous float32 on one device (validated by the caller)."""
    n, p, h = head_weight.shape
    grid = (triton.cdiv(p, BLOCK_P), n)
    launch(_head_sgd_kernel, grid, head_weight, weight_buf, head_bias, bias_buf, d_theta, hidden, clip_coef, p, h,
           float(lr), float(momentum), float(weight_decay), BLOCK_P=BLOCK_P, BLOCK_H=triton.next_power_of_2(h))
