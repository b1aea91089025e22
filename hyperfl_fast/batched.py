"""Batched lockstep engine: every sampled client's local training as one computation.

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

from . import ops
from .config import DP_METHODS, Config
from .dp import ClientPrivacy, noise_generator, per_example_grads, private_gradient
from .data import apply_crop_flip, draw_crop_flip
from .federation import ClientData, ClientResult, make_generator
from .models import (CNNSpec, TargetCNN, extract_features_batched, init_hyperfl, init_private_classifiers,
                     init_target_cnns, split_theta)


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


@dataclass
class Batch:
    x: torch.Tensor  # (N, B, C, H, W)
    y: torch.Tensor  # (N, B)
    valid: torch.Tensor  # (N, B) bool: real rows (False pads short batches)
    active: torch.Tensor  # (N,) bool: the client has a batch at this step


class RoundSchedule:
    """Every epoch of one round for the clients ``cids`` in lockstep, with the reference's per-client draws.

    All of the round's shuffles and augmentation draws are made up front, on
    the CPU generators keyed by (seed, round, client, epoch) exactly as the
    reference draws them, and copied to the device once; local training then
    only slices them (no host round trip per epoch or step).  A batch size
    larger than the largest client is clamped to it, so nothing is padded
    beyond the data (the reference's batches cannot be larger either).
    """

    def __init__(self, data: StackedData, cids: list[int], batch_size: int, seed: int, round_idx: int,
                 epochs: range):
        largest = max(data.clients[c].num_train for c in cids)
        self.data, self.epochs = data, epochs
        self.batch_size = min(batch_size, largest)
        self.num_steps = -(-largest // self.batch_size)
        width = self.num_steps * self.batch_size
        rows = torch.zeros(len(epochs), len(cids), width, dtype=torch.long)
        valid = torch.zeros(len(epochs), len(cids), width, dtype=torch.bool)
        aug = torch.zeros(len(epochs), 3, len(cids), width, dtype=torch.long)  # dy, dx, flip
        for e, epoch in enumerate(epochs):
            for i, cid in enumerate(cids):
                n = data.clients[cid].num_train
                gen = make_generator(seed, round_idx, cid, epoch)
                rows[e, i, :n] = torch.randperm(n, generator=gen)
                valid[e, i, :n] = True
                if data.augment:
                    for start in range(0, n, self.batch_size):  # the reference draws batch by batch
                        stop = min(start + self.batch_size, n)
                        aug[e, :, i, start:stop] = torch.stack([t.long() for t in draw_crop_flip(stop - start, gen)])
        device = data.train_y.device
        # (E, N, width) each, one host-to-device copy per round
        self.rows, self.valid, self.aug = rows.to(device), valid.to(device), aug.to(device)
        self.client_idx = torch.tensor(cids, device=device)[:, None]

    def batches(self, epoch: int) -> Iterable[Batch]:
        """The steps of ``epoch`` (one of the schedule's epochs), each a batched gather for all clients."""
        data, e = self.data, self.epochs.index(epoch)
        rows, valid, aug = self.rows[e], self.valid[e], self.aug[e]
        for step in range(self.num_steps):
            cols = slice(step * self.batch_size, (step + 1) * self.batch_size)
            x = data.train_x[self.client_idx, rows[:, cols]]  # (N, B, C, H, W)
            if data.augment:
                x = apply_crop_flip(x.flatten(0, 1), *(a[:, cols].flatten() for a in aug[:2]),
                                    aug[2, :, cols].flatten().bool()).view_as(x)
            yield Batch(x, data.train_y[self.client_idx, rows[:, cols]], valid[:, cols], valid[:, cols].any(1))


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
    See the module docs for the recurrences.
    """

    def __init__(self, w0: torch.Tensor, num_clients: int, max_steps: int):
        p, h = w0.shape
        self.w0, self.steps = w0, 0
        self.u = w0.new_zeros(num_clients, max_steps, p)
        self.v = w0.new_zeros(num_clients, max_steps, h)
        self.alpha, self.gamma = w0.new_ones(num_clients), w0.new_zeros(num_clients)
        self.beta, self.delta = w0.new_zeros(num_clients, max_steps), w0.new_zeros(num_clients, max_steps)

    def matvec(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """W_n h_n + bias_n for every client: (N, H), (N, P) -> (N, P)."""
        s = self.steps
        out = torch.addmm(bias, self.alpha[:, None] * h, self.w0.t())  # one GEMM against the shared W0
        if s:
            coeff = self.beta[:, :s] * torch.bmm(self.v[:, :s], h.unsqueeze(2)).squeeze(2)  # (N, s)
            out.unsqueeze(1).baddbmm_(coeff.unsqueeze(1), self.u[:, :s])  # += sum_s coeff_s u_s, in place
        return out

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """W_nᵀ g_n for every client: (N, P) -> (N, H)."""
        s = self.steps
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
        s = self.steps
        self.u[:, s], self.v[:, s] = grad_u, grad_v
        gamma = momentum * self.gamma + weight_decay * self.alpha
        delta = momentum * self.delta + weight_decay * self.beta
        delta[:, s] = 1.0  # this step's gradient enters the buffer with weight 1
        alpha, beta = self.alpha - lr * gamma, self.beta - lr * delta
        keep = active[:, None]
        self.gamma = torch.where(active, gamma, self.gamma)
        self.alpha = torch.where(active, alpha, self.alpha)
        self.delta = torch.where(keep, delta, self.delta)
        self.beta = torch.where(keep, beta, self.beta)
        self.steps += 1

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_n weights_n W_n as one GEMM over the stacked factors: (P, H)."""
        s = self.steps
        scaled_v = (self.v[:, :s] * (weights[:, None] * self.beta[:, :s])[:, :, None]).flatten(0, 1)  # (N s, H)
        low_rank = self.u[:, :s].flatten(0, 1).t() @ scaled_v  # (P, H)
        return low_rank.addcmul_(self.w0, (weights * self.alpha).sum())  # the scale stays on the device

    def materialize(self, n: int) -> torch.Tensor:
        """Client n's head matrix W_n (P, H): what it would upload."""
        s = self.steps
        return self.alpha[n] * self.w0 + (self.u[n, :s] * self.beta[n, :s, None]).t() @ self.v[n, :s]


def private_step_grads(template: torch.nn.Module, trainable: dict[str, torch.Tensor], batch: Batch, cfg: Config,
                       privacy: ClientPrivacy, cids: list[int], round_idx: int, epoch: int, step: int,
                       frozen: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One DP-SGD step's gradients of ``trainable`` (N, *shape) for all clients: every sample's gradient at once,
    clipped and noised with each client's sigma and the reference's keyed noise (see :mod:`hyperfl_fast.dp`)."""
    per_example = per_example_grads(template, trainable, F.cross_entropy, batch.x, batch.y, clients=True,
                                    frozen=frozen)  # (N, B, *shape)
    noise = [noise_generator(cfg.seed, round_idx, c, epoch, step) for c in cids]
    grads = private_gradient(per_example, batch.valid, cfg.dp_clip, [privacy.sigmas[c] for c in cids], noise)
    return list(grads.values())


# --------------------------------------------------------------------------- HyperFL

class HyperFLBatched:
    """HyperFL with all sampled clients trained in lockstep (same results as :class:`HyperFLReference`)."""

    method = "hyperfl"
    progress_unit = "epoch"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.cfg, self.data = spec, cfg, StackedData(clients)
        hypernet, embeddings, classifiers = init_hyperfl(spec, len(clients), cfg.embed_dim, cfg.hidden_dim,
                                                         device, shared=cfg.client_init == "shared")
        self.hypernet = hypernet  # the global hypernetwork psi
        # private client state, never uploaded: (Nc, E), (Nc, K, D), (Nc, K)
        self.client_embeddings = torch.stack([v.detach() for v in embeddings])
        self.classifier_weight = torch.stack([c.weight.detach() for c in classifiers])
        self.classifier_bias = torch.stack([c.bias.detach() for c in classifiers])

    def features(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return extract_features_batched(x, split_theta(theta, self.spec), self.spec)

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        cfg, n = self.cfg, len(sampled)
        idx = torch.tensor(sampled, device=self.client_embeddings.device)
        psi = {k: t.detach() for k, t in self.hypernet.state_dict().items()}
        # every sampled client receives the global psi; its private parts come from its own store
        embedding = self.client_embeddings[idx].clone()  # (N, E)
        cls_w, cls_b = self.classifier_weight[idx].clone(), self.classifier_bias[idx].clone()

        # 1. classifier phase: theta from the global psi (one shared GEMM), not trained
        theta = ops.generate_weights(embedding, psi["fc.weight"], psi["fc.bias"], psi["heads.weight"],
                                     psi["heads.bias"])  # (N, P)
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx, range(cfg.local_epochs + 1))
        classifier_sgd = StackedSGD([cls_w, cls_b], cfg.classifier_lr, cfg.momentum, cfg.weight_decay)
        for batch in schedule.batches(0):
            with torch.no_grad():
                feats = self.features(batch.x, theta)
            w, b = cls_w.clone().requires_grad_(), cls_b.clone().requires_grad_()
            loss = client_losses(classify(feats, w, b), batch).sum()  # each client's own loss
            classifier_sgd.step(list(torch.autograd.grad(loss, [w, b])), batch.active)

        # 2. hypernetwork phase: psi_n and v_n in lockstep, classifier frozen
        heads = FactoredHeads(psi["heads.weight"], n, schedule.num_steps * cfg.local_epochs)
        fc_w = psi["fc.weight"].expand(n, -1, -1).clone()  # (N, H, E)
        fc_b = psi["fc.bias"].expand(n, -1).clone()  # (N, H)
        head_b = psi["heads.bias"].expand(n, -1).clone()  # (N, P)
        hyper_sgd = StackedSGD([fc_w, fc_b, head_b], cfg.lr, cfg.momentum, cfg.weight_decay)
        embedding_sgd = StackedSGD([embedding], cfg.lr, cfg.momentum, cfg.weight_decay)
        for epoch in progress(range(1, cfg.local_epochs + 1)):
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for batch in schedule.batches(epoch):
                pre = torch.baddbmm(fc_b.unsqueeze(2), fc_w, embedding.unsqueeze(2)).squeeze(2)  # (N, H)
                hidden = pre.relu()
                theta = heads.matvec(hidden, head_b).requires_grad_()  # (N, P)
                losses = client_losses(classify(self.features(batch.x, theta), cls_w, cls_b), batch)
                (d_theta,) = torch.autograd.grad(losses.sum(), theta)
                # chain rule theta -> (psi_n, v_n), by hand
                d_pre = heads.rmatvec(d_theta) * (pre > 0)  # (N, H)
                d_fc_w = d_pre.unsqueeze(2) * embedding.unsqueeze(1)  # (N, H, E)
                d_embedding = torch.bmm(d_pre.unsqueeze(1), fc_w).squeeze(1)  # (N, E)
                hyper_norm = (ops.head_grad_sq_norm(d_theta, hidden) + d_fc_w.pow(2).sum((1, 2))
                              + d_pre.pow(2).sum(1)).sqrt()
                c_hyper = clip_coefficient(hyper_norm, cfg.grad_clip)[:, None]
                c_embed = clip_coefficient(d_embedding.norm(dim=1), cfg.grad_clip)[:, None]
                d_theta.mul_(c_hyper)  # clipped in place; the heads' weight gradient is d_theta ⊗ hidden
                heads.sgd_step(d_theta, hidden, batch.active, cfg.lr, cfg.momentum, cfg.weight_decay)
                hyper_sgd.step([d_fc_w * c_hyper[:, :, None], d_pre * c_hyper, d_theta], batch.active)
                embedding_sgd.step([d_embedding * c_embed], batch.active)
                loss_sum += losses.detach() * batch.active
                loss_count += batch.active
        train_loss = loss_sum / loss_count  # mean loss of the last epoch, per client

        # local accuracy: each client's own trained hypernetwork, embedding and classifier
        hidden = torch.baddbmm(fc_b.unsqueeze(2), fc_w, embedding.unsqueeze(2)).squeeze(2).relu()
        local_theta = heads.matvec(hidden, head_b)
        local_acc = batched_accuracy(self.data, sampled,
                                     lambda x: classify(self.features(x, local_theta), cls_w, cls_b))

        # upload and aggregate: the weighted mean of the clients' hypernetworks (nothing else leaves them)
        weights = self.data.num_train[idx].to(fc_w.dtype)
        weights = weights / weights.sum()
        self.hypernet.load_state_dict({
            "fc.weight": torch.einsum("n,nhe->he", weights, fc_w),
            "fc.bias": weights @ fc_b,
            "heads.weight": heads.weighted_sum(weights),
            "heads.bias": weights @ head_b,
        })
        self.client_embeddings[idx], self.classifier_weight[idx], self.classifier_bias[idx] = embedding, cls_w, cls_b
        global_acc = self.global_accuracy(sampled)
        return client_results(sampled, train_loss, local_acc, global_acc)

    @torch.no_grad()
    def global_accuracy(self, cids: list[int]) -> torch.Tensor:
        """Clients' test accuracy with the global hypernetwork and their private parts: (N,)."""
        idx = torch.tensor(cids, device=self.client_embeddings.device)
        hn = self.hypernet
        theta = ops.generate_weights(self.client_embeddings[idx], hn.fc.weight, hn.fc.bias, hn.heads.weight,
                                     hn.heads.bias)
        w, b = self.classifier_weight[idx], self.classifier_bias[idx]
        return batched_accuracy(self.data, cids, lambda x: classify(self.features(x, theta), w, b))

    def state_dict(self) -> dict:
        return {"hypernet": self.hypernet.state_dict(), "client_embeddings": self.client_embeddings,
                "classifier_weight": self.classifier_weight, "classifier_bias": self.classifier_bias}

    def load_state_dict(self, state: dict) -> None:
        self.hypernet.load_state_dict(state["hypernet"])
        for name in ("client_embeddings", "classifier_weight", "classifier_bias"):
            getattr(self, name).copy_(state[name])


# --------------------------------------------------------------------------- baselines

class CNNBatched:
    """``local``, ``fedavg`` and ``dp-fedavg``: full per-client CNNs trained in lockstep as stacked tensors.

    ``dp-fedavg`` trains with record-level DP-SGD: every sample's gradient of
    every client at once (``torch.func``), clipped and noised as in
    :func:`hyperfl_fast.dp.private_gradient`, with the reference's keyed noise.
    """

    progress_unit = "epoch"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.cfg, self.data = spec, cfg, StackedData(clients)
        self.method = cfg.method
        self.privacy = ClientPrivacy([c.num_train for c in clients], cfg.batch_size, cfg.epsilon, cfg.delta,
                                     cfg.rounds, cfg.local_epochs) if cfg.method in DP_METHODS else None
        count = len(clients) if cfg.method == "local" else 1
        models = init_target_cnns(spec, count, device, shared=cfg.client_init == "shared")
        # fedavg, dp-fedavg: the global model (1, ...); local: every client's model (Nc, ...)
        self.params = {k: torch.stack([m.state_dict()[k] for m in models]) for k in models[0].state_dict()}
        self.template = models[0].to("meta")  # the module per-example gradients are taken through (no data)

    def logits(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = extract_features_batched(x, params, self.spec)
        return classify(feats, params["fc2.weight"], params["fc2.bias"])

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        cfg, n = self.cfg, len(sampled)
        idx = torch.tensor(sampled, device=self.data.train_y.device)
        if self.method != "local":  # every client receives the global model
            params = {k: t.expand(n, *t.shape[1:]).clone() for k, t in self.params.items()}
        else:
            params = {k: t[idx].clone() for k, t in self.params.items()}
        sgd = StackedSGD(list(params.values()), cfg.lr, cfg.momentum, cfg.weight_decay)
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx, range(cfg.local_epochs))
        for epoch in progress(range(cfg.local_epochs)):
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for step, batch in enumerate(schedule.batches(epoch)):
                if self.privacy is not None:
                    with torch.no_grad():
                        losses = client_losses(self.logits(batch.x, params), batch)
                    grads = private_step_grads(self.template, params, batch, cfg, self.privacy, sampled,
                                               round_idx, epoch, step)
                    sgd.step(grads, batch.active)
                else:
                    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
                    losses = client_losses(self.logits(batch.x, leaves), batch)
                    sgd.step(list(torch.autograd.grad(losses.sum(), list(leaves.values()))), batch.active)
                loss_sum += losses.detach() * batch.active
                loss_count += batch.active
        train_loss = loss_sum / loss_count
        local_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, params))
        if self.method != "local":  # upload the whole model; the server averages by data size
            weights = self.data.num_train[idx].to(self.data.train_x.dtype)
            weights = weights / weights.sum()
            self.params = {k: torch.einsum("n,n...->...", weights, t).unsqueeze(0) for k, t in params.items()}
            global_params = {k: t.expand(n, *t.shape[1:]) for k, t in self.params.items()}
            global_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, global_params))
        else:
            for k, t in params.items():
                self.params[k][idx] = t
            global_acc = local_acc
        epsilons = self.privacy.record_round(sampled) if self.privacy is not None else None
        return client_results(sampled, train_loss, local_acc, global_acc, epsilons=epsilons)

    def state_dict(self) -> dict:
        return {"params": self.params, **({"privacy": self.privacy.state_dict()} if self.privacy else {})}

    def load_state_dict(self, state: dict) -> None:
        self.params = {k: t.clone() for k, t in state["params"].items()}
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])


