"""A batched round makes no host round trips inside local training: a small fixed number per round, not per step.

Counted on the CPU with a TorchDispatchMode: the ops that force a GPU to sync
with the host (reading a scalar, data-dependent output sizes) plus
``Tensor.tolist`` calls.  On a GPU each of them would stall the stream.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hyperfl_fast.lockstep.data as batched
from hyperfl_fast import ops
from hyperfl_fast.engines import build_batched
from hyperfl_fast.config import Config
from hyperfl_fast.models import cnn_spec

from conftest import small_federation

SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.masked_select",
            "aten.equal", "aten.allclose", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
            "aten.repeat_interleave"}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def syncs_in_one_round(method, local_epochs, monkeypatch, dataset="synthetic", cuda_graphs=False):
    in_channels = 3 if dataset == "synthetic-rgb" else 1
    _, clients = small_federation(in_channels, clients=3, local_size=40)
    cfg = Config(dataset=dataset, method=method, clients=3, local_epochs=local_epochs, batch_size=15,
                 device="cpu", cuda_graphs=cuda_graphs)
    engine = build_batched(cnn_spec(in_channels, 10), clients, cfg, torch.device("cpu"))
    real_tolist = torch.Tensor.tolist
    counter = CountSyncs()
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: counter.counts.update(["Tensor.tolist"]) or real_tolist(t))
    with counter:
        engine.run_round(0, [0, 1, 2])
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    return counter.counts


@pytest.mark.parametrize("method,dataset,cuda_graphs", [
    ("hyperfl", "synthetic", False), ("hyperfl", "synthetic-rgb", False), ("hyperfl", "synthetic", True),
    ("fedavg", "synthetic", False), ("local", "synthetic", False)])
def test_round_syncs_are_few_and_do_not_grow_with_steps(method, dataset, cuda_graphs, monkeypatch):
    short = syncs_in_one_round(method, 1, monkeypatch, dataset, cuda_graphs)
    long = syncs_in_one_round(method, 3, monkeypatch, dataset, cuda_graphs)  # 3x the steps
    assert long == short
    assert sum(short.values()) <= 1, short  # the round's figures, read to the host in one copy


def test_the_counter_sees_a_sync(monkeypatch):
    counter = CountSyncs()
    with counter:
        float(torch.ones(2).sum())
        torch.ones(3).nonzero()
    assert counter.counts == {"aten._local_scalar_dense": 1, "aten.nonzero": 1}


def test_every_random_draw_happens_before_local_training(monkeypatch):
    events = []
    real_generator, real_step = batched.make_generator, ops.classifier_sgd_step
    monkeypatch.setattr(batched, "make_generator", lambda *k: events.append("draw") or real_generator(*k))
    monkeypatch.setattr(ops, "classifier_sgd_step", lambda *a: events.append("step") or real_step(*a))
    _, clients = small_federation(3, clients=3, local_size=40)
    cfg = Config(dataset="synthetic-rgb", clients=3, local_epochs=2, batch_size=15, device="cpu")
    build_batched(cnn_spec(3, 10), clients, cfg, torch.device("cpu")).run_round(0, [0, 1, 2])
    assert events.count("draw") == 3 * 3  # clients x (classifier epoch + 2 epochs)
    assert events.index("step") > max(i for i, e in enumerate(events) if e == "draw")
