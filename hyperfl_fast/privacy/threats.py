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
- ``hyperfl-lpm``: as HyperFL's variant c on a frozen backbone (:func:`lpm_scenario`): theta (the client's
  adapters) and d_theta are read off the hypernetwork upload, and IG matches d_theta through the known backbone
  with a dummy head.
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call

from ..backbones import LPMSpec, client_logits
from ..models import CNNSpec, HyperNetwork, TargetCNN, extract_features, split_flat, split_theta
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
    shape: tuple[int, ...] | None = None  # the images to reconstruct (None: as many as the client's batch)


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


@dataclass
class HyperFLClient:
    """One HyperFL client as the attacks simulate it: its private embedding and classifier and its private batch."""

    embedding: torch.Tensor  # (E,)
    classifier: nn.Linear
    x: torch.Tensor  # (B, C, H, W), normalised
    y: torch.Tensor  # (B,)

    @property
    def private(self) -> Params:
        return {"embedding": self.embedding.detach(), "cls.weight": self.classifier.weight.detach(),
                "cls.bias": self.classifier.bias.detach()}


def hyperfl_training(training: LocalTraining) -> LocalTraining:
    """``training`` as a HyperFL client runs it: psi and the embedding clipped as two groups."""
    return LocalTraining(training.steps, training.lr, training.momentum, training.weight_decay, training.clip,
                         [list(HYPER_KEYS), ["embedding"]])


def hyperfl_upload(spec: CNNSpec, psi: Params, client: HyperFLClient, training: LocalTraining) -> Params:
    """What leaves a HyperFL client that received ``psi`` and trained on its batch: the hypernetwork's gradient
    (one step) or change (several), nothing else (:func:`hyperfl_training` says how it trains)."""
    with torch.device("meta"):  # the structure only: functional_call supplies psi's tensors
        hypernet = HyperNetwork(psi["fc.weight"].shape[1], psi["fc.weight"].shape[0], psi["heads.weight"].shape[0])
    private = client.private
    trainable = {**{k: t.clone().requires_grad_() for k, t in psi.items()},
                 "embedding": private["embedding"].clone().requires_grad_()}
    onehot = nn.functional.one_hot(client.y, spec.num_classes).float()
    upload = local_update(hyperfl_loss(spec, hypernet), trainable,
                          {k: private[k] for k in ("cls.weight", "cls.bias")}, client.x, onehot,
                          hyperfl_training(training))
    return {k: upload[k].detach() for k in HYPER_KEYS}


def generated_update(psi: Params, upload: Params, training: LocalTraining
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta, d_theta, h): the weights the client generated, their gradient and the hypernetwork's hidden
    vector, read off its upload.

    Every generated tensor is ``heads.weight @ h + heads.bias``, so the heads-bias upload is ``d_theta`` and the
    heads-weight upload is the rank-one ``d_theta ⊗ h``: ``h = Gᵀ g / ‖g‖²`` and ``theta`` follow, exactly for
    one step.  Over T steps a head's change is ``-lr`` times the summed momentum buffers, each the steps'
    (clipped) gradients plus weight decay: the change over ``-lr`` less the weight decay's share (the head
    itself times ``wd`` and the momentum-summed step count) is the steps' gradients summed with momentum
    weights, approximately (the heads move a little meanwhile), and the same identities follow.  A sum of
    several clients' uploads (secure aggregation) mixes their ``h``.
    """
    g_heads, g_bias = upload["heads.weight"], upload["heads.bias"]  # (P, H), (P,)
    if training.steps > 1:  # summed gradients, from the changes
        m, steps = training.momentum, training.steps
        decay = training.weight_decay * sum((1 - m ** (steps - s)) / (1 - m) for s in range(steps))
        g_heads = -g_heads / training.lr - decay * psi["heads.weight"]
        g_bias = -g_bias / training.lr - decay * psi["heads.bias"]
    hidden = g_heads.t() @ g_bias / g_bias.pow(2).sum()  # (H,)
    theta = psi["heads.weight"] @ hidden + psi["heads.bias"]
    return theta, g_bias, hidden


def hyperfl_scenario(spec: CNNSpec, hypernet: HyperNetwork, embedding: torch.Tensor, classifier: nn.Linear,
                     x: torch.Tensor, y: torch.Tensor, training: LocalTraining, variant: str) -> Scenario:
    """The server knows psi (global) and the architecture and sees the hypernetwork's upload only."""
    psi = {k: t.detach() for k, t in hypernet.state_dict().items()}
    client = HyperFLClient(embedding, classifier, x, y)
    private = client.private
    loss_fn = hyperfl_loss(spec, hypernet)
    observed = hyperfl_upload(spec, psi, client, training)  # all that leaves the client

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
                                  targets, hyperfl_training(training), create_graph=True)
            return [upload[k] for k in HYPER_KEYS]

        return Scenario(f"hyperfl-{variant}", simulate, [observed[k] for k in HYPER_KEYS], None, unknowns, {})

    if variant != "c":
        raise ValueError(f"unknown HyperFL attack variant {variant!r}; choose a, b or c")
    # structure-aware: the heads' upload is (close to) the rank-one d_theta ⊗ h
    theta_est, target, hidden_est = generated_update(psi, observed, training)
    v_dir = torch.linalg.svd(observed["fc.weight"], full_matrices=False).Vh[0]  # embedding direction, up to sign
    diagnostics = {**theta_diagnostics(hypernet, embedding, theta_est, hidden_est),
                   "embedding_abs_cosine": float(nn.functional.cosine_similarity(v_dir, embedding.detach(),
                                                                                 dim=0).abs())}
    return Scenario("hyperfl-c", dummy_classifier_simulation(spec, theta_est), [target], None,
                    Unknowns(_linear_init(spec.num_classes, spec.hidden)), diagnostics)


