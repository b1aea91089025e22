"""Record-level DP-SGD building blocks for the privacy-preserving baselines (DP-FedAvg, PPSGD, CENTAUR).

- :func:`noise_multiplier` and :class:`PrivacyAccountant`: sigma for a target
  (epsilon, delta) and the epsilon spent so far, from Opacus' RDP accountant
  (never a home-made one).
- :func:`per_example_grads`: every sample's gradient at once with
  ``torch.func`` (``vmap`` over ``grad``), never a loop of B backward passes;
  with ``clients=True`` it is vectorised over a leading client dimension too.
- :func:`private_gradient`: clip each sample's gradient to norm C (over all
  tensors together), sum, add Gaussian noise N(0, (sigma C)^2) drawn from a
  keyed CPU generator per client, divide by the batch's size.  This is the one
  clip-and-noise of the package: the per-client step the authors' way
  (:func:`dp_sgd_step`), the lockstep engines (:func:`private_step_grads`) and
  the attacks' simulation of a DP upload (:mod:`hyperfl_fast.privacy.attacks`)
  all call it.

Shapes: a per-example gradient is (B, *shape), or (N, B, *shape) with a client
dimension; ``valid`` (B,) or (N, B) marks real rows of padded batches.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

from .federation import make_generator

NOISE_STREAM = -2  # the last key of a DP noise generator: (seed, round, client, epoch, step, NOISE_STREAM)


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, epochs: int) -> float:
    """sigma such that ``epochs`` passes at ``sample_rate`` spend (epsilon, delta) under Opacus' RDP accountant."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, epochs=epochs,
                                accountant="rdp")


class PrivacyAccountant:
    """The epsilon one client has spent, by Opacus' RDP accountant over its DP-SGD steps.

    With shuffled (not Poisson-sampled) batches, as in the authors' code, the
    figure is nominal: the accountant's guarantee assumes Poisson sampling.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float):
        from opacus.accountants import RDPAccountant

        self.noise_multiplier, self.sample_rate = noise_multiplier, sample_rate
        self._accountant = RDPAccountant()

    def step(self, steps: int = 1) -> None:
        """Record ``steps`` noisy gradient steps."""
        for _ in range(steps):
            self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self._accountant.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        return self._accountant.get_epsilon(delta) if self._accountant.history else 0.0

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self._accountant.history]}

    def load_state_dict(self, state: dict) -> None:
        self._accountant.history = [tuple(entry) for entry in state["history"]]


def per_example_grads(model: torch.nn.Module, params: dict[str, torch.Tensor],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor, clients: bool = False,
                      frozen: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Each sample's gradient of ``loss_fn(model(x_i), y_i)`` w.r.t. ``params``, vectorised.

    Without clients: params as the module's shapes, x (B, ...), y (B,) -> (B, *shape).
    With ``clients=True``: params (N, *shape), x (N, B, ...), y (N, B) -> (N, B, *shape).
    ``frozen``: the module's other tensors (same layout), used but not differentiated.
    """
    def sample_loss(p, fixed, xi, yi):
        return loss_fn(functional_call(model, {**p, **fixed}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    frozen = frozen or {}
    per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))
    if clients:
        return vmap(per_sample, in_dims=(0, 0, 0, 0))(params, frozen, x, y)
    return per_sample(params, frozen, x, y)


def private_gradient(per_example: dict[str, torch.Tensor], valid: torch.Tensor, clip: float,
                     sigma: float | list[float], generators: list[torch.Generator] | None,
                     denominator: float | list[float] | None = None) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient: sum of per-sample gradients clipped to ``clip``, plus N(0, (sigma clip)^2), over B.

    B is the batch's real size, or ``denominator`` (one, or one per client): the expected batch size under
    Poisson sampling.
    ``valid`` (B,) or (N, B); ``sigma`` one noise multiplier, or one per client;
    ``generators`` one CPU generator per client (one without a client
    dimension): client n's noise is drawn from generators[n],
    tensor by tensor in the order of ``per_example``, so any engine that keys
    them alike draws the same noise; None adds no noise (an attacker's
    simulation).  Differentiable in ``per_example``.
    """
    clients = valid.dim() == 2
    rows = valid.dim()  # per-example tensors are (*valid.shape, *param shape)
    sq_norm = sum(g.flatten(rows).pow(2).sum(-1) for g in per_example.values())  # (..., B)
    factor = (clip / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0) * valid  # invalid rows contribute nothing
    count = valid.sum(-1).clamp(min=1).to(factor.dtype) if denominator is None else \
        torch.as_tensor(denominator, dtype=factor.dtype, device=factor.device)  # (...,)
    out = {}
    for name, g in per_example.items():
        summed = (factor.view(*factor.shape, *[1] * (g.dim() - rows)) * g).sum(rows - 1)  # (..., *shape)
        shape = summed.shape[1:] if clients else summed.shape
        if generators is not None:
            noise = torch.stack([torch.randn(shape, generator=gen) for gen in generators]) if clients else \
                torch.randn(shape, generator=generators[0])
            std = clip * torch.as_tensor(sigma, dtype=summed.dtype, device=summed.device)
            summed = summed + std.view(*std.shape, *[1] * len(shape)) * noise.to(summed)  # per client: (N, 1, ...)
        out[name] = summed / count.view(*count.shape, *[1] * len(shape))
    return out


def private_step_grads(template: torch.nn.Module, trainable: dict[str, torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor, valid: torch.Tensor, cfg, privacy: "ClientPrivacy", cids: list[int],
                       round_idx: int, epoch: int, step: int,
                       frozen: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One lockstep DP-SGD step's gradients of ``trainable`` (N, *shape) for all clients (batch x (N, B, ...),
    y and valid (N, B)): every sample's gradient at once, clipped and noised with each client's sigma and the
    reference's keyed noise."""
    per_example = per_example_grads(template, trainable, torch.nn.functional.cross_entropy, x, y, clients=True,
                                    frozen=frozen)  # (N, B, *shape)
    noise = [noise_generator(cfg.seed, round_idx, c, epoch, step) for c in cids]
    expected = [expected_batch_size(cfg, privacy.sizes[c]) for c in cids] if cfg.poisson else None
    grads = private_gradient(per_example, valid, cfg.dp_clip, [privacy.sigmas[c] for c in cids], noise, expected)
    return list(grads.values())


