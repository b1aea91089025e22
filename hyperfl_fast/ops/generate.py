"""generate_weights: embeddings (N, E) -> theta (N, P) through a shared or per-client hypernetwork.

theta_n = heads(ReLU(fc(v_n))) with the first layer fc (H x E) and the heads (P x H) each either shared by every
client or given per client; ``relu=False`` drops the ReLU (theta_n = heads(fc(v_n)), the last two linear layers of a
deeper hypernetwork such as pFedHN's, whose hidden features feed the heads without an activation).
Triton: :mod:`hyperfl_fast.kernels.generate`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .precision import triton_input_precision
from .validation import check_tensors, expect

MAX_TRITON_HIDDEN = 256  # the split-P transposed GEMV keeps a whole hidden row in registers


def _client(t: torch.Tensor, n: int, shared_dim: int) -> torch.Tensor:
    """Client n's slice of a per-client tensor, or the tensor itself when it is shared."""
    return t if t.dim() == shared_dim else t[n]


def reference(embeddings, fc_weight, fc_bias, head_weight, head_bias, relu=True):
    """theta_n = heads(ReLU(fc(v_n))) (or heads(fc(v_n))), client by client."""
    thetas = []
    for n, v in enumerate(embeddings):
        h = F.linear(v, _client(fc_weight, n, 2), _client(fc_bias, n, 1))  # (H,)
        if relu:
            h = F.relu(h)
        thetas.append(F.linear(h, _client(head_weight, n, 2), _client(head_bias, n, 1)))  # (P,)
    return torch.stack(thetas)


def vectorised(embeddings, fc_weight, fc_bias, head_weight, head_bias, relu=True):
    """A shared layer is one GEMM, a per-client layer a batched GEMV (each layer on its own)."""
    if fc_weight.dim() == 2:
        h = F.linear(embeddings, fc_weight, fc_bias)  # (N, H)
    else:
        h = torch.baddbmm(fc_bias.unsqueeze(-1), fc_weight, embeddings.unsqueeze(-1)).squeeze(-1)
    if relu:
        h = F.relu(h)
    if head_weight.dim() == 2:
        return F.linear(h, head_weight, head_bias)
    return torch.baddbmm(head_bias.unsqueeze(-1), head_weight, h.unsqueeze(-1)).squeeze(-1)  # (N, P)


def fused(embeddings, fc_weight, fc_bias, head_weight, head_bias, relu=True):
    from ..kernels.generate import GenerateWeights

    args = (t.contiguous() for t in (embeddings, fc_weight, fc_bias, head_weight, head_bias))
    return GenerateWeights.apply(*args, relu, triton_input_precision())


OP = dispatch.register(dispatch.Op("generate_weights", reference, vectorised, fused, short="generate"))


def generate_weights(embeddings: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                     head_weight: torch.Tensor, head_bias: torch.Tensor, path: str | None = None,
                     relu: bool = True) -> torch.Tensor:
    """theta (N, P) = ReLU(embeddings fcᵀ + fc_bias) headsᵀ + head_bias, differentiable in every input
    (``relu=False``: the same without the ReLU).

    embeddings (N, E).  Shared hypernetwork: fc_weight (H, E), fc_bias (H,),
    head_weight (P, H), head_bias (P,).  Per-client hypernetworks: the same
    with a leading N.  (The two layers may independently be shared or per-client.)
    """
    op = OP.name
    named = dict(embeddings=embeddings, fc_weight=fc_weight, fc_bias=fc_bias, head_weight=head_weight,
                 head_bias=head_bias)
    check_tensors(op, named)
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"{op}: embeddings must be (N, E) with N >= 1, got shape {tuple(embeddings.shape)}")
    n, e = embeddings.shape
    for name, w in (("fc_weight", fc_weight), ("head_weight", head_weight)):
        if w.dim() == 3 and w.shape[0] != n:
            raise ValueError(f"{op}: {name} has {w.shape[0]} clients, embeddings {n}")
    if fc_weight.dim() not in (2, 3) or fc_weight.shape[-1] != e:
        raise ValueError(f"{op}: fc_weight must be (H, {e}) or ({n}, H, {e}), got {tuple(fc_weight.shape)}")
    h = fc_weight.shape[-2]
    expect(op, "fc_bias", fc_bias, ((n,) if fc_weight.dim() == 3 else ()) + (h,))
    if head_weight.dim() not in (2, 3) or head_weight.shape[-1] != h:
        raise ValueError(f"{op}: head_weight must be (P, {h}) or ({n}, P, {h}), got {tuple(head_weight.shape)}")
    expect(op, "head_bias", head_bias, ((n,) if head_weight.dim() == 3 else ()) + (head_weight.shape[-2],))
    args = (embeddings, fc_weight, fc_bias, head_weight, head_bias, bool(relu))

    def check(chosen: str) -> None:
        if chosen == "triton" and h > MAX_TRITON_HIDDEN:
            raise ValueError(f"{op}: the triton path supports hidden size <= {MAX_TRITON_HIDDEN}, got {h}")

    return dispatch.call(OP, path, args, f"{op}/{'shared' if head_weight.dim() == 2 else 'per-client'}", check)
