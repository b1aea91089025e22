"""hypernet_client_update and hypernet_heads_update: the end of a lockstep HyperFL hypernetwork step.

Per client n, with the hypernetwork theta = heads(ReLU(fc(v))) and its heads held factored (:mod:`.factored`),
given the loss gradient at theta dθ (N, P), dh = W_nᵀ dθ and ‖dθ‖² from ``factored_rmatvec``, and h = ReLU(fc(v)):

``hypernet_client_update`` (everything H x E or smaller):

- d_pre = dh * (h > 0); the gradients of fc_w (d_pre ⊗ v), fc_b (d_pre) and the embedding v (fc_wᵀ d_pre);
- ``clip_grad_norm_``'s coefficient for the hypernetwork, from its gradient's norm
  sqrt(‖dθ‖²(‖h‖² + 1) + ‖dfc_w‖² + ‖dfc_b‖²) (the heads' weight gradient is dθ ⊗ h), and for v; the former
  is written to ``coef`` for the heads' update;
- SGD (momentum, weight decay) on fc_w, fc_b, v, and on the factored heads' scalars: gamma = m gamma + wd alpha,
  delta = m delta + wd beta with delta[slot] = 1, alpha -= lr gamma, beta -= lr delta; v_factors[n, slot] = h;
- loss_sum += loss, loss_count += 1.

``hypernet_heads_update``: u_factors[n, slot] = coef_n dθ_n, and SGD on the heads' bias with gradient coef_n dθ_n.

Clients with ``active`` False keep every parameter, buffer and loss count (their factor slots are written but
carry beta = 0).  ``slot`` is a one-element int64 tensor (device-resident, so a CUDA graph can replay the step);
the caller advances it.  Triton: :mod:`hyperfl_fast.kernels.hypernet_sgd` (one launch each).
"""
from __future__ import annotations

import torch

from . import dispatch
from .sgd import masked_sgd_
from .validation import check_scalars, check_tensors, expect, expect_contiguous

CLIENT_ARGS = ("d_hidden", "hidden", "g_sq", "embedding", "fc_w", "fc_b", "embedding_buf", "fc_w_buf", "fc_b_buf",
               "alpha", "gamma", "beta", "delta", "v_factors", "slot", "active", "losses", "loss_sum", "loss_count",
               "coef")


def _clip(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s scale factor: min(1, max_norm / (norm + 1e-6))."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def reference_client_update(d_hidden, hidden, g_sq, embedding, fc_w, fc_b, embedding_buf, fc_w_buf, fc_b_buf, alpha,
                            gamma, beta, delta, v_factors, slot, active, losses, loss_sum, loss_count, coef, lr,
                            momentum, weight_decay, max_norm):
    """Client by client, each gradient materialised, with ``clip_grad_norm_``'s own norm."""
    s = int(slot)
    for n in range(len(hidden)):
        d_pre = d_hidden[n] * (hidden[n] > 0)
        d_fc_w, d_v = torch.outer(d_pre, embedding[n]), fc_w[n].t() @ d_pre
        head_w_sq = g_sq[n] * (hidden[n] @ hidden[n])  # ‖dθ ⊗ h‖²
        c_hyper = _clip(torch.sqrt(head_w_sq + g_sq[n] + d_fc_w.pow(2).sum() + d_pre @ d_pre), max_norm)
        coef[n] = c_hyper
        v_factors[n, s] = hidden[n]
        if not active[n]:
            continue
        for param, buf, grad in ((fc_w[n], fc_w_buf[n], c_hyper * d_fc_w), (fc_b[n], fc_b_buf[n], c_hyper * d_pre),
                                 (embedding[n], embedding_buf[n], _clip(d_v.norm(), max_norm) * d_v)):
            buf.mul_(momentum).add_(grad + weight_decay * param)
            param.sub_(lr * buf)
        gamma[n] = momentum * gamma[n] + weight_decay * alpha[n]
        delta[n] = momentum * delta[n] + weight_decay * beta[n]
        delta[n, s] = 1.0
        alpha[n] -= lr * gamma[n]
        beta[n] -= lr * delta[n]
        loss_sum[n] += losses[n]
        loss_count[n] += 1


