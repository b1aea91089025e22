"""Kernel launches per lockstep HyperFL step: at most 30 on the Triton path (the torch path makes about 150).

Counted on the CPU: every Triton launch (:func:`hyperfl_fast.kernels.launch.launch_count`; the kernels run in
the interpreter) plus every ATen op that would launch a kernel on a GPU (views, empty allocations and detaches
launch none), including the batch gathers and the autograd engine's own ops.  The model is the paper's
structure (two or three convs, fc1, classifier) at tiny sizes, with the weight gradients' chunked reduction
forced on as at paper scale, so the count is the paper-scale count.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hyperfl_fast.lockstep.data import RoundSchedule
from hyperfl_fast.config import Config
from hyperfl_fast.engines import build_batched
from hyperfl_fast.kernels import conv, launch

from conftest import tiny_model

FREE = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
        "aten.detach", "aten.lift_fresh"}
TARGET = 30


class CountLaunches(TorchDispatchMode):
    """ATen ops that launch a kernel (outside Triton launches, whose interpreter handles tensors itself)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not launch.launching() and not func.is_view and name not in FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def tiny_engine(in_channels: int, path: str, monkeypatch):
    monkeypatch.setenv("HYPERFL_OPS_PATH", path)
    monkeypatch.setattr(conv, "ROWS_PER_SPLIT", 8)  # several dW chunks, as at paper scale
    spec, clients = tiny_model(in_channels)
    cfg = Config(dataset="synthetic" if in_channels == 1 else "synthetic-rgb", clients=2, local_epochs=1,
                 batch_size=3, device="cpu", embed_dim=8, hidden_dim=16)
    engine = build_batched(spec, clients, cfg, torch.device("cpu"))
    engine.round_buffers(2)  # the round's buffers and steps
    return engine, cfg


def counted(fn) -> tuple[int, collections.Counter]:
    counter, before = CountLaunches(), launch.launch_count()
    with counter:
        fn()
    return launch.launch_count() - before + sum(counter.ops.values()), counter.ops


def launches_per_step(engine, cfg) -> dict[str, tuple[int, collections.Counter]]:
    """{phase: (launches, ATen ops by name)} of a step of each phase, its batch included, and of the epoch's
    gathering of its samples (once per epoch, for all its steps)."""
    rb = engine.buffers
    schedule = RoundSchedule(engine.data, [0, 1], cfg.batch_size, cfg.seed, 1, range(2))
    rb.hypernet.start({k: t.detach() for k, t in engine.hypernet.state_dict().items()})
    counts = {}
    for phase, step, epoch in (("classifier", rb.classifier_step, 0), ("hypernetwork", rb.hypernet_step, 1)):
        batches = schedule.batches(epoch)
        first = []
        counts[f"{phase} epoch gather"] = counted(lambda: first.append(next(batches)))
        step(first[0])
        counts[phase] = counted(lambda: step(next(batches)))  # a step past the first: view + kernels
    return counts


@pytest.mark.parametrize("in_channels", [1, 3], ids=["fmnist-model", "cifar-model"])
def test_a_triton_step_makes_at_most_30_launches(in_channels, monkeypatch, capsys):
    engine, cfg = tiny_engine(in_channels, "triton", monkeypatch)
    counts = launches_per_step(engine, cfg)
    with capsys.disabled():
        print(f"\n  launches per step ({'fmnist' if in_channels == 1 else 'cifar'} model, triton): "
              + ", ".join(f"{phase} {n}" for phase, (n, _) in counts.items()))
    for phase in ("classifier", "hypernetwork"):
        n, aten_ops = counts[phase]
        assert n <= TARGET, f"{phase}: {n} launches ({dict(aten_ops)})"


def test_the_torch_path_is_counted_the_same_way(monkeypatch):
    """The counter itself: the torch path's step is a long chain of ATen ops (the 'about 150' of issue 17)."""
    engine, cfg = tiny_engine(1, "torch", monkeypatch)
    counts = launches_per_step(engine, cfg)
    assert counts["hypernetwork"][0] > 100 and counts["hypernetwork"][1]["aten.convolution_backward"] == 2
