"""The reference paths' SGD (``ops.sgd.SGD``, no ``torch.optim``: that import costs a Flower ClientApp seconds per
message) equals ``torch.optim.SGD`` bit for bit: parameter groups, momentum, weight decay, missing gradients,
buffers set from outside (pFedHN carries its momentum between rounds)."""
import pytest
import torch

from hyperfl_fast.ops.sgd import SGD


def run(optimizer_class, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(7, 3, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    c = torch.nn.Parameter(torch.randn(2, 2, generator=gen))
    optimizer = optimizer_class([{"params": [a, b]}, {"params": [c], "lr": 0.3, "weight_decay": 0.0}],
                                lr=0.05, momentum=0.5, weight_decay=5e-4)
    optimizer.state[c]["momentum_buffer"] = torch.randn(2, 2, generator=gen)  # carried in from a previous round
    for step in range(steps):
        optimizer.zero_grad()
        loss = (a.sin().sum() * b.cos().sum()) + (c ** 3).sum() * (step + 1)
        loss.backward()
        if step == 2:
            b.grad = None  # a parameter without a gradient this step keeps its value and its buffer
        optimizer.step()
    return [a.detach(), b.detach(), c.detach()] + [optimizer.state[p]["momentum_buffer"] for p in (a, b, c)]


@pytest.mark.parametrize("seed", [0, 1])
def test_sgd_equals_torch_optim_sgd_bit_for_bit(seed):
    for got, want in zip(run(SGD, seed=seed), run(torch.optim.SGD, seed=seed)):
        assert torch.equal(got, want)


def test_sgd_without_momentum_keeps_no_buffer_and_zero_grad_clears():
    p = torch.nn.Parameter(torch.randn(4))
    mine, theirs = SGD([p], lr=0.1), torch.optim.SGD([q := torch.nn.Parameter(p.detach().clone())], lr=0.1)
    for param, optimizer in ((p, mine), (q, theirs)):
        (param ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert param.grad is None
    assert torch.equal(p, q) and "momentum_buffer" not in mine.state[p]
