"""pFedHN and pFedHN-PC: the server's update is pFedHN's, and the clients upload only delta theta."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hyperfl_fast.config import Config
from hyperfl_fast.engines import build_batched, build_reference
from hyperfl_fast.methods.pfedhn import SETTINGS
from hyperfl_fast.models import TargetCNN
from hyperfl_fast.runner import run

from conftest import tiny_model


def pfedhn_hypernetwork(server):
    """pFedHN's CNNHyper as modules (its code's shape: Linear(E, H), 3 x [ReLU, Linear(H, H)], then the heads with
    no activation between), loaded with the server's tensors."""
    h = server["fc.weight"].shape[0]
    mlp = torch.nn.Sequential(torch.nn.Linear(server["embeddings"].shape[1], h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                              torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, h))
    hypernet = torch.nn.Sequential(mlp, torch.nn.Linear(h, server["heads.bias"].numel()))
    names = ["trunk.0", "trunk.1", "trunk.2", "fc"]
    hypernet.load_state_dict({**{f"0.{2 * i}.{p}": server[f"{n}.{p}"] for i, n in enumerate(names)
                                 for p in ("weight", "bias")},
                              "1.weight": server["heads.weight"], "1.bias": server["heads.bias"]})
    return hypernet


def pfedhn_by_hand(spec, cid, server, batches, classifier=None, server_lr=1e-2):
    """pFedHN's step for one client, written from its code with modules: the server's hypernetwork and
    nn.Embedding generate the client's CNN (pfedhn-pc: its feature extractor, the client's own ``classifier``
    beside it), the client takes SGD steps on it, delta theta = theta - theta~, the gradient of (psi, embeddings)
    is the vector-Jacobian product of delta theta, clipped, and one server SGD step with momentum follows.
    Returns the new server tensors."""
    hypernet = pfedhn_hypernetwork(server)
    table = torch.nn.Embedding.from_pretrained(server["embeddings"].clone(), freeze=False)
    theta = hypernet(table(torch.tensor(cid)))  # (P,)
    cnn = TargetCNN(spec)
    shapes = spec.cnn_shapes() if classifier is None else spec.feature_shapes()
    names, sizes = [n for n, _ in shapes], [math.prod(shape) for _, shape in shapes]
    start = {k: piece.detach().clone().view(shape) for (k, shape), piece in zip(shapes, theta.split(sizes))}
    weights = {k: torch.nn.Parameter(t.clone()) for k, t in start.items()}
    head = {k: torch.nn.Parameter(t.clone()) for k, t in (classifier or {}).items()}
    inner = [torch.optim.SGD(list(group.values()), lr=SETTINGS.client_lr, momentum=SETTINGS.client_momentum,
                             weight_decay=SETTINGS.client_weight_decay) for group in (weights, head) if group]
    for x, y in batches:
        for opt in inner:
            opt.zero_grad()
        F.cross_entropy(functional_call(cnn, {**weights, **head}, (x,)), y).backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), SETTINGS.grad_clip)
        for opt in inner:
            opt.step()
    delta = torch.cat([(start[k] - weights[k].detach()).flatten() for k in names])
    params = list(hypernet.parameters()) + [table.weight]
    grads = torch.autograd.grad(theta, params, delta)
    server_opt = torch.optim.SGD(params, lr=server_lr, momentum=SETTINGS.server_momentum,
                                 weight_decay=SETTINGS.server_weight_decay)
    for p, g in zip(params, grads):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, SETTINGS.grad_clip)
    server_opt.step()
    state = hypernet.state_dict()
    names = ["trunk.0", "trunk.1", "trunk.2", "fc"]
    return {**{f"{n}.{p}": state[f"0.{2 * i}.{p}"] for i, n in enumerate(names) for p in ("weight", "bias")},
            "heads.weight": state["1.weight"], "heads.bias": state["1.bias"], "embeddings": table.weight.detach()}


