"""pFedHN's own training loop on this package's Fashion-MNIST split: which of its settings the gap comes from.

Issue 20 asked why ``--method pfedhn`` ended 4.3 points under the HyperFL paper's 87.64% (benchmarks/RESULTS.md)
when it ran pFedHN inside federated rounds with HyperFL's hypernetwork.  This script is a small, independent
rendering of pFedHN's own loop (Shamsian et al., ``experiments/pfedhn/trainer.py``):

- each server step samples one client at random, generates its whole CNN, and trains it for ``--inner-steps``
  batches of ``--batch-size``, each drawn from a fresh shuffle of the client's data (pFedHN draws
  ``next(iter(loader))``); client SGD lr 5e-3, momentum 0.9, weight decay 5e-5, gradient norm clipped to 50;
- the server's gradient is the vector-Jacobian product of delta theta = theta - theta~ through the generation,
  clipped to 50 over the hypernetwork and all embeddings; server SGD lr 1e-2, momentum 0.9, weight decay 1e-3;
- the headline is pFedHN's: every client's *generated* model on its own test set, pooled.

``--hypernet`` picks the generator (:data:`HYPERNETS`): ``package`` is the hypernetwork ``--method pfedhn`` used
before 2026-12-07 (HyperFL's: embedding 64, Linear(64, 128), ReLU, heads), ``pfedhn`` pFedHN's CNNHyper
(embedding 1 + N/4, Linear(E, 100), then 3 x [ReLU, Linear(100, 100)], then the heads with no activation before
them; what ``--method pfedhn`` uses now), and the others one difference between the two at a time.  ``--target``
picks the generated network: ``paper`` is the HyperFL paper's CNN (this package's), ``lenet`` pFedHN's own
``CNNTarget`` (n_kernels 16) for one 28 x 28 channel.

Run on the CPU (one thread per job)::

    OMP_NUM_THREADS=1 python benchmarks/pfedhn_gap.py --hypernet pfedhn --steps 2000 --out /tmp/gap_pfedhn.json

It prints the mean generated-model accuracy every ``--eval-every`` steps and writes them to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from hyperfl_fast.config import Config
from hyperfl_fast.federation import build_clients, load_partition
from hyperfl_fast.models import TargetCNN, split_flat


class MLPHyper(nn.Module):
    """h(e; psi) = heads(act(mlp(e))): ``mlp`` is Linear(E, H) then ``depth`` x [ReLU, Linear(H, H)]; ``act`` is a
    ReLU (``relu_before_heads``) or nothing.  depth 0 with the ReLU is this package's HyperNetwork; depth 3 without
    it is pFedHN's CNNHyper."""

    def __init__(self, embed_dim: int, hidden_dim: int, num_params: int, depth: int, relu_before_heads: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(embed_dim, hidden_dim)]
        for _ in range(depth):
            layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
        if relu_before_heads:
            layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Linear(hidden_dim, num_params)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.heads(self.mlp(embedding))


class LeNetTarget(nn.Module):
    """pFedHN's ``CNNTarget`` (``experiments/pfedhn/models.py``, n_kernels 16) for one 28 x 28 channel: conv 5x5 to
    16, pool, conv 5x5 to 32, pool, then 512 -> 120 -> 84 -> 10 (pFedHN's 32 x 5 x 5 input is 32 x 4 x 4 here)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


# name -> (embedding size, or None for pFedHN's 1 + N/4; hidden size; depth; ReLU before the heads)
HYPERNETS = {
    "package": (64, 128, 0, True),  # --method pfedhn's
    "pfedhn": (None, 100, 3, False),  # pFedHN's CNNHyper (n_hidden 3, hyper_hid 100, embed_dim -1)
    "pfedhn-relu": (None, 100, 3, True),  # pFedHN's with a ReLU before the heads
    "package-e6": (None, 128, 0, True),  # the package's with pFedHN's embedding size
    "package-h100x2": (64, 100, 1, False),  # the package's sizes, two layers deep, no ReLU before the heads
}


def build(kind: str, num_clients: int, num_params: int) -> tuple[nn.Module, nn.Embedding]:
    embed_dim, hidden_dim, depth, relu = HYPERNETS[kind]
    embed_dim = embed_dim or int(1 + num_clients / 4)
    return MLPHyper(embed_dim, hidden_dim, num_params, depth, relu), nn.Embedding(num_clients, embed_dim)


@torch.no_grad()
def generated_accuracy(hypernet, embeddings, net, shapes, clients) -> float:
    """pFedHN's headline: every client's generated model on its own test set, correct over all test samples."""
    correct = total = 0
    for c in clients:
        params = split_flat(hypernet(embeddings.weight[c.client_id]), shapes)
        pred = torch.func.functional_call(net, params, (c.test_x,)).argmax(1)
        correct += (pred == c.test_y).sum().item()
        total += len(c.test_y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hypernet", choices=tuple(HYPERNETS), default="pfedhn")
    parser.add_argument("--target", choices=("paper", "lenet"), default="paper")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the accuracy curve")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    cfg = Config(dataset="fmnist", clients=20, seed=args.seed, device="cpu")
    dataset, splits, spec = load_partition(cfg)
    clients = build_clients(dataset, splits, torch.device("cpu"))
    net = TargetCNN(spec) if args.target == "paper" else LeNetTarget(spec.num_classes)
    shapes = [(name, tuple(p.shape)) for name, p in net.named_parameters()]
    hypernet, embeddings = build(args.hypernet, len(clients), sum(p.numel() for p in net.parameters()))
    server_params = list(hypernet.parameters()) + [embeddings.weight]
    server_opt = torch.optim.SGD(server_params, lr=1e-2, momentum=0.9, weight_decay=1e-3)
    pick = random.Random(args.seed)
    shuffles = torch.Generator().manual_seed(args.seed)

    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        client = clients[pick.randrange(len(clients))]
        theta = hypernet(embeddings.weight[client.client_id])  # (P,), differentiable in (psi, e_i)
        local = {k: v.detach().clone().requires_grad_() for k, v in split_flat(theta, shapes).items()}
        client_opt = torch.optim.SGD(local.values(), lr=5e-3, momentum=0.9, weight_decay=5e-5)
        for _ in range(args.inner_steps):
            idx = torch.randperm(client.num_train, generator=shuffles)[:args.batch_size]
            loss = F.cross_entropy(torch.func.functional_call(net, local, (client.train_x[idx],)),
                                   client.train_y[idx])
            client_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(local.values(), 50.0)
            client_opt.step()
        delta = torch.cat([(theta_k - local[k]).detach().flatten()
                           for k, theta_k in split_flat(theta, shapes).items()])
        grads = torch.autograd.grad(theta, server_params, grad_outputs=delta)
        for p, g in zip(server_params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(server_params, 50.0)
        server_opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = generated_accuracy(hypernet, embeddings, net, shapes, clients)
            curve.append({"step": step, "accuracy": acc, "seconds": time.perf_counter() - start})
            print(f"step {step}: generated-model accuracy {acc:.2f}% ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "curve": curve}, f, indent=1)


if __name__ == "__main__":
    main()
