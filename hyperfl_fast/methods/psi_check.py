"""A HyperFL client's check of the hypernetwork it receives, before it trains (``--psi-check``).

A malicious server can send a psi whose generated weights do not depend on the embedding at all (zero head
weights, the attacker's ``theta*`` as head bias: every client then trains the attacker's network, the imprint
attack of :mod:`hyperfl_fast.privacy.analytic`).  The client measures how much its generated weights move with
its embedding, relative to their size:

    sensitivity = ‖∂theta/∂v‖_F · ‖v‖ / ‖theta‖,   theta = W_out · ReLU(W_fc v + b_fc) + b_out

and refuses the round (trains nothing, uploads nothing) below :data:`SENSITIVITY_FLOOR`.  ``‖∂theta/∂v‖_F``
is exact and cheap: with ``G = W_outᵀ W_out`` (H, H), computed once per round, and ``A = diag(relu') W_fc``
(H, E) per client, it is ``sqrt(sum(G A ⊙ A))``.

It stops a server that sends a crafted psi as it is.  It does not stop one that knows the check: the server
can add embedding-dependence to weights the attack does not need (``imprint-evasive``).  And with the shared
client start (``--client-init shared``, the authors' and the default) most honest clients fail it: after the
first round every hidden unit of the hypernetwork is inactive for 15 of 20 Fashion-MNIST clients, so their
weights are the heads' bias alone and do not depend on their embedding at all; with ``--client-init
independent`` honest clients measured 3.0 to 11.4 (benchmarks/RESULTS.md).  Hence off by default.
"""
from __future__ import annotations

import torch

# a crafted psi gives exactly 0; honest clients with live hidden units measured 3.0 to 11.4 (benchmarks/RESULTS.md)
SENSITIVITY_FLOOR = 1e-2


@torch.no_grad()
def embedding_sensitivity(psi: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """(N,) ‖∂theta/∂v‖_F · ‖v‖ / ‖theta‖ of the weights ``psi`` generates for each of ``embeddings`` (N, E)."""
    w_fc, b_fc, w_out, b_out = (psi[k] for k in ("fc.weight", "fc.bias", "heads.weight", "heads.bias"))
    gram = w_out.t() @ w_out  # (H, H)
    pre = embeddings @ w_fc.t() + b_fc  # (N, H)
    jac = (pre > 0).to(w_fc.dtype)[:, :, None] * w_fc  # (N, H, E): d hidden / d v
    jac_norm = ((gram @ jac) * jac).sum((1, 2)).clamp(min=0).sqrt()
    hidden = pre.clamp(min=0)
    theta = hidden @ w_out.t() + b_out  # (N, P)
    return jac_norm * embeddings.norm(dim=1) / theta.norm(dim=1).clamp(min=torch.finfo(theta.dtype).tiny)


def refusals(psi: dict[str, torch.Tensor], embeddings: torch.Tensor,
             floor: float = SENSITIVITY_FLOOR) -> list[str | None]:
    """For each client (its embedding a row of ``embeddings``): why it refuses ``psi``, or None to accept."""
    return [None if s >= floor else
            f"its weights barely depend on the embedding (sensitivity {s:.2g} < {floor:g})"
            for s in embedding_sensitivity(psi, embeddings).tolist()]
