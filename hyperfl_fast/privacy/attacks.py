"""Gradient inversion: the client update an attacker observes, and the optimisers that invert it.

A client's upload is produced by :func:`local_update`: with ``steps == 1`` it
is the gradient (the classic gradient-inversion setting), otherwise the
parameter change after ``steps`` SGD steps (momentum, weight decay, optional
per-group norm clipping: the real local training).  The same function,
differentiable end to end, simulates the upload from dummy data, so an attack
only has to say which quantities are unknown.

- IG (Geiping et al. 2020): 1 - cosine similarity between simulated and
  observed uploads + total-variation prior, Adam with step decay (x0.1 at 3/8,
  5/8, 7/8 of the iterations) fed the sign of the images' gradient (as the
  ``breaching`` library's ``signed: hard``; ``AttackBudget.signed``), the
  best-matching iterate of each restart kept (not the last), several random
  restarts, the best-matching one returned and every one reported.
- DLG (Zhu et al. 2019): squared L2 distance, L-BFGS; it too keeps the best-matching iterate.

Only the optimised unknowns are differentiated (``torch.autograd.grad``), never
the model's parameters, which an attacker holds fixed.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..config import Config
from ..dp import private_gradient

Params = dict[str, torch.Tensor]
TV_FMNIST = 3e-3  # see TV_WEIGHT
LossFn = Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LocalTraining:
    """How the attacked client trains before uploading."""

    steps: int = 1  # 1: the upload is the gradient; > 1: the upload is the parameter change
    lr: float = Config.lr  # the paper's settings (hyperfl_fast.config)
    momentum: float = Config.momentum
    weight_decay: float = Config.weight_decay
    clip: float | None = None  # max grad norm per group (HyperFL: 50), None = no clipping
    groups: list[list[str]] = field(default_factory=list)  # clipping groups (names; none: all trainable tensors)
    dp_clip: float | None = None  # DP-SGD: each sample's gradient clipped to this norm (None: no DP)
    dp_sigma: float = 0.0  # DP-SGD: noise multiplier; the clipped sum gets N(0, (dp_sigma dp_clip)^2)


def dp_upload_gradient(loss_fn: LossFn, params: Params, x: torch.Tensor, y: torch.Tensor, training: LocalTraining,
                       create_graph: bool, noise: torch.Generator | None) -> Params:
    """DP-SGD's gradient as the DP baselines compute it (:func:`hyperfl_fast.dp.private_gradient`, the one
    clip-and-noise): per-sample gradients clipped to ``dp_clip``, summed, plus Gaussian noise (drawn from
    ``noise``; an attacker simulating the upload has none), over the batch; differentiable with
    ``create_graph``."""
    names = list(params)
    per_sample = [torch.autograd.grad(loss_fn(params, xi[None], yi[None]), [params[k] for k in names],
                                      create_graph=create_graph) for xi, yi in zip(x, y)]
    per_example = {k: torch.stack([g[i] for g in per_sample]) for i, k in enumerate(names)}
    return private_gradient(per_example, torch.ones(len(y), dtype=torch.bool, device=x.device), training.dp_clip,
                            training.dp_sigma, None if noise is None else [noise])


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against (soft) label distributions (B, K): the batch mean, as the client's loss."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def local_update(loss_fn: LossFn, trainable: Params, frozen: Params, x: torch.Tensor, y: torch.Tensor,
                 training: LocalTraining, create_graph: bool = False, noise: torch.Generator | None = None) -> Params:
    """The client's upload for data (x, y): gradients (1 step) or parameter changes (several steps).

    ``create_graph`` keeps it differentiable w.r.t. x, y and every input
    tensor, which is how an attacker simulates it.  With ``training.dp_clip``
    every step is a DP-SGD step (:func:`dp_upload_gradient`; noise from ``noise``).
    """
    # leaves to differentiate against (the values are the caller's tensors)
    params = {k: t if t.requires_grad else t.detach().requires_grad_() for k, t in trainable.items()}
    names = list(params)
    bufs = {k: torch.zeros_like(t) for k, t in params.items()}
    for _ in range(training.steps):
        if training.dp_clip is not None:
            grads = dp_upload_gradient(lambda p, xi, yi: loss_fn({**frozen, **p}, xi, yi), params, x, y, training,
                                       create_graph or training.steps > 1, noise)
        else:
            loss = loss_fn({**frozen, **params}, x, y)
            grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names],
                                                       create_graph=create_graph or training.steps > 1)))
        if training.steps == 1:
            return grads
        if training.clip is not None:
            for group in training.groups or [names]:
                norm = torch.sqrt(sum(grads[k].pow(2).sum() for k in group))
                coef = torch.clamp(training.clip / (norm + 1e-6), max=1.0)
                grads.update({k: grads[k] * coef for k in group})
        for k in names:
            bufs[k] = training.momentum * bufs[k] + grads[k] + training.weight_decay * params[k]
            params[k] = params[k] - training.lr * bufs[k]
    return {k: params[k] - trainable[k] for k in names}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (images (B, C, H, W))."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def cosine_distance(simulated: list[torch.Tensor], observed: list[torch.Tensor]) -> torch.Tensor:
    """1 - cosine similarity of the two uploads, all tensors flattened into one vector."""
    dot = sum((s * o).sum() for s, o in zip(simulated, observed))
    norm_s = torch.sqrt(sum(s.pow(2).sum() for s in simulated))
    norm_o = torch.sqrt(sum(o.pow(2).sum() for o in observed))
    return 1 - dot / (norm_s * norm_o + 1e-12)


def l2_distance(simulated: list[torch.Tensor], observed: list[torch.Tensor]) -> torch.Tensor:
    return sum((s - o).pow(2).sum() for s, o in zip(simulated, observed))


# IG's total-variation weight by dataset, chosen by measurement (benchmarks/RESULTS.md, 2026-12-01: FedAvg's
# one-step upload, Fashion-MNIST, 1000 iterations, seeds 0-2); the datasets not on the development machine take
# Fashion-MNIST's value until measured
TV_WEIGHT = {"fmnist": TV_FMNIST}
DEFAULT_TV_WEIGHT = TV_FMNIST


@dataclass
class AttackBudget:
    """Optimisation budget and hyper-parameters of an attack."""

    iterations: int = 1000
    restarts: int = 1
    lr: float = 0.1  # Adam (IG) step size; L-BFGS uses 1
    tv_weight: float = DEFAULT_TV_WEIGHT  # IG; by dataset: TV_WEIGHT
    seed: int = 0
    signed: bool = True  # IG: Adam takes the sign of the images' gradient


@dataclass
class Unknowns:
    """What the attacker optimises besides the images: named tensors and their initialisers."""

    init: dict[str, Callable[[torch.Generator], torch.Tensor]] = field(default_factory=dict)


@dataclass
class Reconstruction:
    """One restart's result (its best-matching iterate); :func:`reconstruct` returns the best restart, holding
    every restart's in ``restarts`` (itself included) so that their spread can be reported."""

    images: torch.Tensor  # (B, C, H, W) in the model's normalised input space
    labels: torch.Tensor  # (B, K) label distribution used at the end
    extras: Params  # the other optimised unknowns
    matching_loss: float  # the objective at these images (IG: cosine distance + TV)
    seconds: float
    restarts: list[Reconstruction] = field(default_factory=list)


