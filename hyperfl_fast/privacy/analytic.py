"""Attacks that first read a HyperFL upload in closed form: ``joint`` (an honest-but-curious server) and
``imprint`` (a malicious one), each also through secure aggregation (the server sees only the sum of N uploads).

- ``joint``: :func:`~.threats.generated_update` gives the client's generated ``theta`` and its gradient
  ``d_theta`` from the upload.  For a batch of one, fc1's bias gradient is the loss's gradient at fc1's
  pre-activation, so the private classifier is not needed at all: the attack matches ``d_theta`` with that
  cotangent pushed back through the generated feature extractor, and fc1's weight gradient over its bias
  gradient is fc1's input, exactly (:func:`fc_inputs`).  For larger batches the per-image cotangents are mixed
  and the classifier is optimised jointly with the images and labels (variant c's objective).
- ``imprint``: the server sends ``psi`` with ``heads.weight = 0`` and ``heads.bias = theta*``
  (:func:`crafted_psi`), so every client generates ``theta*`` whatever its embedding.  ``theta*``
  (:func:`imprint_theta`) makes fc1 a layer of trap rows (Boenisch et al. 2021; Fowl et al. 2022): each row
  fires for about one image in the expected total, so a row fired by exactly one image gives that image's
  fc1 input as its weight gradient over its bias gradient (up to the leak of fc1's leaky ReLU, 1-4% on the
  paper's CNN).  The convolutions are the image's shifted copies (conv1) and positive mixtures of them (later
  convs), and each recovered input is inverted through them (IG on :func:`feature_simulation`).  Max-pooling
  discards information, so the inversion is approximate.
- Either attack also runs on a client's real round (:class:`RealRound`), where the readings are approximate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..config import Config
from ..models import CNNSpec, conv_features, split_theta
from .attacks import LocalTraining, Params, Unknowns
from .threats import (HYPER_KEYS, HyperFLClient, Scenario, _linear_init, dummy_classifier_simulation,
                      generated_update, hyperfl_upload)


@dataclass
class RealRound:
    """A client's real round, as :class:`hyperfl_fast.methods.hyperfl.HyperFL` trains it: one classifier epoch, then
    ``cfg.local_epochs`` hypernetwork epochs of batches of ``cfg.batch_size`` over all of the client's images."""

    cfg: Config
    augment: bool = False  # the dataset's augmentation (CIFAR-like data: random crop and flip)

    def local_training(self, images: int) -> LocalTraining:
        """The SGD settings and step count :func:`~.threats.generated_update` needs to read the upload."""
        steps = -(-images // self.cfg.batch_size) * self.cfg.local_epochs
        return LocalTraining(steps, self.cfg.lr, self.cfg.momentum, self.cfg.weight_decay, self.cfg.grad_clip)

    def upload(self, spec: CNNSpec, psi: Params, client: HyperFLClient) -> Params:
        """The hypernetwork's change over the round (what the server learns from the uploaded psi)."""
        from ..federation import ClientData
        from ..methods import get_method

        data = ClientData(0, client.x, client.y, client.x[:1], client.y[:1], augment=self.augment)
        private = {"embedding": client.embedding.detach(), "classifier.weight": client.classifier.weight.detach(),
                   "classifier.bias": client.classifier.bias.detach()}
        update = get_method("hyperfl").client_update(spec, psi, private, data, self.cfg, 0)
        return {k: update.upload[k] - psi[k] for k in HYPER_KEYS}


Training = LocalTraining | RealRound  # local steps on one batch, or the real round


def summed_upload(spec: CNNSpec, psi: Params, clients: list[HyperFLClient], training: Training) -> Params:
    """What the server sees of ``clients``' uploads: the one upload, or under secure aggregation their sum."""
    uploads = [training.upload(spec, psi, client) if isinstance(training, RealRound)
               else hyperfl_upload(spec, psi, client, training) for client in clients]
    return {k: sum(u[k] for u in uploads) for k in HYPER_KEYS}


def read_upload(psi: Params, upload: Params, training: Training, images: int):
    """:func:`~.threats.generated_update` for either kind of training (``images``: one client's)."""
    return generated_update(psi, upload, training.local_training(images) if isinstance(training, RealRound)
                            else training)


def fc_inputs(d_weight: torch.Tensor, d_bias: torch.Tensor, above_leak: float = 0.0) -> torch.Tensor:
    """Each fully connected row's weight gradient over its bias gradient: (K, in_features).

    For one image every row gives the layer's input exactly.  For several, a row that one image alone fires
    gives that image's input up to the leak of fc1's leaky ReLU (slope 0.01 times every other image's share:
    about 1-4% on the paper's CNN); a row none fires gives a mixture.  ``above_leak`` keeps only rows whose
    bias gradient exceeds that multiple of the leak's level, the 10th percentile of the rows' (a fired row
    stands out; trap rows are calibrated so that about a third fire for no image)."""
    magnitude = d_bias.abs()
    keep = (magnitude > above_leak * torch.quantile(magnitude, 0.1)) & (magnitude > 0)
    return d_weight[keep] / d_bias[keep, None]


def upstream_simulation(spec: CNNSpec, theta: torch.Tensor, d_pre: torch.Tensor):
    """simulate(images, labels, extras) -> [d_theta]: the gradient of the generated feature extractor when the
    loss's gradient at fc1's pre-activation is ``d_pre`` (H,): exact for a batch of one, no classifier needed."""

    def simulate(images, targets, extras):
        leaf = theta.clone().requires_grad_()
        params = split_theta(leaf, spec)
        pre = nn.functional.linear(conv_features(images, params, spec), params["fc1.weight"], params["fc1.bias"])
        return list(torch.autograd.grad((pre * d_pre).sum(), [leaf], create_graph=True))

    return simulate


def joint_scenario(spec: CNNSpec, psi: Params, clients: list[HyperFLClient], training: Training,
                   reconstruct_images: int | None = None) -> Scenario:
    """An honest-but-curious server's best passive attack on the (summed) upload of ``clients``, who received
    the honest ``psi``: ``theta`` and ``d_theta`` read off the upload, then IG on ``d_theta`` (see the module).
    With ``reconstruct_images`` (a real round over all of a client's images) it reconstructs that many images,
    each of the clients' images then scored by its best match.  With several clients summed the one-image
    reading mixes their images and hidden vectors: the diagnostics (θ's and fc1's input's relative errors,
    against the attacked client's) say how far off it is."""
    observed = summed_upload(spec, psi, clients, training)
    theta, d_theta, _ = read_upload(psi, observed, training, len(clients[0].x))
    d = split_theta(d_theta, spec)
    target = clients[0]
    with torch.no_grad():  # what the attacker could not know, for the report only
        generated = true_theta(psi, target.embedding)
        true_inputs = conv_features(target.x, split_theta(generated, spec), spec)
    diagnostics = {"theta_rel_error": float((theta - generated).norm() / generated.norm()),
                   "clients_summed": len(clients)}
    if len(target.x) == 1:  # the pre-activation gradient is fc1's bias gradient: nothing unknown but the image
        inputs = fc_inputs(d["fc1.weight"], d["fc1.bias"])
        diagnostics["fc_input_rel_error"] = float((inputs - true_inputs).norm(dim=1).median() / true_inputs.norm())
        return Scenario("hyperfl-joint", upstream_simulation(spec, theta, d["fc1.bias"]), [d_theta],
                        torch.zeros(1, dtype=torch.long, device=d_theta.device), Unknowns(), diagnostics)
    shape = None if reconstruct_images is None else (reconstruct_images, *target.x.shape[1:])
    return Scenario("hyperfl-joint", dummy_classifier_simulation(spec, theta), [d_theta], None,
                    Unknowns(_linear_init(spec.num_classes, spec.hidden)), diagnostics, shape)


def true_theta(psi: Params, embedding: torch.Tensor) -> torch.Tensor:
    """h(v; psi): the weights a client with ``embedding`` (E,) generates from ``psi`` (the generation op)."""
    return ops.generate_weights(embedding[None], psi["fc.weight"], psi["fc.bias"], psi["heads.weight"],
                                psi["heads.bias"])[0]


# --------------------------------------------------------------------------- imprint (malicious server)

def crafted_psi(psi: Params, theta_star: torch.Tensor) -> Params:
    """A hypernetwork that generates ``theta_star`` for every embedding: zero head weights, ``theta_star`` as
    the head bias (the rest of ``psi`` unchanged)."""
    return {**psi, "heads.weight": torch.zeros_like(psi["heads.weight"]), "heads.bias": theta_star.clone()}


def imprint_theta(spec: CNNSpec, auxiliary: torch.Tensor, low: float, expected_images: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The malicious ``theta*`` (P,) for ``expected_images`` images in the upload (batch x clients summed).

    - conv1: channel c is input channel ``c mod C`` shifted by one of the ``s x s`` offsets (``s`` as many as
      the channels allow, up to the kernel), plus ``-low`` so that every output is non-negative (the leaky ReLU
      passes it unchanged); max-pooling then keeps the maximum of each 2x2 window at every offset;
    - later convs: non-negative random mixtures, no bias;
    - fc1: random directions, each row's bias set so that it fires for a fraction ``1 / expected_images`` of
      ``auxiliary`` images (normalised, (M, C, H, W): public images of the same kind, as these attacks assume).
    """
    shapes = dict(spec.feature_shapes())
    params = {name: torch.zeros(shape) for name, shape in spec.feature_shapes()}
    first = spec.convs[0]
    s = max(1, min(first.kernel_size, math.isqrt(max(1, first.out_channels // first.in_channels))))
    for c in range(first.out_channels):
        a, b = divmod((c // first.in_channels) % (s * s), s)
        params["conv1.weight"][c, c % first.in_channels, a, b] = 1.0
    params["conv1.bias"].fill_(-low)
    for i in range(2, len(spec.convs) + 1):
        shape = shapes[f"conv{i}.weight"]
        params[f"conv{i}.weight"] = torch.randn(shape, generator=generator).abs() / math.sqrt(math.prod(shape[1:]))
    rows = torch.randn(shapes["fc1.weight"], generator=generator) / math.sqrt(spec.flat_features)
    with torch.no_grad():
        projections = conv_features(auxiliary.cpu(), params, spec) @ rows.t()  # (M, hidden)
    level = max(0.0, 1.0 - 1.0 / max(1, expected_images))
    params["fc1.weight"], params["fc1.bias"] = rows, -torch.quantile(projections, level, dim=0)
    return torch.cat([params[name].flatten() for name, _ in spec.feature_shapes()])


def feature_simulation(spec: CNNSpec, theta: torch.Tensor):
    """simulate(images, labels, extras) -> [fc1 inputs, each of norm 1]: the conv stack of ``theta``.  Against
    unit-norm targets IG's cosine distance is then one minus the mean of the images' own cosines."""
    params = split_theta(theta, spec)

    def simulate(images, targets, extras):
        return [nn.functional.normalize(conv_features(images, params, spec), dim=1)]

    return simulate


def relative_distances(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(K, n): ‖rows[k] - targets[i]‖ / ‖targets[i]‖.  (Not cosine: the imprint's fc1 inputs share a large
    constant part, so different images' inputs have cosines above 0.999.)"""
    return torch.cdist(rows, targets) / targets.norm(dim=1).clamp(min=torch.finfo(rows.dtype).tiny)


def distinct(rows: torch.Tensor, same: float = 1e-3) -> torch.Tensor:
    """``rows`` (K, F) with near-duplicates (relative distance below ``same``) dropped, each kept once, in order."""
    kept: list[int] = []
    for i in range(len(rows)):
        if not kept or float(relative_distances(rows[kept], rows[i:i + 1]).min()) >= same:
            kept.append(i)
    return rows[kept]


TRAP_ROWS_ABOVE_LEAK = 10.0  # imprint: a fired trap row's bias gradient stands this far above the leak's
ISOLATED = 0.05  # an image counts as isolated when a candidate is within 5% of its fc1 input


def evasive_psi(psi: Params, theta_star: torch.Tensor, spec: CNNSpec, probes: torch.Tensor,
                target: float, generator: torch.Generator) -> Params:
    """:func:`crafted_psi` that passes a client's sensitivity check (:mod:`hyperfl_fast.methods.psi_check`):
    random head weights on fc1's weights only, scaled (by bisection) so that the median sensitivity at
    ``probes`` (embeddings the server expects, (M, E)) is ``target``.  A trap row's weight gradient over its
    bias gradient is its input whatever its weights, so the traps still work (their directions now vary a little
    by client); the conv stack stays the attacker's."""
    from ..methods.psi_check import embedding_sensitivity

    shapes = spec.feature_shapes()
    start = sum(math.prod(shape) for _, shape in shapes[:[name for name, _ in shapes].index("fc1.weight")])
    crafted = crafted_psi(psi, theta_star)
    heads = crafted["heads.weight"]
    heads[start:start + spec.hidden * spec.flat_features] = torch.randn(
        spec.hidden * spec.flat_features, heads.shape[1], generator=generator).to(heads)
    low, high = -12.0, 4.0  # log10 of the scale; the median sensitivity grows with it
    for _ in range(40):  # bisection to 1e-12 in log10
        middle = (low + high) / 2
        crafted["heads.weight"] = heads * 10 ** middle
        low, high = (middle, high) if float(embedding_sensitivity(crafted, probes).median()) < target else (low, middle)
    crafted["heads.weight"] = heads * 10 ** high
    return crafted


def imprint_scenario(spec: CNNSpec, sent: Params, clients: list[HyperFLClient], training: Training) -> Scenario:
    """A malicious server's imprint attack on ``clients`` (their summed upload under secure aggregation), who
    received ``sent`` (:func:`crafted_psi` or :func:`evasive_psi` with :func:`imprint_theta`): every fc1 row's
    input (:func:`fc_inputs`) is a candidate to invert through the known conv stack.  The scenario
    reconstructs one image per candidate (``Scenario.shape``); its ground truth is every client's batch."""
    observed = summed_upload(spec, sent, clients, training)
    _, d_theta, _ = read_upload(sent, observed, training, len(clients[0].x))
    d = split_theta(d_theta, spec)
    theta_star = sent["heads.bias"]  # the conv stack every client runs (evasive_psi varies fc1 only)
    candidates = distinct(fc_inputs(d["fc1.weight"], d["fc1.bias"], TRAP_ROWS_ABOVE_LEAK))  # (K, flat_features)
    with torch.no_grad():  # how close the candidates are to the images' fc1 inputs, for the report only
        truth = torch.cat([conv_features(c.x, split_theta(theta_star, spec), spec) for c in clients])  # (n, F)
        error = relative_distances(candidates, truth).amin(0)  # (n,): each image's closest candidate
    diagnostics = {"clients_summed": len(clients), "candidates": len(candidates),
                   "images_isolated": int((error < ISOLATED).sum()),
                   "isolated_median_error": float(error[error < ISOLATED].median()) if (error < ISOLATED).any()
                   else None}
    shape = (len(candidates), *clients[0].x.shape[1:])
    return Scenario("hyperfl-imprint", feature_simulation(spec, theta_star),
                    [nn.functional.normalize(candidates, dim=1)],
                    torch.zeros(len(candidates), dtype=torch.long, device=candidates.device), Unknowns(),
                    diagnostics, shape)