@torch.no_grad()
def vectorised_client_update(d_hidden, hidden, g_sq, embedding, fc_w, fc_b, embedding_buf, fc_w_buf, fc_b_buf,
                             alpha, gamma, beta, delta, v_factors, slot, active, losses, loss_sum, loss_count, coef,
                             lr, momentum, weight_decay, max_norm):
    """All clients at once (the lockstep engine's arithmetic)."""
    d_pre = d_hidden * (hidden > 0)  # (N, H)
    d_fc_w = d_pre.unsqueeze(2) * embedding.unsqueeze(1)  # (N, H, E)
    d_embedding = torch.bmm(d_pre.unsqueeze(1), fc_w).squeeze(1)  # (N, E)
    hyper_norm = (g_sq * (hidden.pow(2).sum(1) + 1.0) + d_fc_w.pow(2).sum((1, 2)) + d_pre.pow(2).sum(1)).sqrt()
    coef.copy_(_clip(hyper_norm, max_norm))
    c_hyper = coef[:, None]
    masked_sgd_([fc_w, fc_b], [d_fc_w * c_hyper[:, :, None], d_pre * c_hyper], [fc_w_buf, fc_b_buf], active, lr,
                momentum, weight_decay)
    masked_sgd_([embedding], [d_embedding * _clip(d_embedding.norm(dim=1), max_norm)[:, None]], [embedding_buf],
                active, lr, momentum, weight_decay)
    v_factors.index_copy_(1, slot, hidden.unsqueeze(1))
    new_gamma = momentum * gamma + weight_decay * alpha
    new_delta = (momentum * delta + weight_decay * beta).index_fill_(1, slot, 1.0)
    keep = active[:, None]
    alpha.copy_(torch.where(active, alpha - lr * new_gamma, alpha))
    beta.copy_(torch.where(keep, beta - lr * new_delta, beta))
    gamma.copy_(torch.where(active, new_gamma, gamma))
    delta.copy_(torch.where(keep, new_delta, delta))
    loss_sum.add_(losses * active)
    loss_count.add_(active)


def fused_client_update(*args):
    from ..kernels.hypernet_sgd import client_update

    client_update(*args)


@torch.no_grad()
def reference_heads_update(d_theta, coef, u_factors, slot, head_b, head_b_buf, active, lr, momentum, weight_decay):
    s = int(slot)
    for n in range(len(d_theta)):
        grad = coef[n] * d_theta[n]
        u_factors[n, s] = grad
        if active[n]:
            head_b_buf[n].mul_(momentum).add_(grad + weight_decay * head_b[n])
            head_b[n].sub_(lr * head_b_buf[n])


@torch.no_grad()
def vectorised_heads_update(d_theta, coef, u_factors, slot, head_b, head_b_buf, active, lr, momentum, weight_decay):
    grad = d_theta * coef[:, None]
    u_factors.index_copy_(1, slot, grad.unsqueeze(1))
    masked_sgd_([head_b], [grad], [head_b_buf], active, lr, momentum, weight_decay)


def fused_heads_update(*args):
    from ..kernels.hypernet_sgd import heads_update

    heads_update(*args)


CLIENT = dispatch.register(dispatch.Op("hypernet_client_update", reference_client_update, vectorised_client_update,
                                       fused_client_update, mutates=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 18, 19),
                                       short="hypernet_update"))
HEADS = dispatch.register(dispatch.Op("hypernet_heads_update", reference_heads_update, vectorised_heads_update,
                                      fused_heads_update, mutates=(2, 4, 5), short="heads_update"))


