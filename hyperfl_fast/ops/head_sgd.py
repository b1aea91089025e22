"""fused_head_sgd_step and head_grad_sq_norm: clipped SGD on per-client (dense) hypernetwork heads.

For theta_n = W_n h_n + b_n the heads' gradient is dW_n = dθ_n ⊗ h_n, db_n = dθ_n.  The step applies
``clip_grad_norm_``'s coefficient and ``torch.optim.SGD`` (momentum, weight decay; zero-started buffers) without
materialising dW; its squared norm has the closed form ‖dθ_n‖² (‖h_n‖² + 1).  For code bases that keep the heads
dense per client (this package's lockstep engine keeps them factored, :mod:`.factored`).
Triton: :mod:`hyperfl_fast.kernels.head_sgd` (W and its buffer read and written once).
"""
from __future__ import annotations

import torch

from . import dispatch
from .validation import check_scalars, check_tensors, expect, expect_contiguous

MAX_TRITON_HIDDEN = 1024


def reference(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef, lr, momentum,
              weight_decay):
    """In place, per client: grad = clip_coef * (d_theta outer hidden); SGD with momentum and weight decay."""
    for n in range(head_weight.shape[0]):
        for param, buf, grad in ((head_weight[n], weight_buf[n], torch.outer(d_theta[n], hidden[n])),
                                 (head_bias[n], bias_buf[n], d_theta[n])):
            d = clip_coef[n] * grad + weight_decay * param
            buf.mul_(momentum).add_(d)
            param.sub_(lr * buf)


@torch.no_grad()
def vectorised(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef, lr, momentum,
               weight_decay):
    """In place, all clients at once (``baddbmm_`` adds the outer products without materialising them)."""
    scaled = d_theta * clip_coef.unsqueeze(1)  # (N, P)
    weight_buf.mul_(momentum).add_(head_weight, alpha=weight_decay)
    weight_buf.baddbmm_(scaled.unsqueeze(2), hidden.unsqueeze(1))  # += outer product, per client
    head_weight.sub_(weight_buf, alpha=lr)
    bias_buf.mul_(momentum).add_(head_bias, alpha=weight_decay).add_(scaled)
    head_bias.sub_(bias_buf, alpha=lr)


def fused(head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef, lr, momentum, weight_decay):
    from ..kernels.head_sgd import head_sgd_step

    head_sgd_step(head_weight, head_bias, weight_buf, bias_buf, d_theta.contiguous(), hidden.contiguous(),
                  clip_coef.contiguous(), lr, momentum, weight_decay)


OP = dispatch.register(dispatch.Op("fused_head_sgd_step", reference, vectorised, fused, mutates=(0, 1, 2, 3), short="head_sgd"))


def head_grad_sq_norm(d_theta: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per-client squared norm of the heads' gradient, from its closed form, without touching the heads.

    For theta_n = W_n h_n + b_n the gradients are dW_n = dtheta_n ⊗ h_n and
    db_n = dtheta_n, so ``‖dW_n‖² + ‖db_n‖² = ‖dtheta_n‖² (‖h_n‖² + 1)``.
    d_theta (N, P), hidden (N, H) -> (N,).
    """
    op = "head_grad_sq_norm"
    check_tensors(op, dict(d_theta=d_theta, hidden=hidden))
    if d_theta.dim() != 2 or hidden.dim() != 2 or d_theta.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: d_theta must be (N, P) and hidden (N, H) with the same N, got "
                         f"{tuple(d_theta.shape)} and {tuple(hidden.shape)}")
    return d_theta.pow(2).sum(1) * (hidden.pow(2).sum(1) + 1.0)


def fused_head_sgd_step(head_weight: torch.Tensor, head_bias: torch.Tensor, weight_buf: torch.Tensor,
                        bias_buf: torch.Tensor, d_theta: torch.Tensor, hidden: torch.Tensor,
                        clip_coef: torch.Tensor, lr: float, momentum: float, weight_decay: float,
                        path: str | None = None) -> None:
    """In place: SGD (momentum, weight decay) on per-client heads with gradient clip_coef * (dtheta ⊗ h).

    head_weight, weight_buf (N, P, H); head_bias, bias_buf (N, P); d_theta (N, P);
    hidden (N, H); clip_coef (N,).  Equivalent to ``clip_grad_norm_`` (which
    scales by ``clip_coef``) then ``torch.optim.SGD.step``; momentum buffers
    must start at zero.  The triton path reads and writes the heads and their
    buffer once each.
    """
    op = OP.name
    named = dict(head_weight=head_weight, head_bias=head_bias, weight_buf=weight_buf, bias_buf=bias_buf,
                 d_theta=d_theta, hidden=hidden, clip_coef=clip_coef)
    check_tensors(op, named)
    check_scalars(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if head_weight.dim() != 3:
        raise ValueError(f"{op}: head_weight must be (N, P, H), got shape {tuple(head_weight.shape)}")
    n, p, h = head_weight.shape
    for name, shape in (("head_bias", (n, p)), ("weight_buf", (n, p, h)), ("bias_buf", (n, p)),
                        ("d_theta", (n, p)), ("hidden", (n, h)), ("clip_coef", (n,))):
        expect(op, name, named[name], shape)
    expect_contiguous(op, {k: named[k] for k in ("head_weight", "head_bias", "weight_buf", "bias_buf")})

    def check(chosen: str) -> None:
        if chosen == "triton" and h > MAX_TRITON_HIDDEN:
            raise ValueError(f"{op}: the triton path supports hidden size <= {MAX_TRITON_HIDDEN}, got {h}")

    dispatch.call(OP, path, (head_weight, head_bias, weight_buf, bias_buf, d_theta, hidden, clip_coef, lr, momentum,
                             weight_decay), check=check)