@pytest.mark.parametrize("method,server_lr", [("pfedhn", 1e-2), ("pfedhn-pc", 5e-2)])  # each trainer.py's --lr
@pytest.mark.parametrize("build", [build_reference, build_batched], ids=["reference", "lockstep"])
def test_the_server_update_is_pfedhns(build, method, server_lr, float64):
    spec, clients = tiny_model(clients=3, local_size=30, test_size=8)
    for c in clients:
        c.train_x, c.test_x = c.train_x.double(), c.test_x.double()
    cfg = Config(dataset="synthetic", method=method, clients=3, local_epochs=2, batch_size=10, device="cpu",
                 seed=5)
    engine = build(spec, clients, cfg, torch.device("cpu"))
    before = {k: t.clone() for k, t in engine.global_state().items()}
    assert before["embeddings"].shape == (3, 1) and before["fc.weight"].shape == (100, 100)  # 1 + N/4; 100 wide
    classifier = ({k: engine.client_state(1)[k].clone() for k in ("fc2.weight", "fc2.bias")}
                  if method == "pfedhn-pc" else None)
    engine.run_round(0, [1])
    batches = [b for epoch in range(2) for b in clients[1].batches(10, cfg.seed, 0, epoch)]
    want = pfedhn_by_hand(spec, 1, before, batches, classifier, server_lr)
    got = engine.global_state()
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-9, atol=1e-12)
        assert not torch.equal(tensor, before[key])  # every server tensor moved (weight decay reaches all rows)
    torch.testing.assert_close(got["momentum.heads.weight"], (before["heads.weight"] - want["heads.weight"])
                               / server_lr, rtol=1e-9, atol=1e-12)  # the first step: w -= lr * buf


@pytest.mark.parametrize("method", ["pfedhn", "pfedhn-pc"])
@pytest.mark.parametrize("build", [build_reference, build_batched], ids=["reference", "lockstep"])
def test_a_round_steps_the_server_after_each_client(build, method, float64):
    """pFedHN's loop: a round of clients 1 then 2 is client 1's step, then client 2 trained from the state that
    step made (not from the round's first psi)."""
    spec, clients = tiny_model(clients=3, local_size=30, test_size=8)
    for c in clients:
        c.train_x, c.test_x = c.train_x.double(), c.test_x.double()
    cfg = Config(dataset="synthetic", method=method, clients=3, local_epochs=1, batch_size=10, device="cpu", seed=5)
    together, apart = (build(spec, clients, cfg, torch.device("cpu")) for _ in range(2))
    together.run_round(0, [1, 2])
    apart.run_round(0, [1])
    apart.run_round(0, [2])
    for key, tensor in apart.global_state().items():
        torch.testing.assert_close(together.global_state()[key], tensor, rtol=1e-9, atol=1e-12)


def test_pfedhn_pc_uploads_no_classifier(tiny_config):
    from hyperfl_fast.methods import get_method

    spec, clients = tiny_model(clients=2, local_size=20)
    method = get_method("pfedhn-pc")
    cfg = dataclasses.replace(tiny_config, method="pfedhn-pc", clients=2)
    server, privates = method.init_states(spec, 2, cfg, torch.device("cpu"))
    sent = method.send(spec, server, 0)
    assert list(sent) == [name for name, _ in spec.feature_shapes()]  # the feature extractor only
    update = method.client_update(spec, sent, privates[0], clients[0], cfg, 0)
    assert set(update.upload) == set(sent) and not any(k.startswith("fc2") for k in update.upload)
    assert set(update.private) == {"fc2.weight", "fc2.bias", "momentum.fc2.weight", "momentum.fc2.bias"}
    assert not torch.equal(update.private["fc2.weight"], privates[0]["fc2.weight"])  # it trained its classifier
    assert set(get_method("pfedhn").send(spec, get_method("pfedhn").init_states(spec, 2, cfg, "cpu")[0], 1)) == \
        {name for name, _ in spec.cnn_shapes()}  # pfedhn: the whole CNN


@pytest.mark.parametrize("method", ["pfedhn", "pfedhn-pc"])
def test_pfedhn_learns(method, tiny_config, tmp_path):
    """One server step per client and round: the generated models need a few more rounds than FedAvg's."""
    cfg = dataclasses.replace(tiny_config, method=method, rounds=8, local_epochs=2, output_dir=str(tmp_path))
    result = run(cfg, log=lambda _: None)
    assert result.rounds[-1]["train_loss"] < result.rounds[0]["train_loss"]
    assert result.rounds[-1]["headline_acc"] > 40.0  # chance is 10%
