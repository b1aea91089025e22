"""The client dimension: building blocks of the lockstep engine, which trains every sampled client at once.

Each method's lockstep class (``lockstep`` in :mod:`hyperfl_fast.methods`) is built from these.

Every tensor carries a client dimension N (embeddings (N, E), classifiers
(N, K, D), batches (N, B, C, H, W), ...), and each local step is a handful of
batched ops (:mod:`hyperfl_fast.ops`: Triton on CUDA, vectorised PyTorch on
the CPU) for all clients at once.  Per-client optimizer semantics (each
client's own clip coefficient, momentum and weight decay) are kept exactly, so
this engine computes what :mod:`hyperfl_fast.reference` computes, up to float
rounding (``tests/test_engine_equivalence.py`` checks it).

Schedules.  Each client draws its epoch exactly as the reference does (same
generator, same shuffle, same augmentation draws, see
:mod:`hyperfl_fast.federation`).  Clients with fewer batches than others are
**masked**: a step where a client has no batch leaves all its state unchanged,
and a partial last batch averages the loss over its valid rows only.

Heads in factored form.  For one client the hypernetwork heads' gradient at
step s is the outer product ``dtheta_s ⊗ h_s`` (P x H, rank one).  Under SGD with
momentum and weight decay, the heads and their momentum buffer therefore stay
exactly in the span of the round's starting matrix W0 and these rank-one terms::

    W_t   = alpha_t * W0 + sum_s beta_{t,s} * u_s v_sᵀ       (u_s = c_s dtheta_s,  v_s = h_s)
    buf_t = gamma_t * W0 + sum_s delta_{t,s} * u_s v_sᵀ

with scalar recurrences (``FactoredHeads.sgd_step``).  Generation is then one
GEMM against the shared W0 plus a thin low-rank term, the backward likewise,
and the optimizer step touches only scalars: no pass over the 59 MB per-client
head matrices at all.  The server's weighted average of the clients' W_n is
one GEMM over the stacked factors, equal to averaging the materialised uploads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .config import Config
from .dp import ClientPrivacy, expected_batch_size, noise_generator, per_example_grads, private_gradient
from .data import apply_crop_flip, draw_crop_flip
from .federation import ClientData, ClientResult, make_generator, poisson_masks


# --------------------------------------------------------------------------- data and schedules

class StackedData:
    """All clients' data stacked on the device, padded to the largest client: (Nc, n_max, C, H, W)."""

    def __init__(self, clients: list[ClientData]):
        def stack(tensors):
            out = tensors[0].new_zeros(len(tensors), max(len(t) for t in tensors), *tensors[0].shape[1:])
            for i, t in enumerate(tensors):
                out[i, :len(t)] = t
            return out

        self.clients = clients
        self.train_x, self.train_y = stack([c.train_x for c in clients]), stack([c.train_y for c in clients])
        self.test_x, self.test_y = stack([c.test_x for c in clients]), stack([c.test_y for c in clients])
        device = self.train_y.device
        self.num_train = torch.tensor([c.num_train for c in clients], device=device)
        self.num_test = torch.tensor([len(c.test_y) for c in clients], device=device)
        self.augment = clients[0].augment

    def weights(self, idx: torch.Tensor) -> torch.Tensor:
        """(N,) the shares of clients ``idx`` in their total training samples: FedAvg's aggregation weights."""
        sizes = self.num_train[idx].to(self.train_x.dtype)
        return sizes / sizes.sum()