def hypernet_client_update(d_hidden, hidden, g_sq, embedding, fc_w, fc_b, embedding_buf, fc_w_buf, fc_b_buf, alpha,
                           gamma, beta, delta, v_factors, slot, active, losses, loss_sum, loss_count, coef,
                           lr: float, momentum: float, weight_decay: float, max_norm: float,
                           path: str | None = None) -> None:
    """In place (see the module docs).  Shapes: d_hidden, hidden, fc_b, fc_b_buf (N, H); g_sq, alpha, gamma, active,
    losses, loss_sum, loss_count, coef (N,); embedding, embedding_buf (N, E); fc_w, fc_w_buf (N, H, E); beta,
    delta (N, S); v_factors (N, S, H); slot (1,) int64."""
    op = CLIENT.name
    args = (d_hidden, hidden, g_sq, embedding, fc_w, fc_b, embedding_buf, fc_w_buf, fc_b_buf, alpha, gamma, beta,
            delta, v_factors, slot, active, losses, loss_sum, loss_count, coef)
    named = dict(zip(CLIENT_ARGS, args))
    check_tensors(op, {k: t for k, t in named.items() if k not in ("slot", "active")})
    check_tensors(op, dict(hidden=hidden, slot=slot, active=active), float_only=False)
    check_scalars(op, lr=lr, momentum=momentum, weight_decay=weight_decay, max_norm=max_norm)
    if hidden.dim() != 2 or embedding.dim() != 2 or beta.dim() != 2:
        raise ValueError(f"{op}: hidden (N, H), embedding (N, E) and beta (N, S) must be 2-d")
    (n, h), e, s = hidden.shape, embedding.shape[1], beta.shape[1]
    for name, shape in (("d_hidden", (n, h)), ("fc_b", (n, h)), ("fc_b_buf", (n, h)), ("embedding", (n, e)),
                        ("embedding_buf", (n, e)), ("fc_w", (n, h, e)), ("fc_w_buf", (n, h, e)), ("delta", (n, s)),
                        ("v_factors", (n, s, h)), ("slot", (1,)), *((k, (n,)) for k in (
                            "g_sq", "alpha", "gamma", "active", "losses", "loss_sum", "loss_count", "coef"))):
        expect(op, name, named[name], shape)
    expect_contiguous(op, {k: named[k] for k in CLIENT_ARGS if k not in ("v_factors", "slot")})
    dispatch.call(CLIENT, path, args + (lr, momentum, weight_decay, max_norm))


def hypernet_heads_update(d_theta, coef, u_factors, slot, head_b, head_b_buf, active, lr: float, momentum: float,
                          weight_decay: float, path: str | None = None) -> None:
    """In place: u_factors[n, slot] = coef_n d_theta_n; SGD on head_b (N, P) with that gradient where active."""
    op = HEADS.name
    check_tensors(op, dict(d_theta=d_theta, coef=coef, u_factors=u_factors, head_b=head_b, head_b_buf=head_b_buf))
    check_scalars(op, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if d_theta.dim() != 2:
        raise ValueError(f"{op}: d_theta must be (N, P), got {tuple(d_theta.shape)}")
    n, p = d_theta.shape
    expect(op, "coef", coef, (n,))
    if u_factors.dim() != 3 or u_factors.shape[0] != n or u_factors.shape[2] != p:
        raise ValueError(f"{op}: u_factors must be ({n}, S, {p}), got {tuple(u_factors.shape)}")
    for name, t in (("head_b", head_b), ("head_b_buf", head_b_buf)):
        expect(op, name, t, (n, p))
    expect(op, "slot", slot, (1,))
    expect(op, "active", active, (n,))
    expect_contiguous(op, dict(head_b=head_b, head_b_buf=head_b_buf))
    dispatch.call(HEADS, path, (d_theta, coef, u_factors, slot, head_b, head_b_buf, active, lr, momentum,
                                weight_decay))
