"""Record-level DP-SGD building blocks for the privacy-preserving baselines (DP-FedAvg, PPSGD, CENTAUR).

- :func:`noise_multiplier` and :class:`PrivacyAccountant`: sigma for a target (epsilon, delta) over the steps a
  client actually takes, and the epsilon spent so far, from Opacus' RDP accountant (never a home-made one),
  over an extended range of RDP orders (:data:`ALPHAS`).
- :class:`NoiseSource`: where the noise comes from.  By default (``--dp-noise secure``) a generator per client,
  on the device the step runs on, seeded from the operating system's entropy when the run starts: nothing the
  run writes or sends determines it, and it samples with Opacus' secure-mode rule.  ``keyed`` noise is drawn
  from generators keyed by (seed, round, client, epoch, step): reproducible, so both engines draw the same noise
  (the equivalence tests), and anyone who knows the seed can subtract it: a simulation setting, never private.
- :func:`per_example_grads`: every sample's gradient at once with ``torch.func`` (``vmap`` over ``grad``);
  with ``clients=True`` it is vectorised over a leading client dimension too.  The oracle of the lockstep
  engines' ghost-clipped step (:mod:`hyperfl_fast.lockstep.dp_step`).
- :func:`private_gradient` (= :func:`clip_and_sum` then :func:`noised_mean`): clip each sample's gradient to
  norm C (over all tensors together), sum, add Gaussian noise N(0, (sigma C)^2), divide by the batch's size.
  This is the one clip-and-noise of the package: the per-client step the authors' way (:func:`dp_sgd_step`),
  the lockstep engines and the attacks' simulation of a DP upload (:mod:`hyperfl_fast.privacy.attacks`) all
  call it.

Shapes: a per-example gradient is (B, *shape), or (N, B, *shape) with a client dimension; ``valid`` (B,) or
(N, B) marks real rows of padded batches.
"""
from __future__ import annotations

import functools
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

from .federation import make_generator
from .ops.sgd import SGD

NOISE_STREAM = -2  # the last key of a DP noise generator: (seed, round, client, epoch, step, NOISE_STREAM)
NOISE_MODES = ("secure", "keyed")
# RDP orders: Opacus' defaults (1.1 to 63) extended down to 1.01 and up to 128 (beyond, Opacus' RDP of the
# subsampled Gaussian overflows), so that large budgets (optimal order near 1) and small ones (large orders) are
# not cut off at the edge of the search, where Opacus warns and its bound is loose
ALPHAS = [1 + x / 100 for x in range(1, 10)] + [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + \
    [64 * 2 ** (k / 4) for k in range(0, 5)]
NOT_PRIVATE_EPSILON = 100.0  # above this a budget protects nothing worth the name (a warning says so)


def _quiet_opacus(fn):
    """Opacus' accountant warns when the optimal order is at the end of its range; :data:`ALPHAS` covers the
    range that matters, so the remaining warnings are noise for a user."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            return fn(*args, **kwargs)
    return wrapper


class BudgetTooSmall(ValueError):
    """No noise multiplier makes the steps spend only the target epsilon."""


@functools.lru_cache(maxsize=256)
@_quiet_opacus
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """sigma such that ``steps`` DP-SGD steps at ``sample_rate`` spend (epsilon, delta) under Opacus' RDP
    accountant (its search; the result spends at most epsilon).  Cached: the search takes seconds at high
    sample rates (Opacus' series for fractional orders), and a run asks for it in its budget check and again
    for its clients."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                    steps=steps, accountant="rdp", alphas=ALPHAS)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise BudgetTooSmall(f"epsilon {epsilon:g} at delta {delta:g} is too small for {steps} DP-SGD steps at "
                             f"sample rate {sample_rate:.4g}: no noise multiplier up to 1e6 spends only that "
                             f"({exc})") from None


@functools.lru_cache(maxsize=4096)
@_quiet_opacus
def spent_epsilon(history: tuple, delta: float) -> float:
    """Epsilon spent by the DP-SGD steps in ``history`` ((sigma, sample rate, steps), ...) at ``delta``; cached,
    since clients with the same data size share it and it is asked for every round."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta, alphas=ALPHAS)


class PrivacyAccountant:
    """The epsilon one client has spent, by Opacus' RDP accountant over its DP-SGD steps.

    With shuffled (not Poisson-sampled) batches, as in the authors' code, the
    figure is nominal: the accountant's guarantee assumes Poisson sampling.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float):
        self.noise_multiplier, self.sample_rate = noise_multiplier, sample_rate
        self.history: list[tuple[float, float, int]] = []  # (sigma, rate, steps), as Opacus' RDPAccountant keeps it

    def step(self, steps: int = 1) -> None:
        """Record ``steps`` noisy gradient steps."""
        if self.history and self.history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            self.history[-1] = (self.noise_multiplier, self.sample_rate, self.history[-1][2] + steps)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, steps))

    @property
    def steps(self) -> int:
        return sum(count for _, _, count in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        return spent_epsilon(tuple(self.history), delta)

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(entry) for entry in state["history"]]


