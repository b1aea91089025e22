"""pFedHN and pFedHN-PC (Shamsian et al., ICML 2021): the server's hypernetwork generates each client's model.

The server holds the hypernetwork psi and one embedding e_i per client; neither ever leaves it.  A round:

1. for each sampled client i the server generates theta_i = h(e_i; psi) and sends it: ``pfedhn`` the whole
   CNN, ``pfedhn-pc`` the feature extractor only (the client keeps a private classifier, as in pFedHN-PC);
2. the client trains theta_i (and its classifier) for ``local_epochs`` epochs and uploads the change
   delta theta_i = theta_i - theta~_i;
3. for each upload in turn the server takes one SGD step on (psi, e): the gradient is the vector-Jacobian
   product (d theta_i / d(psi, e))^T delta theta_i at the psi that generated theta_i, clipped to 50.  The
   server's optimizer (momentum) lives for the whole run.

Choices and their sources (pFedHN's code, ``experiments/pfedhn*/trainer.py``, unless stated):

- client optimizer: SGD, lr 5e-3, momentum 0.9, weight decay 5e-5 (``--inner-lr``, ``--inner-wd``), gradient
  norm clipped to 50; pFedHN-PC's classifier: the same SGD, without clipping, its momentum kept between rounds
  (pFedHN-PC's per-node optimizer).  These are fixed (:data:`SETTINGS`): ``--lr``, ``--momentum``,
  ``--weight-decay``, ``--grad-clip``, ``--embed-dim`` and ``--hidden-dim`` are the other methods' settings;
- server optimizer: SGD, lr 1e-2 for psi and the embeddings (pFedHN-PC's trainer: 5e-2, :data:`PC_SETTINGS`),
  momentum 0.9, weight decay 1e-3 (``--lr``, ``--embed-lr``, ``--wd``), gradient norm of (psi, all embeddings)
  clipped to 50;
- local training: ``--local-epochs`` epochs of ``--batch-size`` batches, the setting the HyperFL paper uses for
  every method (pFedHN samples 50 batches of 64 with replacement);
- rounds: pFedHN's loop.  A round's sampled clients train one after the other, in the sampled order
  (ascending client id; pFedHN draws a random client for every step); each
  receives the theta generated after the previous client's server step (``steps_per_client``), so 200 rounds
  of 20 clients are 4,000 server steps (pFedHN: 5,000 steps of one random client).  Training a round's clients
  in parallel from one psi and then stepping once per upload (this package until 2026-12-07) takes 20 steps
  on gradients of one psi with momentum 0.9: with pFedHN's hypernetwork it diverged within 4 rounds on
  Fashion-MNIST (benchmarks/RESULTS.md);
- the initial psi and embeddings come from the run's seed, as every initial state of this package does (a
  Flower node draws them too, to start from the same state): they are not secret, what training makes of them
  never leaves the server;
- the hypernetwork is pFedHN's (``CNNHyper``: ``--embed-dim -1``, ``--hyper-hid 100``, ``--n-hidden 3``):
  embeddings of 1 + N/4 values, Linear(E, 100), 3 x [ReLU, Linear(100, 100)], and the heads straight from the
  last linear layer, no activation between (one Linear(100, P) here, one per tensor there: the same init).  The
  lockstep engine runs the three first layers in torch and the last two (the heads: nearly all of the work)
  with the package's generation op, ``relu=False``.  With HyperFL's hypernetwork instead (one hidden layer of
  128 with a ReLU before the heads, embeddings of 64; this package until 2026-12-07) pFedHN ended 4.3 points
  under the HyperFL paper's Fashion-MNIST figure (benchmarks/RESULTS.md);
- the embeddings are drawn N(0, 1) per client (``nn.Embedding``); pFedHN-PC's classifiers follow
  ``--client-init``; uploads are not weighted by data size (one server step per client).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .. import ops
from ..config import Config
from ..engines import Engine
from ..federation import ClientData, ClientResult, accuracy
from ..lockstep.data import RoundSchedule, StackedData
from ..lockstep.evaluation import batched_accuracy, client_losses, client_results, cnn_logits
from ..lockstep.optim import StackedSGD
from ..models import CNNSpec, join_flat, split_flat
from ..ops.sgd import SGD
from .base import ATTACK, ClientUpdate, Method, State, detached, register
from .full_model import cnn_from


@dataclass(frozen=True)
class PFedHNSettings:
    """pFedHN's optimizer and hypernetwork settings (its code's defaults; see the module docs)."""

    client_lr: float = 5e-3
    client_momentum: float = 0.9
    client_weight_decay: float = 5e-5
    server_lr: float = 1e-2  # pfedhn/trainer.py's --lr (pfedhn_pc/trainer.py's: 5e-2, PC_SETTINGS)
    server_momentum: float = 0.9
    server_weight_decay: float = 1e-3
    grad_clip: float = 50.0  # the client's and the server's gradient norm bound
    hidden_dim: int = 100  # --hyper-hid
    hidden_layers: int = 3  # --n-hidden: Linear(E, H), then 3 x [ReLU, Linear(H, H)]

    def embed_dim(self, num_clients: int) -> int:
        """--embed-dim -1: 1 + N/4."""
        return int(1 + num_clients / 4)


SETTINGS = PFedHNSettings()
PC_SETTINGS = dataclasses.replace(SETTINGS, server_lr=5e-2)

# The hypernetwork: trunk.0 .. trunk.{L-1} (each followed by a ReLU), then fc and the heads with no ReLU between.
TRUNK_KEYS = tuple(f"trunk.{i}.{p}" for i in range(SETTINGS.hidden_layers) for p in ("weight", "bias"))
HYPER_KEYS = TRUNK_KEYS + ("fc.weight", "fc.bias", "heads.weight", "heads.bias")
SERVER_KEYS = HYPER_KEYS + ("embeddings",)  # the server's parameters; each has a momentum buffer "momentum.<key>"
CLASSIFIER_KEYS = ("fc2.weight", "fc2.bias")  # pfedhn-pc: private, with "momentum.<key>"


def momentum_key(key: str) -> str:
    return f"momentum.{key}"


def trunk(server: State, embeddings: torch.Tensor) -> torch.Tensor:
    """The hypernetwork's first layers: (..., E) -> (..., H), a ReLU after each."""
    x = embeddings
    for i in range(SETTINGS.hidden_layers):
        x = F.relu(F.linear(x, server[f"trunk.{i}.weight"], server[f"trunk.{i}.bias"]))
    return x