def theta_diagnostics(hypernet: HyperNetwork, embedding: torch.Tensor, theta_est: torch.Tensor,
                      hidden_est: torch.Tensor) -> dict:
    """How close the attacker's ``theta`` and hidden vector are to what the client really generated."""
    with torch.no_grad():
        true_hidden = torch.relu(hypernet.fc(embedding))
        true_theta = hypernet.heads(true_hidden)
    return {"hidden_cosine": float(nn.functional.cosine_similarity(hidden_est, true_hidden, dim=0)),
            "theta_rel_error": float((theta_est - true_theta).norm() / true_theta.norm())}


def dummy_classifier_simulation(spec: CNNSpec, theta: torch.Tensor):
    """simulate(images, labels, extras) -> [d_theta] of the generated network ``theta`` under the attacker's dummy
    classifier (``extras["cls.weight"]``, ``extras["cls.bias"]``)."""

    def simulate(images, targets, extras):
        leaf = theta.clone().requires_grad_()
        feats = extract_features(images, split_theta(leaf, spec), spec)
        loss = soft_cross_entropy(nn.functional.linear(feats, extras["cls.weight"], extras["cls.bias"]), targets)
        return list(torch.autograd.grad(loss, [leaf], create_graph=True))

    return simulate


# --------------------------------------------------------------------------- HyperFL-LPM

def lpm_logits(images: torch.Tensor, theta: torch.Tensor, head: Params, spec: LPMSpec) -> torch.Tensor:
    """The frozen backbone with the adapters ``theta`` (flat) and a head: logits (B, K)."""
    return client_logits(images, split_flat(theta, spec.adapter_shapes()), head, spec)


def lpm_scenario(spec: LPMSpec, psi: Params, private: Params, x: torch.Tensor, y: torch.Tensor,
                 training: LocalTraining) -> Scenario:
    """HyperFL-LPM's upload under the structure-aware attack: the server knows psi, the frozen backbone and the
    architecture; the client's embedding and head (``private``) are unknown to it.  One client step (or
    several) of psi and the embedding, as the client's hypernetwork epochs train them, gives the upload;
    theta and d_theta are read off it (:func:`generated_update`) and IG matches d_theta with a dummy head."""
    with torch.device("meta"):
        hypernet = HyperNetwork(psi["fc.weight"].shape[1], psi["fc.weight"].shape[0], psi["heads.weight"].shape[0])
    hypernet.load_state_dict(psi, assign=True)  # psi's tensors themselves
    head = {name: private[name] for name, _ in spec.head_shapes()}

    def loss_fn(p: Params, images, targets):
        theta = functional_call(hypernet, {k: p[k] for k in HYPER_KEYS}, (p["embedding"],))
        return soft_cross_entropy(lpm_logits(images, theta, p, spec), targets)

    trainable = {**{k: t.clone().requires_grad_() for k, t in psi.items()},
                 "embedding": private["embedding"].clone().requires_grad_()}
    onehot = nn.functional.one_hot(y, spec.num_classes).to(x.dtype)
    upload = local_update(loss_fn, trainable, head, x, onehot, hyperfl_training(training))
    observed = {k: upload[k].detach() for k in HYPER_KEYS}  # all that leaves the client
    theta_est, target, hidden_est = generated_update(psi, observed, training)
    diagnostics = theta_diagnostics(hypernet, private["embedding"], theta_est, hidden_est)

    def simulate(images, targets, extras):
        leaf = theta_est.clone().requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):  # (a ViT's fused attention has no second derivative)
            loss = soft_cross_entropy(lpm_logits(images, leaf, extras, spec), targets)
            return list(torch.autograd.grad(loss, [leaf], create_graph=True))

    unknowns = {}
    for name, shape in spec.head_shapes():
        if name.endswith("weight"):
            unknowns |= _linear_init(shape[0], shape[1], name.removesuffix("weight"))
    return Scenario("hyperfl-lpm-c", simulate, [target], None, Unknowns(unknowns), diagnostics)

