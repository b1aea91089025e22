"""Every sampled client's own hypernetwork during a HyperFL round, trained in lockstep: one home for psi_n.

In the hypernetwork phase each client n trains its copy psi_n = (fc_n, heads_n) of the received psi together
with its embedding v_n: theta_n = heads_n(ReLU(fc_n(v_n))).  :class:`LockstepHypernetwork` owns those copies,
their SGD state, the hand-written backward from dθ to (psi_n, v_n), the clip norms, and the server's weighted
sum.  Each piece is one fused op of :mod:`hyperfl_fast.ops` (Triton or vectorised torch, chosen per op).

**Heads in factored form.**  The heads' gradient at step s is the outer product ``dθ_s ⊗ h_s`` (P x H, rank
one).  Under SGD with momentum and weight decay the heads and their momentum buffer therefore stay exactly in
the span of the round's starting matrix W0 and these rank-one terms::

    W_t   = alpha_t W0 + sum_s beta_{t,s} u_s v_sᵀ        (u_s = c_s dθ_s,  v_s = h_s)
    buf_t = gamma_t W0 + sum_s delta_{t,s} u_s v_sᵀ

with scalar recurrences (``ops.hypernet_client_update``).  Generation is then one GEMM against the shared W0
plus a thin low-rank term (``ops.factored_generate``), the backward likewise (``ops.factored_rmatvec``), and
the optimizer step of the heads touches only scalars: no pass over the 59 MB per-client head matrices.  The
server's weighted average of the clients' W_n is one GEMM over the stacked factors, equal to averaging the
materialised uploads.

**Persistent buffers.**  Every tensor is allocated once for N clients and a capacity of S steps per round and
reset in place by :meth:`start`, so a CUDA graph recorded over a step stays valid for every later round.
The next step's slot lives on the device; the host counts steps and refuses one past the capacity.  With
``static`` the products read all S slots (the unused ones are zero, their beta 0) instead of the steps
taken so far, which keeps their shapes fixed for graph replay.
"""
from __future__ import annotations

import torch

from .. import ops

State = dict[str, torch.Tensor]