def reconstruct(simulate: Callable[[torch.Tensor, torch.Tensor, Params], list[torch.Tensor]],
                observed: list[torch.Tensor], shape: tuple[int, ...], num_classes: int, bounds: tuple,
                labels: torch.Tensor | None = None, unknowns: Unknowns | None = None, method: str = "ig",
                budget: AttackBudget | None = None,
                progress: Callable[[Iterable], Iterable] = iter) -> Reconstruction:
    """Find images (and unknowns) whose simulated upload matches ``observed``.

    simulate(images, label_distributions, extras) -> upload tensors (same order
    as ``observed``).  ``labels`` (B,) if known/inferred, else optimised.
    ``bounds`` (low, high): per-channel tensors (C, 1, 1) of the valid input range.
    Runs on the device of ``observed``; every random start is drawn on the CPU
    from the budget's seed, so CPU and GPU attacks start from the same point.
    """
    budget = budget or AttackBudget()
    unknowns = unknowns or Unknowns()
    if method not in ("ig", "dlg"):
        raise ValueError(f"attack method must be 'ig' or 'dlg', got {method!r}")
    gen = torch.Generator().manual_seed(budget.seed)
    device = observed[0].device
    low, high = (b.to(device) for b in bounds)
    restarts = []
    start = time.perf_counter()
    for _ in range(budget.restarts):
        began = time.perf_counter()
        x = torch.randn(shape, generator=gen).to(device).clamp(low, high).requires_grad_()
        extras = {k: fn(gen).to(device).requires_grad_() for k, fn in unknowns.init.items()}
        label_logits = None if labels is not None else torch.randn(shape[0], num_classes,
                                                                     generator=gen).to(device).requires_grad_()
        variables = [x, *extras.values()] + ([label_logits] if label_logits is not None else [])

        def label_dist():
            return F.one_hot(labels, num_classes).float() if labels is not None else label_logits.softmax(-1)

        def objective():
            upload = simulate(x, label_dist(), extras)
            if method == "ig":
                return cosine_distance(upload, observed) + budget.tv_weight * total_variation(x)
            return l2_distance(upload, observed)

        best: Params = {}  # the best-matching iterate and its loss, kept on the device (no host sync per step)

        def evaluate():
            """The objective at the current iterate, with the unknowns' gradients (only theirs) in ``.grad``;
            the iterate is kept if it matches best so far."""
            value = objective()
            grads = torch.autograd.grad(value, variables, allow_unused=True)
            for variable, grad in zip(variables, grads):
                variable.grad = torch.zeros_like(variable) if grad is None else grad
            current = {"loss": value.detach(), "images": x.detach(), "labels": label_dist().detach(),
                       **{f"extra.{k}": t.detach() for k, t in extras.items()}}
            better = (current["loss"] < best["loss"]) | best["loss"].isnan() if best else None
            best.update({k: t.clone() if better is None else torch.where(better, t, best[k])
                         for k, t in current.items()})
            return value

        if method == "ig":
            opt = torch.optim.Adam(variables, lr=budget.lr)
            milestones = [int(budget.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
            for _ in progress(range(budget.iterations)):
                evaluate()
                if budget.signed:
                    x.grad.sign_()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, high), low))
        else:
            opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=1, history_size=100)
            for _ in progress(range(budget.iterations)):
                opt.step(evaluate)
        evaluate()  # the last iterate
        restarts.append(Reconstruction(best["images"], best["labels"],
                                       {k: best[f"extra.{k}"] for k in extras}, float(best["loss"]),
                                       time.perf_counter() - began))
    chosen = min(restarts, key=lambda r: r.matching_loss)
    return dataclasses.replace(chosen, seconds=time.perf_counter() - start, restarts=restarts)


def infer_labels(bias_upload: torch.Tensor, batch_size: int, is_gradient: bool) -> torch.Tensor:
    """Labels from the classifier-bias gradient (or update): its most negative gradient entries.

    Exact for batch size 1 (iDLG); for larger batches it assumes distinct labels.
    """
    score = bias_upload if is_gradient else -bias_upload
    return torch.argsort(score)[:batch_size].sort().values
