"""DP-SGD building blocks: per-example clipping and noise against an explicit loop, and Opacus' accountant."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperfl_fast.dp import ALPHAS, PrivacyAccountant, noise_multiplier, per_example_grads, private_gradient
from hyperfl_fast.federation import make_generator


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.LeakyReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def loop_dp_step(model, x, y, clip, sigma, gen):
    """The authors' way: B backward passes, clip each sample's gradient, sum, add noise, divide by B."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for xi, yi in zip(x, y):
        model.zero_grad()
        F.cross_entropy(model(xi[None]), yi[None]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        scale = min(1.0, clip / (norm.item() + 1e-6))
        for k, p in params.items():
            total[k] += scale * p.grad
    return {k: (t + sigma * clip * torch.randn(t.shape, generator=gen)) / len(y) for k, t in total.items()}


def test_private_gradient_equals_a_loop_of_clipped_per_sample_gradients():
    model = small_model()
    x, y = torch.randn(7, 1, 8, 8), torch.randint(0, 5, (7,))
    clip, sigma = 0.04, 1.3  # the authors' clip: every sample's gradient is clipped
    expected = loop_dp_step(model, x, y, clip, sigma, make_generator(1, 2, 3))
    params = {k: p.detach() for k, p in model.named_parameters()}
    grads = per_example_grads(model, params, F.cross_entropy, x, y)
    assert {k: tuple(g.shape) for k, g in grads.items()} == {k: (7, *p.shape) for k, p in params.items()}
    got = private_gradient(grads, torch.ones(7, dtype=torch.bool), clip, sigma, [make_generator(1, 2, 3)])
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)


def test_large_clip_leaves_gradients_unclipped_and_padding_is_ignored():
    model = small_model()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 5, (5,))
    params = {k: p.detach() for k, p in model.named_parameters()}
    grads = per_example_grads(model, params, F.cross_entropy, x, y)
    valid = torch.tensor([True, True, True, False, False])
    got = private_gradient(grads, valid, clip=1e9, sigma=0.0, generators=[torch.Generator()])
    model.zero_grad()
    F.cross_entropy(model(x[:3]), y[:3]).backward()  # the mean over the 3 real rows
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-7)


def test_client_dimension_equals_one_client_at_a_time():
    model = small_model()
    n, b = 3, 4
    stacked = {k: torch.stack([p.detach() + 0.1 * i for i in range(n)]) for k, p in model.named_parameters()}
    x, y = torch.randn(n, b, 1, 8, 8), torch.randint(0, 5, (n, b))
    valid = torch.ones(n, b, dtype=torch.bool)
    valid[2, 3] = False  # a short last batch for client 2
    got = private_gradient(per_example_grads(model, stacked, F.cross_entropy, x, y, clients=True), valid, 0.5, 0.7,
                           [make_generator(0, 0, c, 9) for c in range(n)])
    for c in range(n):
        params = {k: t[c] for k, t in stacked.items()}
        rows = valid[c]
        one = private_gradient(per_example_grads(model, params, F.cross_entropy, x[c][rows], y[c][rows]),
                               torch.ones(int(rows.sum()), dtype=torch.bool), 0.5, 0.7, [make_generator(0, 0, c, 9)])
        for k in one:
            torch.testing.assert_close(got[k][c], one[k], rtol=1e-5, atol=1e-6)


def test_accountant_matches_opacus_directly():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    rate, steps = 50 / 600, 20 * 12  # 20 epochs of 12 steps
    sigma = noise_multiplier(4.0, 1e-5, rate, steps)
    assert sigma == get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=rate, steps=steps,
                                         alphas=ALPHAS)
    ours, direct = PrivacyAccountant(sigma, rate), RDPAccountant()
    assert ours.epsilon(1e-5) == 0.0
    ours.step(steps)
    for _ in range(steps):
        direct.step(noise_multiplier=sigma, sample_rate=rate)
    assert ours.steps == steps
    assert ours.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5, alphas=ALPHAS), rel=1e-12)
    assert ours.epsilon(1e-5) <= direct.get_epsilon(1e-5)  # more orders: never a looser bound than the defaults
    assert 3.5 < ours.epsilon(1e-5) <= 4.0 + 0.05  # the target, within the search's tolerance
    restored = PrivacyAccountant(sigma, rate)
    restored.load_state_dict(ours.state_dict())
    assert restored.epsilon(1e-5) == ours.epsilon(1e-5)


@pytest.mark.parametrize("in_channels,trainable", [(1, "all"), (1, "representation"), (3, "all")])
def test_ghost_clipping_equals_the_per_sample_oracle(in_channels, trainable, float64):
    """The lockstep step's clipped sums (no per-sample gradient of the linear layers ever formed) equal
    clipping and summing vmap's per-sample gradients: for the whole CNN (DP-FedAvg) and for the representation
    with the classifier frozen (PPSGD, CENTAUR), with padded rows, clipped and unclipped samples."""
    from hyperfl_fast.lockstep.dp_step import clipped_gradient_sums
    from hyperfl_fast.models import CNNSpec, ConvSpec, TargetCNN

    from hyperfl_fast.dp import clip_and_sum

    convs = (ConvSpec(in_channels, 4, 3, 0), ConvSpec(4, 6, 3, 1)) + ((ConvSpec(6, 5, 3, 1),) if in_channels == 3
                                                                      else ())
    spec = CNNSpec(in_channels, 12, convs, 16, 10)
    n, b = 3, 5
    torch.manual_seed(4)
    cnn = TargetCNN(spec).double()
    params = {k: torch.stack([p.detach() * (1 + 0.3 * i) for i in range(n)]) for k, p in cnn.named_parameters()}
    x, y = torch.randn(n, b, in_channels, 12, 12), torch.randint(0, 10, (n, b))
    valid = torch.ones(n, b, dtype=torch.bool)
    valid[1, 3:] = False  # client 1: a short batch
    names = [k for k in params if trainable == "all" or not k.startswith("fc2")]
    clip = 3.0  # some samples' gradients clipped, some not (checked below)
    ghost = clipped_gradient_sums(spec, params, names, x, y, valid, clip)
    frozen = {k: t for k, t in params.items() if k not in names}
    with torch.device("meta"):
        template = TargetCNN(spec)
    per_example = per_example_grads(template, {k: params[k] for k in names}, F.cross_entropy, x, y, clients=True,
                                    frozen=frozen)
    oracle = clip_and_sum(per_example, valid, clip)
    assert list(ghost) == names
    for k in names:
        torch.testing.assert_close(ghost[k], oracle[k], rtol=1e-10, atol=1e-12)
    norms = sum(g.flatten(2).pow(2).sum(-1) for g in per_example.values()).sqrt()[valid]
    assert (norms > clip).any() and (norms < clip).any()