def dp_sgd_step(model: torch.nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, clip: float, sigma: float, generator: torch.Generator,
                denominator: float | None = None) -> None:
    """One DP-SGD step on ``params`` the authors' way, the per-client oracle of the lockstep engines' step:
    a backward pass per sample, then :func:`private_gradient` (each gradient clipped to ``clip``, their sum plus
    N(0, (sigma clip)^2) noise from ``generator``, tensor by tensor, divided by the batch size or
    ``denominator``: the expected batch size under Poisson sampling; the batch may then be empty), then the
    optimizer's step."""
    per_sample = [torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi[None]), yi[None]), params)
                  for xi, yi in zip(x, y)]
    per_example = {i: torch.stack([g[i] for g in per_sample]) if per_sample else p.new_zeros(0, *p.shape)
                   for i, p in enumerate(params)}
    grads = private_gradient(per_example, torch.ones(len(y), dtype=torch.bool, device=params[0].device), clip,
                             sigma, [generator], denominator)
    for i, p in enumerate(params):
        p.grad = grads[i]
    optimizer.step()


def expected_batch_size(cfg, num_train: int) -> int:
    """A client's expected Poisson batch size, min(B, n): the DP-SGD sum's denominator under ``--poisson``."""
    return min(cfg.batch_size, num_train)


def dp_batches(data, cfg, round_idx: int, epoch: int):
    """A client's DP-SGD batches for one epoch: Poisson-sampled under ``cfg.poisson``, else shuffled."""
    if cfg.poisson:
        return data.poisson_batches(cfg.batch_size, cfg.seed, round_idx, epoch)
    return data.batches(cfg.batch_size, cfg.seed, round_idx, epoch)


def noise_generator(seed: int, round_idx: int, client: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator of one client's DP noise at one step, keyed so every engine draws the same noise."""
    return make_generator(seed, round_idx, client, epoch, step, NOISE_STREAM)


class ClientPrivacy:
    """Every client's noise multiplier and privacy accountant, as the DP-SGD methods keep them.

    A client with n samples and batch size B samples at rate min(B, n) / n and
    takes ceil(n / B) noisy steps per epoch; its sigma is what spends
    (epsilon, delta) over ``rounds * local_epochs`` epochs (the authors' setting).
    """

    def __init__(self, sizes: list[int], batch_size: int, epsilon: float, delta: float, rounds: int,
                 local_epochs: int):
        self.delta, self.local_epochs, self.sizes = delta, local_epochs, list(sizes)
        self.steps_per_epoch = [math.ceil(n / batch_size) for n in sizes]
        rates = [min(batch_size, n) / n for n in sizes]
        by_rate = {rate: noise_multiplier(epsilon, delta, rate, rounds * local_epochs) for rate in set(rates)}
        self.sigmas = [by_rate[rate] for rate in rates]
        self.accountants = [PrivacyAccountant(sigma, rate) for sigma, rate in zip(self.sigmas, rates)]

    @classmethod
    def from_config(cls, sizes: list[int], cfg) -> "ClientPrivacy":
        """Clients of ``sizes`` samples under a run's settings (batch size, epsilon, delta, rounds, epochs)."""
        return cls(sizes, cfg.batch_size, cfg.epsilon, cfg.delta, cfg.rounds, cfg.local_epochs)

    def record_round(self, cids: list[int]) -> list[float]:
        """Account for one round of local training of ``cids``; returns each one's epsilon spent so far."""
        for c in cids:
            self.accountants[c].step(self.steps_per_epoch[c] * self.local_epochs)
        return [self.accountants[c].epsilon(self.delta) for c in cids]

    def state_dict(self) -> dict:
        return {"accountants": [a.state_dict() for a in self.accountants]}

    def load_state_dict(self, state: dict) -> None:
        for accountant, saved in zip(self.accountants, state["accountants"]):
            accountant.load_state_dict(saved)