class RepresentationDPBatched:
    """``ppsgd`` and ``centaur`` in lockstep (the same results as the reference's ``RepresentationDPReference``).

    The global representation (conv layers and fc1) is stacked (N, ...) for the
    round's clients; each client's private classifier (Nc, K, D) stays in this
    engine's store.  DP-SGD steps take every sample's gradient of the
    representation at once, with the classifier frozen.
    """

    progress_unit = "epoch"

    def __init__(self, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        self.spec, self.cfg, self.data, self.method = spec, cfg, StackedData(clients), cfg.method
        model = TargetCNN(spec).to(device)
        heads = init_private_classifiers(model, len(clients), shared=cfg.client_init == "shared")
        self.privacy = ClientPrivacy([c.num_train for c in clients], cfg.batch_size, cfg.epsilon, cfg.delta,
                                     cfg.rounds, cfg.local_epochs)
        self.feature_keys = [name for name, _ in spec.feature_shapes()]
        self.representation = {k: model.state_dict()[k].unsqueeze(0) for k in self.feature_keys}  # (1, ...)
        # private, never uploaded: (Nc, K, D), (Nc, K)
        self.classifier = {"fc2.weight": torch.stack([h.weight.detach() for h in heads]),
                           "fc2.bias": torch.stack([h.bias.detach() for h in heads])}
        self.template = model.to("meta")

    def logits(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return classify(extract_features_batched(x, params, self.spec), params["fc2.weight"], params["fc2.bias"])

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        cfg, n = self.cfg, len(sampled)
        idx = torch.tensor(sampled, device=self.data.train_y.device)
        features = {k: t.expand(n, *t.shape[1:]).clone() for k, t in self.representation.items()}
        head = {k: t[idx].clone() for k, t in self.classifier.items()}
        classifier_sgd = StackedSGD(list(head.values()), cfg.classifier_lr, cfg.momentum, cfg.weight_decay)
        feature_sgd = StackedSGD(list(features.values()), cfg.lr, cfg.momentum, cfg.weight_decay)
        centaur = self.method == "centaur"
        epochs = range(1, cfg.local_epochs + 1) if centaur else range(cfg.local_epochs)
        schedule = RoundSchedule(self.data, sampled, cfg.batch_size, cfg.seed, round_idx,
                                 range(cfg.local_epochs + 1) if centaur else epochs)

        def classifier_step(batch: Batch) -> None:
            leaves = {k: t.clone().requires_grad_() for k, t in head.items()}
            losses = client_losses(self.logits(batch.x, {**features, **leaves}), batch)
            classifier_sgd.step(list(torch.autograd.grad(losses.sum(), list(leaves.values()))), batch.active)

        if centaur:  # the classifier epoch, on the received representation
            for batch in schedule.batches(0):
                classifier_step(batch)
        for epoch in progress(epochs):
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for step, batch in enumerate(schedule.batches(epoch)):
                with torch.no_grad():
                    losses = client_losses(self.logits(batch.x, {**features, **head}), batch)
                if not centaur:
                    classifier_step(batch)
                grads = private_step_grads(self.template, features, batch, cfg, self.privacy, sampled, round_idx,
                                           epoch, step, frozen=head)
                feature_sgd.step(grads, batch.active)
                loss_sum += losses * batch.active
                loss_count += batch.active
        train_loss = loss_sum / loss_count
        local_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, {**features, **head}))

        # upload the representation only; the server averages it by data size; classifiers stay private
        weights = self.data.num_train[idx].to(self.data.train_x.dtype)
        weights = weights / weights.sum()
        self.representation = {k: torch.einsum("n,n...->...", weights, t).unsqueeze(0) for k, t in features.items()}
        for k, t in head.items():
            self.classifier[k][idx] = t
        shared = {k: t.expand(n, *t.shape[1:]) for k, t in self.representation.items()}
        global_acc = batched_accuracy(self.data, sampled, lambda x: self.logits(x, {**shared, **head}))
        return client_results(sampled, train_loss, local_acc, global_acc, epsilons=self.privacy.record_round(sampled))

    def state_dict(self) -> dict:
        return {"representation": self.representation, "classifier": self.classifier,
                "privacy": self.privacy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.representation = {k: t.clone() for k, t in state["representation"].items()}
        self.classifier = {k: t.clone() for k, t in state["classifier"].items()}
        self.privacy.load_state_dict(state["privacy"])


def build_batched(spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
    """The batched engine for ``cfg.method``; seeds model initialisation with ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if cfg.method == "hyperfl":
        return HyperFLBatched(spec, clients, cfg, device)
    if cfg.method in ("ppsgd", "centaur"):
        return RepresentationDPBatched(spec, clients, cfg, device)
    return CNNBatched(spec, clients, cfg, device)
