"""The lockstep hypernetwork (every client's psi_n, factored heads, hand-written backward, clipping, SGD) equals
one ordinary HyperNetwork module per client trained with autograd, ``clip_grad_norm_`` and ``torch.optim.SGD``.

Run on every ops path: torch, and the Triton kernels (interpreted on the CPU).
"""
import pytest
import torch

from hyperfl_fast.lockstep.hypernet import LockstepHypernetwork
from hyperfl_fast.models import HyperNetwork

from conftest import DEVICE

N, E, H, P, LR, MOMENTUM, WD, CLIP = 3, 5, 12, 70, 0.05, 0.5, 5e-4, 2.0


def reference_clients(psi, embeddings):
    """One HyperNetwork + embedding + SGD per client, as the reference engine trains them."""
    clients = []
    for v in embeddings:
        net = HyperNetwork(E, H, P).to(DEVICE)
        net.load_state_dict(psi)
        emb = torch.nn.Parameter(v.clone())
        opt = torch.optim.SGD([{"params": net.parameters()}, {"params": [emb]}], lr=LR, momentum=MOMENTUM,
                              weight_decay=WD)
        clients.append((net, emb, opt))
    return clients


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("static", [False, True], ids=["steps-so-far", "static-shapes"])
def test_lockstep_hypernetwork_equals_per_client_autograd_and_sgd(path, static, monkeypatch):
    monkeypatch.setenv("HYPERFL_OPS_PATH", path)
    torch.manual_seed(0)
    psi = {k: t.to(DEVICE) for k, t in HyperNetwork(E, H, P).state_dict().items()}
    embeddings = torch.randn(N, E, device=DEVICE)
    clients = reference_clients(psi, embeddings)
    lockstep = LockstepHypernetwork(N, E, H, P, capacity=5, device=DEVICE, dtype=torch.float32, static=static)
    lockstep.start(psi)
    emb = embeddings.clone()
    for step in range(4):
        active = torch.tensor([True, step != 1, step < 2], device=DEVICE)
        # client 0's gradients stay under the clip, the last client's far above it
        d_theta = torch.randn(N, P, device=DEVICE) * torch.tensor([0.01, 0.3, 5.0], device=DEVICE)[:, None]
        losses = torch.rand(N, device=DEVICE)
        theta, hidden = lockstep.generate(emb)
        for i, (net, v, opt) in enumerate(clients):
            torch.testing.assert_close(theta[i], net(v).detach(), atol=1e-5, rtol=1e-4)
            if active[i]:
                opt.zero_grad()
                net(v).backward(d_theta[i])
                torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
                torch.nn.utils.clip_grad_norm_([v], CLIP)
                opt.step()
        lockstep.sgd_step(d_theta, hidden, emb, losses, active, LR, MOMENTUM, WD, CLIP)
        assert ((lockstep.coef < 1).any() and (lockstep.coef == 1).any()).item()
    for i, (net, v, _) in enumerate(clients):
        torch.testing.assert_close(emb[i], v.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lockstep.fc_w[i], net.fc.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lockstep.fc_b[i], net.fc.bias.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lockstep.head_b[i], net.heads.bias.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lockstep.materialize(i), net.heads.weight.detach(), atol=1e-5, rtol=1e-4)
    weights = torch.tensor([0.2, 0.3, 0.5], device=DEVICE)
    averaged = lockstep.weighted_sum(weights)
    for name, tensor in averaged.items():  # = the weighted mean of the materialised uploads
        want = sum(w * dict(net.named_parameters())[name].detach() for w, (net, _, _) in zip(weights, clients))
        torch.testing.assert_close(tensor, want, atol=1e-5, rtol=1e-4)
    assert lockstep.loss_count.tolist() == [4.0, 3.0, 2.0]  # steps each client took


def test_a_step_past_the_capacity_is_refused():
    lockstep = LockstepHypernetwork(1, 2, 3, 4, capacity=1, device=torch.device("cpu"), dtype=torch.float32)
    lockstep.start({k: t for k, t in HyperNetwork(2, 3, 4).state_dict().items()})
    emb, active = torch.randn(1, 2), torch.tensor([True])
    _, hidden = lockstep.generate(emb)
    lockstep.sgd_step(torch.randn(1, 4), hidden, emb, torch.rand(1), active, LR, MOMENTUM, WD, CLIP)
    with pytest.raises(RuntimeError, match="step 2 exceeds the round's capacity of 1 steps"):
        lockstep.sgd_step(torch.randn(1, 4), hidden, emb, torch.rand(1), active, LR, MOMENTUM, WD, CLIP)
