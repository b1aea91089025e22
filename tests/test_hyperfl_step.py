"""One hypernetwork-phase step of the reference equals an independent hand computation."""
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call

from hyperfl_fast.config import Config
from hyperfl_fast.models import GeneratedCNN, HyperNetwork, TargetCNN, cnn_spec, split_theta
from hyperfl_fast.methods.base import sgd
from hyperfl_fast.methods.hyperfl import hypernet_step


def by_hand(spec, hypernet, embedding, classifier, batches, lr, momentum, wd, clip):
    """Autograd through a plain CNN holding the generated tensors, chain rule to (psi, v), clip, SGD."""
    psi = [p.detach().clone() for p in hypernet.parameters()]
    v = embedding.detach().clone()
    bufs = None
    for x, y in batches:
        psi_leaf = [p.clone().requires_grad_() for p in psi]
        v_leaf = v.clone().requires_grad_()
        work = copy.deepcopy(hypernet)
        theta = functional_call(work, dict(zip([n for n, _ in work.named_parameters()], psi_leaf)), (v_leaf,))
        # gradient w.r.t. the generated tensors through an ordinary CNN module
        tensors = {k: t.detach().requires_grad_() for k, t in split_theta(theta, spec).items()}
        cnn_params = {**tensors, "fc2.weight": classifier.weight.detach(), "fc2.bias": classifier.bias.detach()}
        loss = F.cross_entropy(functional_call(TargetCNN(spec), cnn_params, (x,)), y)
        grads = torch.autograd.grad(loss, list(tensors.values()))
        d_theta = torch.cat([g.flatten() for g in grads])
        # chain rule theta -> (psi, v)
        g_all = torch.autograd.grad(theta, psi_leaf + [v_leaf], grad_outputs=d_theta)
        g_psi, g_v = list(g_all[:-1]), g_all[-1]

        def clipped(gs):
            norm = torch.sqrt(sum((g ** 2).sum() for g in gs))
            coef = min(1.0, clip / (norm.item() + 1e-6))
            return [g * coef for g in gs]

        g_psi, g_v = clipped(g_psi), clipped([g_v])[0]
        params, gs = psi + [v], g_psi + [g_v]
        d = [g + wd * p for g, p in zip(gs, params)]
        bufs = d if bufs is None else [momentum * b + di for b, di in zip(bufs, d)]
        new = [p - lr * b for p, b in zip(params, bufs)]
        psi, v = new[:-1], new[-1]
    return psi, v


def test_hypernet_steps_match_hand_computation():
    torch.manual_seed(0)
    spec = cnn_spec(1, 10)
    hypernet = HyperNetwork(16, 32, spec.num_feature_params)
    embedding = torch.nn.Parameter(torch.randn(16))
    classifier = torch.nn.Linear(spec.hidden, 10)
    batches = [(torch.randn(7, 1, 28, 28), torch.randint(0, 10, (7,))) for _ in range(3)]
    # a small clip so that clipping is active for both parameter groups
    cfg = Config(lr=0.05, momentum=0.5, weight_decay=5e-4, grad_clip=0.05)

    expected_psi, expected_v = by_hand(spec, hypernet, embedding, classifier, batches,
                                       cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip)

    model = GeneratedCNN(spec, copy.deepcopy(hypernet), torch.nn.Parameter(embedding.detach().clone()), classifier)
    classifier_before = copy.deepcopy(classifier.state_dict())
    optimizer = sgd([{"params": model.hypernet.parameters()}, {"params": [model.embedding]}], cfg, cfg.lr)
    model.classifier.requires_grad_(False)
    for x, y in batches:
        hypernet_step(model, optimizer, x, y, cfg.grad_clip)

    for got, want in zip(model.hypernet.parameters(), expected_psi):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.embedding.detach(), expected_v, rtol=1e-4, atol=1e-6)
    for k, t in classifier.state_dict().items():
        torch.testing.assert_close(t, classifier_before[k], rtol=0, atol=0)  # the classifier did not move
    assert not torch.allclose(model.embedding.detach(), embedding.detach())  # v did move