def weighted_mean(weights: torch.Tensor, stacked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's average of stacked per-client tensors (N, ...) with ``weights`` (N,): each (1, ...)."""
    return {k: torch.einsum("n,n...->...", weights, t).unsqueeze(0) for k, t in stacked.items()}


@dataclass
class Batch:
    x: torch.Tensor  # (N, B, C, H, W)
    y: torch.Tensor  # (N, B)
    valid: torch.Tensor  # (N, B) bool: real rows (False pads short batches)
    active: torch.Tensor  # (N,) bool: the client takes this step (a Poisson-sampled batch may still be empty)

    @property
    def nonempty(self) -> torch.Tensor:
        """(N,) bool: the client's batch has rows (equals ``active`` for shuffled batches)."""
        return self.valid.any(1)


class RoundSchedule:
    """Every epoch of one round for the clients ``cids`` in lockstep, with the reference's per-client draws.

    All of the round's shuffles (or, for ``poisson_epochs``, Poisson-sampled
    DP-SGD batches, :func:`hyperfl_fast.federation.poisson_masks`) and
    augmentation draws are made up front, on the CPU generators keyed by
    (seed, round, client, epoch) exactly as the reference draws them, and
    copied to the device once; local training then only slices them (no host
    round trip per epoch or step).  A batch size larger than the largest
    client is clamped to it, so nothing is padded beyond the data (the
    reference's batches cannot be larger either).  Poisson batches vary in size
    and are padded to the round's largest.
    """

    def __init__(self, data: StackedData, cids: list[int], batch_size: int, seed: int, round_idx: int,
                 epochs: range, poisson_epochs: Iterable[int] = ()):
        largest = max(data.clients[c].num_train for c in cids)
        self.data, self.epochs = data, epochs
        self.batch_size = min(batch_size, largest)
        self.num_steps = -(-largest // self.batch_size)
        poisson_epochs = set(poisson_epochs)
        layouts = [self._poisson(data, cids, batch_size, seed, round_idx, epoch) if epoch in poisson_epochs
                   else self._shuffled(data, cids, seed, round_idx, epoch) for epoch in epochs]
        self.widths = [width for width, *_ in layouts]
        total = max(self.num_steps * width for width in self.widths)

        def stack(i):  # one tensor per kind over the epochs, padded to the widest: (E, ..., total)
            return torch.stack([torch.nn.functional.pad(layout[i], (0, total - layout[i].shape[-1]))
                                for layout in layouts])

        device = data.train_y.device
        # one host-to-device copy per round each: (E, N, total), (E, N, total), (E, 3, N, total)
        self.rows, self.valid, self.aug = stack(1).to(device), stack(2).to(device), stack(3).to(device)
        self.client_idx = torch.tensor(cids, device=device)[:, None]
        self.client_steps = torch.tensor([-(-data.clients[c].num_train // self.batch_size) for c in cids],
                                         device=device)  # (N,)

    def _shuffled(self, data, cids, seed, round_idx, epoch):
        """(batch width, rows, valid, aug) of one shuffled epoch: the reference's randperm, batch by batch."""
        width = self.num_steps * self.batch_size
        rows = torch.zeros(len(cids), width, dtype=torch.long)
        valid = torch.zeros(len(cids), width, dtype=torch.bool)
        aug = torch.zeros(3, len(cids), width, dtype=torch.long)  # dy, dx, flip
        for i, cid in enumerate(cids):
            n = data.clients[cid].num_train
            gen = make_generator(seed, round_idx, cid, epoch)
            rows[i, :n] = torch.randperm(n, generator=gen)
            valid[i, :n] = True
            if data.augment:
                for start in range(0, n, self.batch_size):  # the reference draws batch by batch
                    stop = min(start + self.batch_size, n)
                    aug[:, i, start:stop] = torch.stack([t.long() for t in draw_crop_flip(stop - start, gen)])
        return self.batch_size, rows, valid, aug

    def _poisson(self, data, cids, batch_size, seed, round_idx, epoch):
        """(batch width, rows, valid, aug) of one Poisson-sampled epoch, padded to its largest batch."""
        members = []  # per client, per step: the sample indices
        for cid in cids:
            client = data.clients[cid]
            gen, masks = poisson_masks(client.num_train, batch_size, seed, round_idx, cid, epoch)
            steps = [mask.nonzero().flatten() for mask in masks]
            augs = [torch.stack([t.long() for t in draw_crop_flip(len(idx), gen)]) for idx in steps] \
                if data.augment else None  # drawn after the masks, batch by batch, as the reference does
            members.append((steps, augs))
        width = max(1, max(len(idx) for steps, _ in members for idx in steps))
        rows = torch.zeros(len(cids), self.num_steps * width, dtype=torch.long)
        valid = torch.zeros(len(cids), self.num_steps * width, dtype=torch.bool)
        aug = torch.zeros(3, len(cids), self.num_steps * width, dtype=torch.long)
        for i, (steps, augs) in enumerate(members):
            for t, idx in enumerate(steps):
                cols = slice(t * width, t * width + len(idx))
                rows[i, cols], valid[i, cols] = idx, True
                if augs is not None:
                    aug[:, i, cols] = augs[t]
        return width, rows, valid, aug

    def batches(self, epoch: int) -> Iterable[Batch]:
        """The steps of ``epoch`` (one of the schedule's epochs), each a batched gather for all clients."""
        data, e = self.data, self.epochs.index(epoch)
        rows, valid, aug, width = self.rows[e], self.valid[e], self.aug[e], self.widths[e]
        for step in range(self.num_steps):
            cols = slice(step * width, (step + 1) * width)
            x = data.train_x[self.client_idx, rows[:, cols]]  # (N, B, C, H, W)
            if data.augment:
                x = apply_crop_flip(x.flatten(0, 1), *(a[:, cols].flatten() for a in aug[:2]),
                                    aug[2, :, cols].flatten().bool()).view_as(x)
            yield Batch(x, data.train_y[self.client_idx, rows[:, cols]], valid[:, cols], step < self.client_steps)


def client_results(cids: list[int], *per_client: torch.Tensor, epsilons: list[float] | None = None
                   ) -> list[ClientResult]:
    """ClientResults from (N,) tensors (train loss, local and global accuracy), read to the host in one copy."""
    rows = torch.stack(per_client, 1).tolist()
    return [ClientResult(c, *row, epsilon=None if epsilons is None else e)
            for c, row, e in zip(cids, rows, epsilons or [None] * len(cids))]


def client_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each client's mean cross-entropy over its valid rows: (N, B, K) -> (N,)."""
    ce = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten(), reduction="none").view(batch.y.shape)
    return (ce * batch.valid).sum(1) / batch.valid.sum(1).clamp(min=1)


def classify(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-client classifier heads: (N, B, D) x (N, K, D) + (N, K) -> logits (N, B, K)."""
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


@torch.no_grad()
def batched_accuracy(data: StackedData, cids: list[int], logits_fn: Callable[[torch.Tensor], torch.Tensor],
                     chunk: int = 200) -> torch.Tensor:
    """Each client's test accuracy (%) with ``logits_fn`` ((N, b, C, H, W) -> (N, b, K)): (N,)."""
    idx = torch.tensor(cids, device=data.test_y.device)
    test_x, test_y, num_test = data.test_x[idx], data.test_y[idx], data.num_test[idx]
    correct = torch.zeros(len(cids), device=test_y.device)
    for start in range(0, test_y.shape[1], chunk):
        pred = logits_fn(test_x[:, start:start + chunk]).argmax(-1)
        rows = torch.arange(start, start + pred.shape[1], device=test_y.device)
        correct += ((pred == test_y[:, start:start + chunk]) & (rows < num_test[:, None])).sum(1)
    return 100.0 * correct / num_test


# --------------------------------------------------------------------------- optimizers

def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s scale factor per client: min(1, max_norm / (norm + 1e-6))."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


class StackedSGD:
    """``torch.optim.SGD`` (momentum, weight decay) on stacked per-client tensors (N, ...).

    Inactive clients keep their parameters and buffers.  Buffers start at zero,
    which equals SGD's first step (buf = d) exactly.  The update runs in place,
    three passes per tensor; masking is by per-client factors that are exactly
    1 or 0, so active clients get torch's arithmetic and inactive ones none.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float):
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], active: torch.Tensor) -> None:
        on = active.to(self.params[0].dtype)  # (N,) 1 = active, 0 = inactive
        momentum = on.new_full(on.shape, self.momentum).masked_fill_(~active, 1.0)
        for p, g, buf in zip(self.params, grads, self.bufs):
            shape = (-1, *([1] * (p.dim() - 1)))
            d_p = g.add(p, alpha=self.weight_decay)  # as torch.optim.SGD: g + wd * p
            buf.mul_(momentum.view(shape)).addcmul_(d_p, on.view(shape))  # m * buf + d  (inactive: buf)
            p.addcmul_(buf, (-self.lr * on).view(shape))  # p - lr * buf  (inactive: p)


class FactoredHeads:
    """Per-client head matrices W_n = alpha_n W0 + sum_s beta_{n,s} u_{n,s} v_{n,s}ᵀ under exact SGD.

    W0 (P, H) is the round's global head matrix, shared by every client;
    u (N, S, P) and v (N, S, H) hold each step's rank-one gradient factors.
    See the module docs for the recurrences.  The next step's slot is a device
    tensor and every update is in place, so a step can be captured in a CUDA
    graph; with ``static`` the products run over all S slots (the unused ones
    are zero) instead of the steps taken so far, which keeps their shapes fixed.
    """

    def __init__(self, w0: torch.Tensor, num_clients: int, max_steps: int, static: bool = False):
        p, h = w0.shape
        self.w0, self.static, self.steps = w0, static, 0
        self.slot = torch.zeros(1, dtype=torch.long, device=w0.device)  # the next step's slot
        self.u = w0.new_zeros(num_clients, max_steps, p)
        self.v = w0.new_zeros(num_clients, max_steps, h)
        self.alpha, self.gamma = w0.new_ones(num_clients), w0.new_zeros(num_clients)
        self.beta, self.delta = w0.new_zeros(num_clients, max_steps), w0.new_zeros(num_clients, max_steps)

    @property
    def span(self) -> int:
        """How many slots the products read: the steps taken so far, or all of them when ``static``."""
        return self.u.shape[1] if self.static else self.steps

    def matvec(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """W_n h_n + bias_n for every client: (N, H), (N, P) -> (N, P)."""
        s = self.span
        out = torch.addmm(bias, self.alpha[:, None] * h, self.w0.t())  # one GEMM against the shared W0
        if s:
            coeff = self.beta[:, :s] * torch.bmm(self.v[:, :s], h.unsqueeze(2)).squeeze(2)  # (N, s)
            out.unsqueeze(1).baddbmm_(coeff.unsqueeze(1), self.u[:, :s])  # += sum_s coeff_s u_s, in place
        return out

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """W_nᵀ g_n for every client: (N, P) -> (N, H)."""
        s = self.span
        out = (self.alpha[:, None] * g) @ self.w0
        if s:
            # g_nᵀ U_nᵀ as a row-vector product: with MKL several times faster than U_n g_n
            coeff = self.beta[:, :s] * torch.bmm(g.unsqueeze(1), self.u[:, :s].transpose(1, 2)).squeeze(1)  # (N, s)
            out = out + torch.bmm(coeff.unsqueeze(1), self.v[:, :s]).squeeze(1)
        return out

    @torch.no_grad()
    def sgd_step(self, grad_u: torch.Tensor, grad_v: torch.Tensor, active: torch.Tensor, lr: float,
                 momentum: float, weight_decay: float) -> None:
        """SGD with gradient grad_u ⊗ grad_v ((N, P), (N, H), already clipped) for the active clients."""
        self.u.index_copy_(1, self.slot, grad_u.unsqueeze(1))
        self.v.index_copy_(1, self.slot, grad_v.unsqueeze(1))
        gamma = momentum * self.gamma + weight_decay * self.alpha
        delta = momentum * self.delta + weight_decay * self.beta
        delta.index_fill_(1, self.slot, 1.0)  # this step's gradient enters the buffer with weight 1
        alpha, beta = self.alpha - lr * gamma, self.beta - lr * delta
        keep = active[:, None]
        self.gamma.copy_(torch.where(active, gamma, self.gamma))
        self.alpha.copy_(torch.where(active, alpha, self.alpha))
        self.delta.copy_(torch.where(keep, delta, self.delta))
        self.beta.copy_(torch.where(keep, beta, self.beta))
        self.slot += 1
        self.steps += 1

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_n weights_n W_n as one GEMM over the stacked factors: (P, H)."""
        s = self.span
        scaled_v = (self.v[:, :s] * (weights[:, None] * self.beta[:, :s])[:, :, None]).flatten(0, 1)  # (N s, H)
        low_rank = self.u[:, :s].flatten(0, 1).t() @ scaled_v  # (P, H)
        return low_rank.addcmul_(self.w0, (weights * self.alpha).sum())  # the scale stays on the device

    def materialize(self, n: int) -> torch.Tensor:
        """Client n's head matrix W_n (P, H): what it would upload."""
        s = self.span
        return self.alpha[n] * self.w0 + (self.u[n, :s] * self.beta[n, :s, None]).t() @ self.v[n, :s]


def private_step_grads(template: torch.nn.Module, trainable: dict[str, torch.Tensor], batch: Batch, cfg: Config,
                       privacy: ClientPrivacy, cids: list[int], round_idx: int, epoch: int, step: int,
                       frozen: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One DP-SGD step's gradients of ``trainable`` (N, *shape) for all clients: every sample's gradient at once,
    clipped and noised with each client's sigma and the reference's keyed noise (see :mod:`hyperfl_fast.dp`)."""
    per_example = per_example_grads(template, trainable, F.cross_entropy, batch.x, batch.y, clients=True,
                                    frozen=frozen)  # (N, B, *shape)
    noise = [noise_generator(cfg.seed, round_idx, c, epoch, step) for c in cids]
    expected = [expected_batch_size(cfg, privacy.sizes[c]) for c in cids] if cfg.poisson else None
    grads = private_gradient(per_example, batch.valid, cfg.dp_clip, [privacy.sigmas[c] for c in cids], noise,
                             expected)
    return list(grads.values())
