"""Threat models: what an honest-but-curious server sees, and what each attack variant may use.

The server knows the global model it sent and sees one client's upload,
produced by that client's local training on a private batch (x, y).

- ``fedavg``: the upload is the whole CNN's gradient / update; the server
  knows the whole model.  Labels are inferred from the classifier-bias upload.
- ``dp-fedavg``, ``ppsgd``, ``centaur``: the client trains with record-level
  DP-SGD, so the upload is noised (per-sample clipping to C, N(0, (sigma C)^2)
  on the sum).  The attacker knows the shared part and the algorithm but not
  the noise, and simulates the noiseless clipped update; for ``ppsgd`` and
  ``centaur`` only the representation is uploaded and the client's classifier
  is unknown (optimised with the images, like HyperFL's variant a).
- ``pfedhn``: the server generated the client's whole CNN and sees its change: FedAvg's threat model;
  ``pfedhn-pc``: it generated the feature extractor and sees its change, the client's classifier unknown (as
  PPSGD's and CENTAUR's, without the noise).
- ``hyperfl``: the upload is the hypernetwork's gradient / update (psi only);
  the client's embedding v and classifier phi are private.
  * ``a`` (IG, unknown private parts): dummy images, embedding, classifier and
    labels are optimised together to match the hypernetwork upload;
  * ``b`` (white-box upper bound): the attacker is handed the true v and phi;
  * ``c`` (structure-aware): the heads' upload is ``dtheta ⊗ h`` (one step) and
    the heads-bias upload is ``dtheta`` itself, so ``h = Gᵀ g / ‖g‖²`` and the
    client's generated weights ``theta = W0 h + b0`` follow; IG then matches
    ``dtheta`` against the generated network with a dummy classifier.  Over
    several steps these identities hold only approximately.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..models import CNNSpec, HyperNetwork, TargetCNN, extract_features, split_theta
from .attacks import LocalTraining, Params, Unknowns, infer_labels, local_update, soft_cross_entropy

HYPER_KEYS = ("fc.weight", "fc.bias", "heads.weight", "heads.bias")


@dataclass
class Scenario:
    """One attack to run: how to simulate the upload, what was observed, and what is unknown."""

    name: str
    simulate: object  # (images, label distributions, extras) -> list of upload tensors
    observed: list[torch.Tensor]
    labels: torch.Tensor | None  # inferred labels, or None when they must be optimised
    unknowns: Unknowns
    diagnostics: dict  # what else the attacker learnt (variant c), for the report


def _linear_init(out_features: int, in_features: int, prefix: str = "cls."):
    """nn.Linear's default initialisation, drawn from the attack's generator."""
    bound = 1 / math.sqrt(in_features)
    return {f"{prefix}weight": lambda g: (torch.rand(out_features, in_features, generator=g) * 2 - 1) * bound,
            f"{prefix}bias": lambda g: (torch.rand(out_features, generator=g) * 2 - 1) * bound}


# --------------------------------------------------------------------------- FedAvg

def fedavg_scenario(model: TargetCNN, x: torch.Tensor, y: torch.Tensor, training: LocalTraining,
                    name: str = "fedavg") -> Scenario:
    """The server knows the whole model and sees its gradient (1 step) or update (several steps): FedAvg, and
    pFedHN, whose server generated the model and sees its change (the attack works with new - old; a pFedHN
    upload, old - new, is its negative)."""
    params = {k: t.detach() for k, t in model.named_parameters()}

    def loss_fn(p: Params, images, targets):
        return soft_cross_entropy(functional_call(model, p, (images,)), targets)

    onehot = nn.functional.one_hot(y, model.spec.num_classes).float()
    observed = local_update(loss_fn, {k: t.clone().requires_grad_() for k, t in params.items()}, {}, x, onehot,
                            training)
    names = list(params)
    labels = infer_labels(observed["fc2.bias"].detach(), len(y), is_gradient=training.steps == 1)

    def simulate(images, targets, extras):
        upload = local_update(loss_fn, params, {}, images, targets, training, create_graph=True)
        return [upload[k] for k in names]

    return Scenario(name, simulate, [observed[k].detach() for k in names], labels, Unknowns(),
                    {"labels_inferred": labels.tolist()})


# --------------------------------------------------------------------------- DP baselines, pFedHN-PC

# the threat models (Method.threat) of a shared CNN trained by the client: with DP-SGD, the whole CNN
# (DP-FedAvg) or the representation (PPSGD, CENTAUR), or without noise the representation (pFedHN-PC)
CNN_THREATS = ("dp-full-model", "dp-representation", "representation")


def cnn_scenario(method: str, model: TargetCNN, x: torch.Tensor, y: torch.Tensor, training: LocalTraining,
                 seed: int = 0) -> Scenario:
    """A client's upload of the CNN it trained, as ``method`` declares it
    (:attr:`~hyperfl_fast.methods.Method.threat`): noised with DP-SGD (``training.dp_clip``, ``training.dp_sigma``)
    for the whole CNN (``dp-full-model``: DP-FedAvg) or the representation with the classifier private
    (``dp-representation``: PPSGD, CENTAUR), or the representation without noise (``representation``: pFedHN-PC,
    whose server generated the feature extractor and sees its change)."""
    from ..methods import METHODS

    threat = METHODS[method].threat if method in METHODS else None
    if threat not in CNN_THREATS:
        names = [name for name, m in METHODS.items() if m.threat in CNN_THREATS]
        raise ValueError(f"unknown method {method!r} for this threat model; choose one of {', '.join(names)}")
    params = {k: t.detach() for k, t in model.named_parameters()}
    classifier = {k: params.pop(k) for k in ("fc2.weight", "fc2.bias")} if threat != "dp-full-model" else {}
    names = list(params)  # what is uploaded

    def loss_fn(p: Params, images, targets):
        return soft_cross_entropy(functional_call(model, p, (images,)), targets)

    onehot = nn.functional.one_hot(y, model.spec.num_classes).float()
    observed = local_update(loss_fn, {k: t.clone().requires_grad_() for k, t in params.items()}, classifier, x,
                            onehot, training, noise=torch.Generator().manual_seed(seed))
    unknowns = Unknowns(_linear_init(model.spec.num_classes, model.spec.hidden, "fc2.") if classifier else {})

    def simulate(images, targets, extras):
        upload = local_update(loss_fn, params, extras, images, targets, training, create_graph=True)
        return [upload[k] for k in names]

    diagnostics = {"noise_multiplier": training.dp_sigma, "dp_clip": training.dp_clip} if training.dp_clip else {}
    return Scenario(method, simulate, [observed[k].detach() for k in names], None, unknowns, diagnostics)


# --------------------------------------------------------------------------- HyperFL

def hyperfl_loss(spec: CNNSpec, hypernet: HyperNetwork):
    """The client's loss as a function of (psi, v, phi) tensors: theta = h(v; psi) feeds the target CNN."""

    def loss_fn(p: Params, images, targets):
        theta = functional_call(hypernet, {k: p[k] for k in HYPER_KEYS}, (p["embedding"],))
        feats = extract_features(images, split_theta(theta, spec), spec)
        return soft_cross_entropy(nn.functional.linear(feats, p["cls.weight"], p["cls.bias"]), targets)

    return loss_fn


