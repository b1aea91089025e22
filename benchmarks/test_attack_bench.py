"""IG attack iterations per second, FedAvg and HyperFL (variant a), on the CPU and, when present, the GPU.

The Fashion-MNIST target CNN and one 28x28 image (synthetic pixels: the
attack's cost does not depend on them); one timed call is 5 IG iterations.
"""
import pytest
import torch
from torch import nn

from hyperfl_fast.data import make_synthetic
from hyperfl_fast.models import HyperNetwork, TargetCNN, cnn_spec
from hyperfl_fast.privacy import AttackBudget, LocalTraining, fedavg_scenario, hyperfl_scenario, reconstruct

from conftest import timed

ITERATIONS = 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.benchmark(group="attack")
@pytest.mark.parametrize("method", ["fedavg", "hyperfl-a"])
@pytest.mark.parametrize("device", DEVICES)
def test_ig_iterations(benchmark, method, device):
    data = make_synthetic(1)
    spec = cnn_spec(1, 10)
    x, y = data.normalize(data.train_images[:1]).to(device), data.train_labels[:1].to(device)
    torch.manual_seed(0)
    if method == "fedavg":
        scenario = fedavg_scenario(TargetCNN(spec).to(device), x, y, LocalTraining(1))
    else:
        scenario = hyperfl_scenario(spec, HyperNetwork(64, 128, spec.num_feature_params).to(device),
                                    torch.randn(64, device=device), nn.Linear(128, 10).to(device), x, y,
                                    LocalTraining(1, clip=50.0), "a")
    bounds = (torch.tensor(-2.0).view(1, 1, 1), torch.tensor(2.0).view(1, 1, 1))

    def attack():
        reconstruct(scenario.simulate, scenario.observed, tuple(x.shape), 10, bounds, scenario.labels,
                    scenario.unknowns, "ig", AttackBudget(iterations=ITERATIONS))
        if device == "cuda":
            torch.cuda.synchronize()

    median = timed(benchmark, attack, rounds=3, method=method, attack_device=device, iterations=ITERATIONS)
    benchmark.extra_info["iterations_per_s"] = round(ITERATIONS / median, 2)
