"""factored_generate and factored_rmatvec: per-client hypernetworks whose heads are kept in factored form.

W_n = alpha_n W0 + sum_{s < span} beta_{n,s} u_{n,s} v_{n,s}ᵀ with W0 (P, H) shared, u (N, S, P), v (N, S, H),
alpha (N,), beta (N, S); only the first ``span`` of the S slots are read.  This is how the lockstep engine holds
every client's hypernetwork heads during a round (SGD keeps them in that span exactly; see
:mod:`hyperfl_fast.lockstep.hypernet`), so generation never materialises N copies of a 59 MB matrix.

- ``factored_generate``: the hypernetwork's forward, h_n = ReLU(fc_w_n e_n + fc_b_n) (N, H) and
  theta_n = W_n h_n + bias_n (N, P).
- ``factored_rmatvec``: (W_nᵀ g_n (N, H), ‖g_n‖² (N,)), the chain rule's first step and the norm the clip needs.

Triton: :mod:`hyperfl_fast.kernels.factored` (two launches each, the factors streamed once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .precision import triton_input_precision
from .validation import check_tensors, expect


def _dense(w0, u, v, alpha, beta, span, n):
    """Client n's head matrix W_n (P, H), materialised (the reference's view)."""
    return alpha[n] * w0 + (u[n, :span] * beta[n, :span, None]).t() @ v[n, :span]


def reference_generate(embedding, fc_w, fc_b, bias, w0, u, v, alpha, beta, span):
    """Client by client: the first layer, then the materialised W_n."""
    hidden = torch.stack([F.relu(fc_w[n] @ embedding[n] + fc_b[n]) for n in range(len(embedding))])
    theta = torch.stack([_dense(w0, u, v, alpha, beta, span, n) @ hidden[n] + bias[n] for n in range(len(hidden))])
    return theta, hidden


def vectorised_generate(embedding, fc_w, fc_b, bias, w0, u, v, alpha, beta, span):
    """The first layer as one ``baddbmm``; one GEMM against the shared W0, then the low-rank terms in place."""
    hidden = torch.baddbmm(fc_b.unsqueeze(2), fc_w, embedding.unsqueeze(2)).squeeze(2).relu()  # (N, H)
    theta = torch.addmm(bias, alpha[:, None] * hidden, w0.t())
    if span:
        coeff = beta[:, :span] * torch.bmm(v[:, :span], hidden.unsqueeze(2)).squeeze(2)  # (N, span)
        theta.unsqueeze(1).baddbmm_(coeff.unsqueeze(1), u[:, :span])  # += sum_s coeff_s u_s
    return theta, hidden


def fused_generate(embedding, fc_w, fc_b, bias, w0, u, v, alpha, beta, span):
    from ..kernels.factored import generate

    return generate(embedding.contiguous(), fc_w.contiguous(), fc_b.contiguous(), bias, w0.contiguous(), u, v,
                    alpha.contiguous(), beta.contiguous(), span, triton_input_precision())


def reference_rmatvec(g, w0, u, v, alpha, beta, span):
    """Client by client: materialise W_n, multiply by its transpose; the squared norm."""
    back = torch.stack([_dense(w0, u, v, alpha, beta, span, n).t() @ g[n] for n in range(len(g))])
    return back, torch.stack([g[n] @ g[n] for n in range(len(g))])


def vectorised_rmatvec(g, w0, u, v, alpha, beta, span):
    """One GEMM against W0; the low-rank terms as row-vector products (with MKL several times faster than U g)."""
    out = (alpha[:, None] * g) @ w0
    if span:
        coeff = beta[:, :span] * torch.bmm(g.unsqueeze(1), u[:, :span].transpose(1, 2)).squeeze(1)  # (N, span)
        out = out + torch.bmm(coeff.unsqueeze(1), v[:, :span]).squeeze(1)
    return out, g.pow(2).sum(1)


def fused_rmatvec(g, w0, u, v, alpha, beta, span):
    from ..kernels.factored import rmatvec

    return rmatvec(g if g.stride(-1) == 1 else g.contiguous(), w0.contiguous(), u, v, alpha.contiguous(),
                   beta.contiguous(), span, triton_input_precision())


def _full_span(args: tuple) -> tuple:
    """The call at the factors' full span: what a measurement times (a round's first step reads none of them)."""
    *rest, _ = args
    return (*rest, args[-2].shape[1])  # (..., beta (N, S), span)


GENERATE = dispatch.register(dispatch.Op("factored_generate", reference_generate, vectorised_generate,
                                         fused_generate, short="factored_generate", measure_as=_full_span))
RMATVEC = dispatch.register(dispatch.Op("factored_rmatvec", reference_rmatvec, vectorised_rmatvec, fused_rmatvec,
                                        short="factored_rmatvec", measure_as=_full_span))


def _check(op: str, first_name: str, first, w0, u, v, alpha, beta, span) -> None:
    check_tensors(op, {first_name: first, "w0": w0, "u": u, "v": v, "alpha": alpha, "beta": beta})
    if w0.dim() != 2 or first.dim() != 2:
        raise ValueError(f"{op}: w0 must be (P, H) and {first_name} 2-d, got {tuple(w0.shape)}, {tuple(first.shape)}")
    p, h = w0.shape
    n = first.shape[0]
    if u.dim() != 3 or u.shape[0] != n or u.shape[2] != p:
        raise ValueError(f"{op}: u must be ({n}, S, {p}), got {tuple(u.shape)}")
    s = u.shape[1]
    expect(op, "v", v, (n, s, h))
    expect(op, "alpha", alpha, (n,))
    expect(op, "beta", beta, (n, s))
    if isinstance(span, bool) or not isinstance(span, int) or not 0 <= span <= s:
        raise ValueError(f"{op}: span must be an int in [0, {s}], got {span!r}")
    if u.stride(2) != 1 or u.stride(1) != p or v.stride(2) != 1 or v.stride(1) != h:
        raise ValueError(f"{op}: u and v need contiguous slots (any stride between clients)")


def factored_generate(embedding: torch.Tensor, fc_w: torch.Tensor, fc_b: torch.Tensor, bias: torch.Tensor,
                      w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                      span: int, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (N, P), hidden (N, H)) of every client's hypernetwork: hidden = ReLU(fc_w embedding + fc_b) with
    embedding (N, E), fc_w (N, H, E), fc_b (N, H); theta = W_n hidden_n + bias_n with bias (N, P).  Not
    differentiable: the lockstep engine applies the chain rule by hand (:func:`factored_rmatvec`)."""
    op = GENERATE.name
    check_tensors(op, dict(embedding=embedding, fc_w=fc_w, fc_b=fc_b, bias=bias))
    _check(op, "bias", bias, w0, u, v, alpha, beta, span)
    n, (p, h) = u.shape[0], w0.shape
    if embedding.dim() != 2 or embedding.shape[0] != n:
        raise ValueError(f"{op}: embedding must be ({n}, E), got {tuple(embedding.shape)}")
    expect(op, "fc_w", fc_w, (n, h, embedding.shape[1]))
    expect(op, "fc_b", fc_b, (n, h))
    expect(op, "bias", bias, (n, p))
    return dispatch.call(GENERATE, path, (embedding, fc_w, fc_b, bias, w0, u, v, alpha, beta, span))


def factored_rmatvec(g: torch.Tensor, w0: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                     beta: torch.Tensor, span: int, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_nᵀ g_n, ‖g_n‖²) for every client: g (N, P) -> (N, H), (N,)."""
    op = RMATVEC.name
    _check(op, "g", g, w0, u, v, alpha, beta, span)
    expect(op, "g", g, (u.shape[0], w0.shape[0]))
    return dispatch.call(RMATVEC, path, (g, w0, u, v, alpha, beta, span))
