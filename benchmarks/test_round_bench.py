"""Seconds per HyperFL round at paper scale: reference engine vs batched engine, in one run.

Fashion-MNIST model, 20 clients x 600 samples, 1 classifier + 5 hypernetwork
epochs, batch 50 (evaluation of local and global accuracy included, as in a
real round).  The reference round takes minutes on a CPU, so it runs once.
On a GPU the batched engine also runs under the static dispatch table, with every op forced to Triton or
to torch, and with ``--cuda-graphs`` (each phase's steps replayed from a CUDA graph), after one untimed
round (measurement, autotuning, capture).
"""
import pytest

from hyperfl_fast import ops
from hyperfl_fast.config import Config
from hyperfl_fast.runner import prepare

from conftest import DEVICE, timed


ROUND_CASES = {  # engine, --dispatch, --ops-path, --cuda-graphs
    "reference": ("reference", "measured", None, False),
    "batched": ("batched", "measured", None, False),
    "batched-static": ("batched", "static", None, False),
    "batched-triton": ("batched", "measured", "triton", False),
    "batched-torch": ("batched", "measured", "torch", False),
    "batched-cuda-graphs": ("batched", "measured", None, True),
}
GPU_ONLY = {"batched-static", "batched-triton", "batched-torch", "batched-cuda-graphs"}  # the same as batched on a CPU


@pytest.mark.benchmark(group="round")
@pytest.mark.parametrize("case", list(ROUND_CASES))
def test_hyperfl_round(benchmark, case):
    if case in GPU_ONLY and DEVICE.type != "cuda":
        pytest.skip("dispatch modes and CUDA graphs differ on a GPU only")
    engine, dispatch, ops_path, cuda_graphs = ROUND_CASES[case]
    cfg = Config(engine=engine, device=DEVICE.type, cuda_graphs=cuda_graphs, dispatch=dispatch, ops_path=ops_path)
    ops.DISPATCH.set_mode(dispatch)
    ops.DISPATCH.set_overrides(ops_path)
    federation, _ = prepare(cfg)
    rounds = iter(range(100))
    if engine == "batched":
        federation.run_round(next(rounds), list(range(cfg.clients)))  # measured dispatch, autotuning, capture
    timed(benchmark, lambda: federation.run_round(next(rounds), list(range(cfg.clients))),
          rounds=1 if engine == "reference" else 3, engine=engine, clients=cfg.clients, case=case)
    ops.DISPATCH.set_mode(None)
    ops.DISPATCH.set_overrides(None)
