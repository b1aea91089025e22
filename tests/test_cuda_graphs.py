"""``--cuda-graphs``: the HyperFL lockstep step on static buffers (and, on a GPU, replayed from a CUDA graph)
computes what the reference engine computes; a capture that fails falls back to eager steps."""
import pytest
import torch

import hyperfl_fast.lockstep.graphs as graphs
import hyperfl_fast.methods.hyperfl as hyperfl
from hyperfl_fast.lockstep.data import Batch
from hyperfl_fast.config import Config, ConfigError

from test_engine_equivalence import assert_same_results, assert_same_states, federation, run_both


class CountingStepGraph(graphs.StepGraph):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountingStepGraph.made.append(self)


@pytest.fixture
def step_graphs(monkeypatch):
    CountingStepGraph.made = []
    monkeypatch.setattr(hyperfl, "StepGraph", CountingStepGraph)
    return CountingStepGraph.made


def hyperfl_equals_reference(device, step_graphs):
    cfg = Config(dataset="synthetic", method="hyperfl", clients=4, frac=0.75, local_epochs=2, batch_size=20,
                 device=device.type, seed=3, cuda_graphs=True)
    clients = federation(1, [60, 47, 33, 60])
    for client in clients:
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(client, name, getattr(client, name).to(device))
    (ref, batched), history = run_both(cfg, clients, rounds=2, device=device)
    assert_same_results(history)
    assert_same_states(ref, batched, 4)
    # one classifier-phase and one hypernetwork-phase graph for the whole process (persistent buffers), each
    # round 3 and 2 x 3 steps
    assert [g.calls for g in step_graphs] == [6, 12]
    return step_graphs


def test_static_steps_equal_the_reference(float64, step_graphs):
    """On the CPU the static-shape steps run eagerly on the static buffers: the data flow a graph replays."""
    made = hyperfl_equals_reference(torch.device("cpu"), step_graphs)
    assert all(g.graph is None and not g.capture for g in made)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (gpu_session.sh runs this)")
def test_captured_steps_equal_the_reference_on_cuda(float64, step_graphs):
    made = hyperfl_equals_reference(torch.device("cuda"), step_graphs)
    assert all(g.graph is not None for g in made)  # every phase past its warm-up steps ran from its graph
    assert [g.captures for g in made] == [1, 1]  # recorded once, replayed in both rounds


def test_a_failed_capture_runs_the_steps_eagerly(monkeypatch):
    def no_graph():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", no_graph)
    seen = []
    step = graphs.StepGraph(lambda batch: seen.append(batch.x.clone()), capture=True)
    step.calls = graphs.WARMUP_STEPS  # past the warm-up: the next call captures
    batches = [Batch(torch.randn(2, 3, 1, 4, 4), torch.randint(0, 10, (2, 3)), torch.ones(2, 3, dtype=torch.bool),
                     torch.tensor([True, False])) for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="--cuda-graphs: capture failed .*operation not permitted"):
        step(batches[0])
    step(batches[1])  # eager from now on, without another warning
    assert not step.capture and step.graph is None
    assert len(seen) == 2 and all(torch.equal(s, b.x) for s, b in zip(seen, batches))


def test_a_triton_error_at_capture_also_falls_back(monkeypatch):
    from triton.runtime.errors import OutOfResources

    def no_graph():
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", no_graph)
    step = graphs.StepGraph(lambda batch: None, capture=True)
    step.calls = graphs.WARMUP_STEPS
    batch = Batch(torch.randn(1, 2, 1, 4, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                  torch.tensor([True]))
    with pytest.warns(RuntimeWarning, match="capture failed .*shared memory"):
        step(batch)
    assert not step.capture


def test_a_step_past_the_rounds_capacity_is_refused():
    """A replayed step advances the heads' slot on the device; the host bounds the replays per round."""
    step = graphs.StepGraph(lambda batch: None, capture=False, limit=2)
    batch = Batch(torch.randn(1, 2, 1, 4, 4), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                  torch.tensor([True]))
    step(batch), step(batch)
    with pytest.raises(RuntimeError, match="step 3 of a round that holds 2"):
        step(batch)
    step.new_round()
    step(batch)


def test_the_flag_is_checked_before_any_work():
    with pytest.raises(ConfigError, match="--cuda-graphs: only hyperfl's batched engine captures its steps, not "
                                          "fedavg on the batched engine"):
        Config(method="fedavg", cuda_graphs=True, device="cpu").validate()
    with pytest.raises(ConfigError, match="--cuda-graphs: only hyperfl's batched engine .* reference engine"):
        Config(engine="reference", cuda_graphs=True, device="cpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--cuda-graphs needs a CUDA device \(--device cuda\)"):
            Config(cuda_graphs=True).validate()