def keyed_noise(generator: torch.Generator, std: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """N(0, std^2) shaped like ``like``, from a CPU generator: the keyed stream every engine draws alike."""
    return std * torch.randn(like.shape, generator=generator).to(like)


class NoiseSource:
    """Where each client's DP noise comes from (see the module docs): ``secure`` or ``keyed``."""

    def __init__(self, mode: str, seed: int):
        if mode not in NOISE_MODES:
            raise ValueError(f"dp noise must be one of {', '.join(NOISE_MODES)}, got {mode!r}")
        self.mode, self.seed = mode, seed
        self._secret: dict[tuple[int, torch.device], torch.Generator] = {}

    @property
    def private(self) -> bool:
        return self.mode == "secure"

    def generator(self, client: int, round_idx: int, epoch: int, step: int,
                  device: torch.device = torch.device("cpu")) -> torch.Generator:
        """The generator of ``client``'s noise at this step."""
        if self.mode == "keyed":
            return noise_generator(self.seed, round_idx, client, epoch, step)
        key = (client, torch.device(device))
        if key not in self._secret:  # 63 bits from the OS, never written anywhere
            self._secret[key] = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        return self._secret[key]

    def sample(self, generator: torch.Generator, std: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """N(0, std^2) shaped like ``like`` from ``generator``: keyed, or with Opacus' secure-mode sampler (a sum
        of Gaussians, robust to floating-point attacks) on ``like``'s device."""
        if self.mode == "keyed":
            return keyed_noise(generator, std, like)
        from opacus.optimizers.optimizer import _generate_noise

        return _generate_noise(float(std), like, generator, secure_mode=True)


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


def clip_and_sum(per_example: dict[str, torch.Tensor], valid: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """Each sample's gradient clipped to norm ``clip`` over all tensors together, summed over the batch (padded
    rows, ``valid`` False, count for nothing): (B, *shape) -> shape, or (N, B, *shape) -> (N, *shape).  The norms
    by ``linalg.vector_norm`` and the weighted sum as one batched GEMM per tensor."""
    rows = valid.dim()
    sq_norm = sum(torch.linalg.vector_norm(g.flatten(rows), dim=-1) ** 2 for g in per_example.values())  # (..., B)
    factor = (clip / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0) * valid  # (..., B)
    m, b = (factor.shape[0] if rows == 2 else 1), factor.shape[-1]
    weights = factor.reshape(m, 1, b)  # (M, 1, B), M = N clients or 1
    return {name: torch.bmm(weights.to(g.dtype), g.reshape(m, b, math.prod(g.shape[rows:])))
            .reshape(*factor.shape[:-1], *g.shape[rows:]) for name, g in per_example.items()}


def noised_mean(sums: dict[str, torch.Tensor], valid: torch.Tensor, clip: float, sigma: float | list[float],
                generators: list[torch.Generator] | None, denominator: float | list[float] | None = None,
                sample: Callable = keyed_noise) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient from clipped sums: plus N(0, (sigma clip)^2) noise, over the batch size.

    The batch size is the batch's real size (``valid`` (B,) or (N, B)), or ``denominator`` (one, or one per
    client): the expected batch size under Poisson sampling.  ``sigma`` is one noise multiplier or one per
    client; ``generators`` one generator per client (one without a client dimension): client n's noise is
    drawn from generators[n] by ``sample`` (a :class:`NoiseSource`'s), tensor by tensor in the order of
    ``sums``, so any engine that keys them alike draws the same noise; None adds no noise (an attacker's
    simulation).  Differentiable in ``sums``.
    """
    clients = valid.dim() == 2
    count = valid.sum(-1).clamp(min=1).to(next(iter(sums.values())).dtype) if denominator is None else \
        torch.as_tensor(denominator)  # (...,)
    sigmas = sigma if isinstance(sigma, (list, tuple)) else [sigma] * (len(generators) if generators else 1)
    out = {}
    for name, summed in sums.items():
        if generators is not None:
            if clients:
                noise = torch.stack([sample(gen, s * clip, summed[n]) for n, (gen, s) in
                                     enumerate(zip(generators, sigmas))])
            else:
                noise = sample(generators[0], sigmas[0] * clip, summed)
            summed = summed + noise
        shape = summed.shape[1:] if clients else summed.shape
        out[name] = summed / count.to(summed).view(*count.shape, *[1] * len(shape))
    return out


def private_gradient(per_example: dict[str, torch.Tensor], valid: torch.Tensor, clip: float,
                     sigma: float | list[float], generators: list[torch.Generator] | None,
                     denominator: float | list[float] | None = None,
                     sample: Callable = keyed_noise) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient from per-sample gradients: :func:`clip_and_sum`, then :func:`noised_mean`."""
    return noised_mean(clip_and_sum(per_example, valid, clip), valid, clip, sigma, generators, denominator, sample)


def dp_sgd_step(model: torch.nn.Module, params: list[torch.Tensor], optimizer: SGD,
                x: torch.Tensor, y: torch.Tensor, clip: float, sigma: float, generator: torch.Generator,
                denominator: float | None = None, sample: Callable = keyed_noise) -> None:
    """One DP-SGD step on ``params`` the authors' way, the per-client oracle of the lockstep engines' step:
    a backward pass per sample, then :func:`private_gradient` (each gradient clipped to ``clip``, their sum plus
    N(0, (sigma clip)^2) noise from ``generator`` by ``sample``, tensor by tensor, divided by the batch size or
    ``denominator``: the expected batch size under Poisson sampling; the batch may then be empty), then the
    optimizer's step."""
    per_sample = [torch.autograd.grad(torch.nn.functional.cross_entropy(model(xi[None]), yi[None]), params)
                  for xi, yi in zip(x, y)]
    per_example = {i: torch.stack([g[i] for g in per_sample]) if per_sample else p.new_zeros(0, *p.shape)
                   for i, p in enumerate(params)}
    grads = private_gradient(per_example, torch.ones(len(y), dtype=torch.bool, device=params[0].device), clip,
                             sigma, [generator], denominator, sample)
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


@dataclass
class ClientNoise:
    """What one client's DP-SGD steps need: its noise multiplier and where its noise comes from."""

    client: int
    sigma: float
    source: NoiseSource

    def generator(self, round_idx: int, epoch: int, step: int, device: torch.device) -> torch.Generator:
        return self.source.generator(self.client, round_idx, epoch, step, device)

    def sample(self, generator: torch.Generator, std, like: torch.Tensor) -> torch.Tensor:
        return self.source.sample(generator, std, like)


def dp_steps(num_train: int, batch_size: int, rounds: int, local_epochs: int) -> int:
    """The DP-SGD steps a client with ``num_train`` samples takes over the run: ceil(n / B) per epoch."""
    return rounds * local_epochs * math.ceil(num_train / batch_size)


def sample_rate(num_train: int, batch_size: int) -> float:
    """A client's sampling rate min(B, n) / n (shuffled batches of B, or Poisson batches of expected size B)."""
    return min(batch_size, num_train) / num_train


class ClientPrivacy:
    """Every client's noise multiplier, privacy accountant and noise source, as the DP-SGD methods keep them.

    A client with n samples and batch size B samples at rate min(B, n) / n and takes ceil(n / B) noisy steps
    per epoch (shuffled or Poisson-sampled alike); its sigma is what spends (epsilon, delta) over the
    ``rounds * local_epochs * ceil(n / B)`` steps it takes in the whole run, so every client's final epsilon
    is at most the target whatever n and B are.  Epsilon is nominal with shuffled batches (the accountant
    assumes Poisson sampling) and holds with ``--poisson``.
    """

    def __init__(self, sizes: list[int], batch_size: int, epsilon: float, delta: float, rounds: int,
                 local_epochs: int, noise: NoiseSource | None = None, first_client: int = 0):
        self.delta, self.local_epochs, self.sizes = delta, local_epochs, list(sizes)
        self.steps_per_epoch = [math.ceil(n / batch_size) for n in sizes]
        plans = [(sample_rate(n, batch_size), dp_steps(n, batch_size, rounds, local_epochs)) for n in sizes]
        by_plan = {plan: noise_multiplier(epsilon, delta, *plan) for plan in set(plans)}
        self.sigmas = [by_plan[plan] for plan in plans]
        self.accountants = [PrivacyAccountant(sigma, rate) for sigma, (rate, _) in zip(self.sigmas, plans)]
        self.noise = noise or NoiseSource("secure", 0)
        self.first_client = first_client  # the client id of sizes[0] (a Flower node holds one client)

    @classmethod
    def from_config(cls, sizes: list[int], cfg, first_client: int = 0) -> "ClientPrivacy":
        """Clients of ``sizes`` samples under a run's settings (batch size, budget, rounds, epochs, noise)."""
        return cls(sizes, cfg.batch_size, cfg.epsilon, cfg.delta, cfg.rounds, cfg.local_epochs,
                   NoiseSource(cfg.dp_noise, cfg.seed), first_client)

    def client(self, index: int) -> ClientNoise:
        """What client ``index`` (of this object's clients) needs for its DP-SGD steps."""
        return ClientNoise(self.first_client + index, self.sigmas[index], self.noise)

    def record_round(self, cids: list[int]) -> list[float]:
        """Account for one round of local training of ``cids``; returns each one's epsilon spent so far."""
        for c in cids:
            self.accountants[c].step(self.steps_per_epoch[c] * self.local_epochs)
        return [self.accountants[c].epsilon(self.delta) for c in cids]

    def epsilons(self) -> list[float]:
        """Every client's epsilon spent so far (cached by step count: clients of one size share it)."""
        return [a.epsilon(self.delta) for a in self.accountants]

    def state_dict(self) -> dict:
        return {"accountants": [a.state_dict() for a in self.accountants]}

    def load_state_dict(self, state: dict) -> None:
        for accountant, saved in zip(self.accountants, state["accountants"]):
            accountant.load_state_dict(saved)
