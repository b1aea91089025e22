"""Reference-path cost of one HyperFL hypernetwork-phase step (Fashion-MNIST model, batch 50).

This is the per-step unit the reference engine repeats 20 clients x 12 batches
x 5 epochs per paper-scale round; the fast paths are measured against it.
"""

import pytest
import torch

from hyperfl_fast.config import Config
from hyperfl_fast.models import GeneratedCNN, HyperNetwork, cnn_spec
from hyperfl_fast.methods.base import sgd
from hyperfl_fast.methods.hyperfl import hypernet_step

@pytest.mark.benchmark(group="hypernet-step")
def test_reference_hypernet_step(benchmark):
    torch.manual_seed(0)
    spec = cnn_spec(1, 10)
    model = GeneratedCNN(spec, HyperNetwork(64, 128, spec.num_feature_params), torch.nn.Parameter(torch.randn(64)),
                         torch.nn.Linear(spec.hidden, 10))
    cfg = Config()
    optimizer = sgd([{"params": model.hypernet.parameters()}, {"params": [model.embedding]}], cfg, cfg.lr)
    x, y = torch.randn(50, 1, 28, 28), torch.randint(0, 10, (50,))
    benchmark.extra_info["device"] = "cpu"
    benchmark(hypernet_step, model, optimizer, x, y, cfg.grad_clip)