class LockstepHypernetwork:
    """psi_n for N clients (fc (N, H, E), fc bias (N, H), heads in factored form, heads' bias (N, P)), the SGD
    state of psi_n and of the embeddings v_n, and the epoch's loss bookkeeping, for rounds of up to
    ``capacity`` steps."""

    def __init__(self, num_clients: int, embed_dim: int, hidden_dim: int, num_params: int, capacity: int,
                 device: torch.device, dtype: torch.dtype, static: bool = False):
        n, e, h, p, s = num_clients, embed_dim, hidden_dim, num_params, capacity

        def zeros(*shape):
            return torch.zeros(*shape, device=device, dtype=dtype)

        self.capacity, self.static, self.steps = capacity, static, 0
        self.fc_w, self.fc_b, self.head_b, self.w0 = zeros(n, h, e), zeros(n, h), zeros(n, p), zeros(p, h)
        self.fc_w_buf, self.fc_b_buf, self.head_b_buf, self.embedding_buf = (zeros(n, h, e), zeros(n, h),
                                                                            zeros(n, p), zeros(n, e))
        self.u, self.v = zeros(n, s, p), zeros(n, s, h)  # the rank-one factors, slot by slot
        self.alpha, self.gamma, self.beta, self.delta = zeros(n), zeros(n), zeros(n, s), zeros(n, s)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the next step's slot
        self.loss_sum, self.loss_count, self.coef = zeros(n), zeros(n), zeros(n)
        self.ones = torch.ones(n, device=device, dtype=dtype)  # d(sum of the clients' losses) / d(loss_n)

    @property
    def span(self) -> int:
        """How many slots the products read: the steps taken so far, or all of them when ``static``."""
        return self.capacity if self.static else self.steps

    def start(self, psi: State) -> None:
        """Every client receives ``psi``: its copy starts from it with fresh optimizer state and no slots."""
        self.fc_w.copy_(psi["fc.weight"].expand_as(self.fc_w))
        self.fc_b.copy_(psi["fc.bias"].expand_as(self.fc_b))
        self.head_b.copy_(psi["heads.bias"].expand_as(self.head_b))
        self.w0.copy_(psi["heads.weight"])
        for t in (self.fc_w_buf, self.fc_b_buf, self.head_b_buf, self.embedding_buf, self.u, self.v, self.gamma,
                  self.beta, self.delta, self.slot):
            t.zero_()
        self.alpha.fill_(1.0)
        self.steps = 0
        self.new_epoch()

    def new_epoch(self) -> None:
        """Reset the loss bookkeeping (the mean loss of the last epoch is reported)."""
        self.loss_sum.zero_()
        self.loss_count.zero_()

    def generate(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta (N, P), hidden (N, H)): theta_n = h(v_n; psi_n) for the embeddings (N, E)."""
        return ops.factored_generate(embedding, self.fc_w, self.fc_b, self.head_b, self.w0, self.u, self.v,
                                     self.alpha, self.beta, self.span)

    def sgd_step(self, d_theta: torch.Tensor, hidden: torch.Tensor, embedding: torch.Tensor, losses: torch.Tensor,
                 active: torch.Tensor, lr: float, momentum: float, weight_decay: float, max_norm: float) -> None:
        """From the loss gradient at theta (N, P), by hand: dθ -> (psi_n, v_n), each clipped to ``max_norm``
        (psi and v separately), one SGD step each for the ``active`` clients; the embeddings in place."""
        if not self.static and self.steps >= self.capacity:  # (static: graph replays are bounded by StepGraph)
            raise RuntimeError(f"LockstepHypernetwork: step {self.steps + 1} exceeds the round's capacity of "
                               f"{self.capacity} steps (batches per epoch x local epochs)")
        d_hidden, d_theta_sq = ops.factored_rmatvec(d_theta, self.w0, self.u, self.v, self.alpha, self.beta,
                                                    self.span)
        ops.hypernet_client_update(d_hidden, hidden, d_theta_sq, embedding, self.fc_w, self.fc_b, self.embedding_buf,
                                   self.fc_w_buf, self.fc_b_buf, self.alpha, self.gamma, self.beta, self.delta, self.v,
                                   self.slot, active, losses, self.loss_sum, self.loss_count, self.coef, lr, momentum,
                                   weight_decay, max_norm)
        ops.hypernet_heads_update(d_theta, self.coef, self.u, self.slot, self.head_b, self.head_b_buf, active, lr,
                                  momentum, weight_decay)
        self.slot += 1
        self.steps += 1

    def mean_loss(self) -> torch.Tensor:
        """Each client's mean loss over the steps of the current epoch: (N,)."""
        return self.loss_sum / self.loss_count

    def weighted_sum(self, weights: torch.Tensor) -> State:
        """The server's new psi: sum_n weights_n psi_n (the heads as one GEMM over the stacked factors)."""
        s = self.span
        scaled_v = (self.v[:, :s] * (weights[:, None] * self.beta[:, :s])[:, :, None]).flatten(0, 1)  # (N s, H)
        heads = (self.u[:, :s].flatten(0, 1).t() @ scaled_v).addcmul_(self.w0, (weights * self.alpha).sum())
        return {"fc.weight": torch.einsum("n,nhe->he", weights, self.fc_w), "fc.bias": weights @ self.fc_b,
                "heads.weight": heads, "heads.bias": weights @ self.head_b}

    def materialize(self, n: int) -> torch.Tensor:
        """Client n's head matrix W_n (P, H): what it would upload."""
        s = self.span
        return self.alpha[n] * self.w0 + (self.u[n, :s] * self.beta[n, :s, None]).t() @ self.v[n, :s]
