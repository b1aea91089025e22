"""Seconds per HyperFL round at paper scale: reference engine vs batched engine, in one run.

Fashion-MNIST model, 20 clients x 600 samples, 1 classifier + 5 hypernetwork
epochs, batch 50 (evaluation of local and global accuracy included, as in a
real round).  The reference round takes minutes on a CPU, so it runs once.
On a GPU the batched engine also runs with ``--cuda-graphs`` (each phase's
steps replayed from a CUDA graph).
"""
import pytest

from hyperfl_fast.config import Config
from hyperfl_fast.runner import prepare

from conftest import DEVICE, timed


@pytest.mark.benchmark(group="round")
@pytest.mark.parametrize("engine,cuda_graphs", [("reference", False), ("batched", False), ("batched", True)],
                         ids=["reference", "batched", "batched-cuda-graphs"])
def test_hyperfl_round(benchmark, engine, cuda_graphs):
    if cuda_graphs and DEVICE.type != "cuda":
        pytest.skip("--cuda-graphs needs a GPU")
    cfg = Config(engine=engine, device=DEVICE.type, cuda_graphs=cuda_graphs)
    federation, _ = prepare(cfg)
    rounds = iter(range(100))
    timed(benchmark, lambda: federation.run_round(next(rounds), list(range(cfg.clients))),
          rounds=1 if engine == "reference" else 3, engine=engine, clients=cfg.clients, cuda_graphs=cuda_graphs)