def hyperfl_scenario(spec: CNNSpec, hypernet: HyperNetwork, embedding: torch.Tensor, classifier: nn.Linear,
                     x: torch.Tensor, y: torch.Tensor, training: LocalTraining, variant: str) -> Scenario:
    """The server knows psi (global) and the architecture and sees the hypernetwork's upload only."""
    psi = {k: t.detach() for k, t in hypernet.state_dict().items()}
    private = {"embedding": embedding.detach(), "cls.weight": classifier.weight.detach(),
               "cls.bias": classifier.bias.detach()}
    loss_fn = hyperfl_loss(spec, hypernet)
    training = LocalTraining(training.steps, training.lr, training.momentum, training.weight_decay,
                             training.clip, [list(HYPER_KEYS), ["embedding"]])
    onehot = nn.functional.one_hot(y, spec.num_classes).float()
    trainable = {**{k: t.clone().requires_grad_() for k, t in psi.items()},
                 "embedding": private["embedding"].clone().requires_grad_()}
    client_upload = local_update(loss_fn, trainable, {k: private[k] for k in ("cls.weight", "cls.bias")},
                                 x, onehot, training)
    observed = {k: client_upload[k].detach() for k in HYPER_KEYS}  # all that leaves the client

    if variant in ("a", "b"):
        if variant == "a":
            unknowns = Unknowns({"embedding": lambda g: torch.randn(embedding.shape, generator=g),
                                 **_linear_init(spec.num_classes, spec.hidden)})
        else:
            unknowns = Unknowns()

        def simulate(images, targets, extras):
            known = {**private, **extras}
            start = {**psi, "embedding": known["embedding"]}
            upload = local_update(loss_fn, start, {k: known[k] for k in ("cls.weight", "cls.bias")}, images,
                                  targets, training, create_graph=True)
            return [upload[k] for k in HYPER_KEYS]

        return Scenario(f"hyperfl-{variant}", simulate, [observed[k] for k in HYPER_KEYS], None, unknowns, {})

    if variant != "c":
        raise ValueError(f"unknown HyperFL attack variant {variant!r}; choose a, b or c")
    # structure-aware: the heads' upload is (close to) the rank-one d_theta ⊗ h
    g_heads, g_bias = observed["heads.weight"], observed["heads.bias"]  # (P, H), (P,)
    hidden_est = g_heads.t() @ g_bias / g_bias.pow(2).sum()  # (H,)
    theta_est = psi["heads.weight"] @ hidden_est + psi["heads.bias"]  # the client's generated weights
    v_dir = torch.linalg.svd(observed["fc.weight"], full_matrices=False).Vh[0]  # embedding direction, up to sign
    with torch.no_grad():
        true_hidden = torch.relu(hypernet.fc(embedding))
        true_theta = hypernet.heads(true_hidden)
    diagnostics = {
        "hidden_cosine": float(nn.functional.cosine_similarity(hidden_est, true_hidden, dim=0)),
        "theta_rel_error": float((theta_est - true_theta).norm() / true_theta.norm()),
        "embedding_abs_cosine": float(nn.functional.cosine_similarity(v_dir, embedding.detach(), dim=0).abs()),
    }

    def simulate(images, targets, extras):
        theta = theta_est.clone().requires_grad_()
        feats = extract_features(images, split_theta(theta, spec), spec)
        loss = soft_cross_entropy(nn.functional.linear(feats, extras["cls.weight"], extras["cls.bias"]), targets)
        return list(torch.autograd.grad(loss, [theta], create_graph=True))

    target = g_bias if training.steps == 1 else -g_bias  # a parameter change points against the gradient
    return Scenario("hyperfl-c", simulate, [target], None, Unknowns(_linear_init(spec.num_classes, spec.hidden)),
                    diagnostics)