def generate(server: State, embeddings: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """theta (N, P) = heads(fc(trunk(e))) for embeddings (N, E): the trunk in plain torch, its last two linear
    layers (the heads read P values per hidden unit: nearly all of the work) with the generation op, on ``path``
    (differentiable in every input on every path)."""
    return ops.generate_weights(trunk(server, embeddings), server["fc.weight"], server["fc.bias"],
                                server["heads.weight"], server["heads.bias"], path=path, relu=False)


def init_hypernetwork(num_clients: int, num_params: int, device: torch.device) -> State:
    """pFedHN's hypernetwork (PyTorch's default Linear init; pFedHN's one Linear per target tensor draws each head
    from the same distribution as this one Linear(H, P)) and the clients' embeddings, N(0, 1) as nn.Embedding's."""
    e, h = SETTINGS.embed_dim(num_clients), SETTINGS.hidden_dim
    layers = [torch.nn.Linear(e if i == 0 else h, h) for i in range(SETTINGS.hidden_layers)]
    layers += [torch.nn.Linear(h, h), torch.nn.Linear(h, num_params)]
    tensors = [t for layer in layers for t in (layer.weight, layer.bias)]
    server = {k: t.detach().to(device) for k, t in zip(HYPER_KEYS, tensors)}
    server["embeddings"] = torch.randn(num_clients, e).to(device)
    return server


def client_sgd(params) -> SGD:
    return SGD(params, lr=SETTINGS.client_lr, momentum=SETTINGS.client_momentum,
               weight_decay=SETTINGS.client_weight_decay)


def server_steps(server: State, grads: list[dict[str, torch.Tensor]], settings: PFedHNSettings) -> State:
    """The server's SGD steps, one per client gradient in turn (clipped over all of its tensors), with
    the momentum buffers the state carries; returns the new state.  ``torch.optim.SGD``'s arithmetic: the
    reference path."""
    params = {k: torch.nn.Parameter(server[k].detach().clone()) for k in SERVER_KEYS}
    optimizer = SGD(list(params.values()), lr=settings.server_lr, momentum=settings.server_momentum,
                    weight_decay=settings.server_weight_decay)
    for k, p in params.items():  # a zero buffer gives SGD's first step (buf = d) exactly
        optimizer.state[p]["momentum_buffer"] = server[momentum_key(k)].detach().clone()
    for grad in grads:
        for k, p in params.items():
            p.grad = grad[k]
        torch.nn.utils.clip_grad_norm_(list(params.values()), settings.grad_clip)
        optimizer.step()
    return {**{k: p.detach() for k, p in params.items()},
            **{momentum_key(k): optimizer.state[p]["momentum_buffer"] for k, p in params.items()}}


class PFedHNLockstep(Engine):
    """pFedHN's engine on stacked tensors: the results of :meth:`PFedHN.client_update` and
    :meth:`PFedHN.aggregate` client by client.  pFedHN's loop makes a round's clients train one after the other
    (:meth:`train_and_step`); the round's evaluation generates every sampled client's theta at once with the
    generation op, and the server's step takes the heads' gradient in closed form (:meth:`server_update`)."""

    progress_unit = "client"

    def __init__(self, method: Method, spec: CNNSpec, clients: list[ClientData], cfg: Config, device: torch.device):
        super().__init__(method, spec, clients, cfg)
        self.data = StackedData(clients)
        self.server, privates = method.init_states(spec, len(clients), cfg, device)
        self.shapes = method.generated_shapes(spec)
        # pfedhn-pc: every client's private classifier and its momentum (Nc, K, D), (Nc, K)
        self.private = {k: torch.stack([p[k] for p in privates]) for k in privates[0]}

    def generate(self, idx: torch.Tensor) -> torch.Tensor:
        """theta (N, P) of clients ``idx`` from the server's current state, with the generation op."""
        return generate(self.server, self.server["embeddings"][idx])

    def run_round(self, round_idx: int, sampled: list[int],
                  progress: Callable[[Iterable], Iterable] = iter) -> list[ClientResult]:
        """pFedHN's loop: one client after the other, each sent what the server generates after the previous
        client's step (:meth:`train_and_step`); then every sampled client's generated model is evaluated."""
        losses, local_accs = zip(*(self.train_and_step(round_idx, cid) for cid in progress(sampled)))
        idx = torch.tensor(sampled, device=self.data.train_y.device)
        head = {k: self.private[k][idx] for k in CLASSIFIER_KEYS if k in self.private}
        with torch.no_grad():
            generated = split_flat(self.generate(idx), self.shapes)
        global_acc = batched_accuracy(self.data, sampled, lambda x: cnn_logits(x, {**generated, **head}, self.spec))
        return client_results(sampled, torch.cat(losses), torch.cat(local_accs), global_acc)

    def train_and_step(self, round_idx: int, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``cid`` receives theta from the server's current state and trains it (as a stack of one), and
        the server steps on its upload: (train loss, local accuracy), each (1,)."""
        cfg, n, group = self.cfg, 1, [cid]
        idx = torch.tensor(group, device=self.data.train_y.device)
        theta = self.generate(idx)  # 1. what the server sends: (N, P)
        sent = {k: t.clone() for k, t in split_flat(theta, self.shapes).items()}
        head = {k: self.private[k][idx].clone() for k in CLASSIFIER_KEYS if k in self.private}
        theta_sgd = StackedSGD(list(sent.values()), SETTINGS.client_lr, SETTINGS.client_momentum,
                               SETTINGS.client_weight_decay)
        head_sgd = StackedSGD(list(head.values()), SETTINGS.client_lr, SETTINGS.client_momentum,
                              SETTINGS.client_weight_decay)
        head_sgd.bufs = [self.private[momentum_key(k)][idx].clone() for k in head]  # kept between rounds
        schedule = RoundSchedule(self.data, group, cfg.batch_size, cfg.seed, round_idx, range(cfg.local_epochs))
        for epoch in range(cfg.local_epochs):  # 2. local training
            loss_sum, loss_count = torch.zeros(n, device=idx.device), torch.zeros(n, device=idx.device)
            for batch in schedule.batches(epoch):
                leaves = {k: t.clone().requires_grad_() for k, t in {**sent, **head}.items()}
                losses = client_losses(cnn_logits(batch.x, leaves, self.spec), batch)
                grads = dict(zip(leaves, torch.autograd.grad(losses.sum(), list(leaves.values()))))
                norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[k].flatten(1), dim=1)
                                                              for k in sent]), dim=0)  # (N,)
                scale = (SETTINGS.grad_clip / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_ per client
                theta_sgd.step([grads[k] * scale.view(-1, *[1] * (grads[k].dim() - 1)) for k in sent], batch.active)
                if head:
                    head_sgd.step([grads[k] for k in head], batch.active)
                loss_sum += losses.detach() * batch.nonempty
                loss_count += batch.nonempty
        local_acc = batched_accuracy(self.data, group, lambda x: cnn_logits(x, {**sent, **head}, self.spec))
        for k in head:
            self.private[k][idx], self.private[momentum_key(k)][idx] = head[k], head_sgd.bufs[list(head).index(k)]
        delta = theta - join_flat(sent, self.shapes, lead=1)  # the upload: (1, P)
        self.server_update(cid, delta[0].detach())  # 3.
        return loss_sum / loss_count.clamp(min=1), local_acc

    @torch.no_grad()
    def server_update(self, cid: int, delta: torch.Tensor) -> None:
        """The server's step on client ``cid``'s upload delta (P,), in place: the gradient J^T delta at the psi
        that generated theta, clipped to the bound, then SGD with momentum and weight decay (torch.optim.SGD's
        step, whose reference is :func:`server_steps`).

        Gradients: theta = W z + b with z = fc(trunk(e)) (H,), so the heads' gradient is the outer product
        delta z^T (never formed: ``addr_`` into the momentum buffer), db = delta, and dz = W^T delta; the trunk's,
        fc's and the embedding's gradients are dz's vector-Jacobian product through the small MLP.  The norm of an
        outer product is the product of the norms, so the clip needs no head gradient formed either.
        """
        st, s = self.method.settings, self.server
        small = {k: s[k] for k in SERVER_KEYS if k not in ("heads.weight", "heads.bias", "embeddings")}

        def features(params: State, embedding: torch.Tensor) -> torch.Tensor:  # (E,) -> (H,): what the heads read
            return F.linear(trunk(params, embedding), params["fc.weight"], params["fc.bias"])

        z, pullback = torch.func.vjp(features, small, s["embeddings"][cid])
        grads, de = pullback(delta @ s["heads.weight"])
        norm = (delta.pow(2).sum() * (z.pow(2).sum() + 1) + sum(g.pow(2).sum() for g in grads.values())
                + de.pow(2).sum()).sqrt()
        scale = (st.grad_clip / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_
        for key in SERVER_KEYS:
            w, buf = s[key], s[momentum_key(key)]
            buf.mul_(st.server_momentum).add_(w, alpha=st.server_weight_decay)  # (a zero buffer: SGD's first step)
            if key == "heads.weight":
                buf.addr_(delta * scale, z)
            elif key == "heads.bias":
                buf.add_(delta * scale)
            elif key == "embeddings":  # the client's own row (weight decay reaches every row)
                buf[cid].add_(de * scale)
            else:
                buf.add_(grads[key] * scale)
            w.add_(buf, alpha=-st.server_lr)

    def global_state(self) -> State:
        """The server's hypernetwork, embeddings and momentum buffers."""
        return self.server

    def client_state(self, cid: int) -> State:
        """pfedhn-pc: client ``cid``'s classifier and its momentum; pfedhn: nothing."""
        return {k: t[cid] for k, t in self.private.items()}

    def load_states(self, global_state: State, client_states: list[State]) -> None:
        self.server = {k: t.clone() for k, t in global_state.items()}
        for k in self.private:
            self.private[k].copy_(torch.stack([c[k] for c in client_states]))


@register
class PFedHN(Method):
    name = "pfedhn"
    paper_row = 2
    headline = "global_acc"  # pFedHN evaluates the model the hypernetwork generates for each client
    uploads = "the change of the CNN the server generated for it (delta theta)"
    keeps = ""  # its embedding lives on the server
    supports = frozenset({ATTACK})
    threat = "full-model"  # the server knows theta_i (it generated it) and sees its change
    step_flags = ("local_epochs",)  # its optimizer settings are fixed (settings)
    steps_per_client = True  # pFedHN's loop: generate for one client, train, step; then the next client
    settings = SETTINGS
    client_optimizer = {"lr": SETTINGS.client_lr, "momentum": SETTINGS.client_momentum,
                        "weight_decay": SETTINGS.client_weight_decay, "clip": SETTINGS.grad_clip}
    paper = {  # Table 1
        "emnist": {20: 80.86, 100: 77.37},
        "fmnist": {20: 87.64, 100: 89.80},
        "cifar10": {20: 70.18, 100: 80.07},
        "cinic10": {20: 63.88, 100: 70.36},
    }
    lockstep = PFedHNLockstep

    def generated_shapes(self, spec: CNNSpec) -> list[tuple[str, tuple[int, ...]]]:
        """What the hypernetwork generates: the whole CNN."""
        return spec.cnn_shapes()

    def init_private(self, spec: CNNSpec, num_clients: int, cfg: Config, device: torch.device) -> list[State]:
        return [{} for _ in range(num_clients)]

    def init_states(self, spec, num_clients, cfg, device):
        server = init_hypernetwork(num_clients, sum(math.prod(shape) for _, shape in self.generated_shapes(spec)),
                                   device)
        server.update({momentum_key(k): torch.zeros_like(server[k]) for k in SERVER_KEYS})
        return server, self.init_private(spec, num_clients, cfg, device)

    def send(self, spec, global_state, cid):
        """theta_cid = h(e_cid; psi) as named tensors: all the client receives."""
        theta = generate(global_state, global_state["embeddings"][cid][None], path="reference")[0]
        return split_flat(theta.detach(), self.generated_shapes(spec))

    def client_update(self, spec, global_state, private, data, cfg, round_idx, noise=None):
        model = cnn_from(spec, {**global_state, **{k: private[k] for k in CLASSIFIER_KEYS if k in private}})
        trained = [p for k, p in model.named_parameters() if k in global_state]
        optimizers = [client_sgd(trained)]
        head = [p for k, p in model.named_parameters() if k not in global_state]  # pfedhn-pc: its classifier
        if head:
            optimizers.append(client_sgd(head))
            for p, k in zip(head, CLASSIFIER_KEYS):  # its momentum, kept between rounds
                optimizers[1].state[p]["momentum_buffer"] = private[momentum_key(k)].clone()
        for epoch in range(cfg.local_epochs):
            losses = []
            for x, y in data.batches(cfg.batch_size, cfg.seed, round_idx, epoch):
                for optimizer in optimizers:
                    optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, SETTINGS.grad_clip)
                for optimizer in optimizers:
                    optimizer.step()
                losses.append(loss.item())
        state = detached(model)
        upload = {k: global_state[k] - state[k] for k in global_state}  # delta theta
        private = {**{k: state[k] for k in CLASSIFIER_KEYS if k in private},
                   **{momentum_key(k): optimizers[-1].state[p]["momentum_buffer"].clone()
                      for p, k in zip(head, CLASSIFIER_KEYS)}}
        return ClientUpdate(upload, private, sum(losses) / len(losses), accuracy(model, data.test_x, data.test_y))

    def aggregate(self, global_state, uploads, weights, cids):
        """Each upload's gradient J^T delta at the received psi (autograd), then one server step each."""
        grads = []
        for upload, cid in zip(uploads, cids):
            leaves = {k: global_state[k].detach().clone().requires_grad_() for k in SERVER_KEYS}
            theta = generate(leaves, leaves["embeddings"][cid][None], path="reference")[0]
            delta = torch.cat([t.flatten() for t in upload.values()])  # in theta's order, as sent
            grads.append(dict(zip(SERVER_KEYS, torch.autograd.grad(theta, list(leaves.values()), delta))))
        return server_steps(global_state, grads, self.settings) if grads else global_state

    def predict(self, spec, global_state, private):
        return cnn_from(spec, {**global_state, **{k: private[k] for k in CLASSIFIER_KEYS if k in private}},
                        copy=False)


@register
class PFedHNPC(PFedHN):
    name = "pfedhn-pc"
    paper_row = 2  # listed after pFedHN (Table 1 has no pFedHN-PC row; the sort keeps registration order)
    headline = "global_acc"
    uploads = "the change of the feature extractor the server generated for it"
    keeps = "its classifier"
    threat = "representation"  # the server knows the feature extractor it sent, not the classifier
    paper = {}  # Table 1 has no pFedHN-PC row (Table 3 does)
    settings = PC_SETTINGS  # pfedhn_pc/trainer.py: the server's lr is 5e-2

    def generated_shapes(self, spec):
        """What the hypernetwork generates: the feature extractor (theta, as HyperFL's)."""
        return spec.feature_shapes()

    def init_private(self, spec, num_clients, cfg, device):
        draws = [torch.nn.Linear(spec.hidden, spec.num_classes).to(device)
                 for _ in range(1 if cfg.client_init == "shared" else num_clients)]
        classifiers = [draws[0 if len(draws) == 1 else i] for i in range(num_clients)]
        return [{**detached(c, "fc2."), **{momentum_key(f"fc2.{k}"): torch.zeros_like(t)
                                           for k, t in c.state_dict().items()}} for c in classifiers]
