"""Target CNNs and the HyperFL hypernetwork.

A client's network is split into a feature extractor ``f(x; theta)`` and a
private classifier head ``g(z; phi)``.  In HyperFL ``theta`` is never trained
directly: a hypernetwork generates it from a private client embedding,
``theta = h(v; psi)``.  ``theta`` is one flat vector; :class:`CNNSpec` says how
it splits into the feature extractor's tensors.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops.activation import LEAKY_SLOPE



@dataclass(frozen=True)
class ConvSpec:
    """One conv layer of the feature extractor: conv -> leaky ReLU -> 2x2 max-pool."""

    in_channels: int
    out_channels: int
    kernel_size: int
    padding: int


@dataclass(frozen=True)
class CNNSpec:
    """Shape of a target CNN: convs, one hidden linear layer, then the classifier.

    ``theta`` (the feature extractor's parameters) is laid out flat in the
    order of :meth:`feature_shapes`: conv1.weight, conv1.bias, conv2.weight, ...,
    fc1.weight, fc1.bias.
    """

    in_channels: int
    image_size: int
    convs: tuple[ConvSpec, ...]
    hidden: int
    num_classes: int

    @property
    def flat_features(self) -> int:
        """Length of the flattened conv output that feeds fc1."""
        size = self.image_size
        for conv in self.convs:
            size = (size + 2 * conv.padding - conv.kernel_size + 1) // 2
        return self.convs[-1].out_channels * size * size

    def feature_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every feature-extractor tensor, in theta's order."""
        shapes = []
        for i, conv in enumerate(self.convs, start=1):
            k = conv.kernel_size
            shapes.append((f"conv{i}.weight", (conv.out_channels, conv.in_channels, k, k)))
            shapes.append((f"conv{i}.bias", (conv.out_channels,)))
        shapes.append(("fc1.weight", (self.hidden, self.flat_features)))
        shapes.append(("fc1.bias", (self.hidden,)))
        return shapes

    @property
    def num_feature_params(self) -> int:
        """P: the length of the flat theta vector."""
        return sum(math.prod(shape) for _, shape in self.feature_shapes())

    def classifier_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the classifier's tensors, as :class:`TargetCNN` names them."""
        return [("fc2.weight", (self.num_classes, self.hidden)), ("fc2.bias", (self.num_classes,))]

    @property
    def eval_chunk(self) -> int:
        """Test images per client per forward in evaluation."""
        return 200

    def cnn_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor of the whole CNN (feature extractor, then classifier), in the order of
        a flat vector that holds all of them (pFedHN generates the whole CNN)."""
        return self.feature_shapes() + self.classifier_shapes()


def cnn_spec(in_channels: int, num_classes: int) -> CNNSpec:
    """The paper's target CNN for 1-channel 28x28 or 3-channel 32x32 images."""
    if in_channels == 1:
        convs = (ConvSpec(1, 16, 5, 0), ConvSpec(16, 32, 5, 1))
        return CNNSpec(1, 28, convs, 128, num_classes)
    if in_channels == 3:
        convs = (ConvSpec(3, 16, 5, 0), ConvSpec(16, 32, 5, 1), ConvSpec(32, 64, 3, 1))
        return CNNSpec(3, 32, convs, 128, num_classes)
    raise ValueError(f"no target CNN for in_channels={in_channels}; expected 1 (28x28) or 3 (32x32)")


def split_theta(theta: torch.Tensor, spec: CNNSpec) -> dict[str, torch.Tensor]:
    """Views of a flat ``theta`` (..., P) as the feature extractor's named tensors (..., *shape).

    A leading client dimension (N, P) gives per-client tensors (N, *shape).
    """
    return split_flat(theta, spec.feature_shapes())


def split_flat(flat: torch.Tensor, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Views of a flat vector (..., P) as named tensors (..., *shape), in the order of ``shapes``."""
    size = sum(math.prod(shape) for _, shape in shapes)
    if flat.dim() == 0 or flat.shape[-1] != size:
        raise ValueError(f"theta must end in a flat vector of {size} values, got shape {tuple(flat.shape)}")
    lead = flat.shape[:-1]
    # one split (its backward is a single concatenation, not a zero-filled (..., P) per slice)
    pieces = flat.split([math.prod(shape) for _, shape in shapes], dim=-1)
    return {name: piece.reshape(*lead, *shape) for (name, shape), piece in zip(shapes, pieces)}


def join_flat(tensors: dict[str, torch.Tensor], shapes: list[tuple[str, tuple[int, ...]]], lead: int = 0
              ) -> torch.Tensor:
    """The inverse of :func:`split_flat`: named tensors (with ``lead`` leading dimensions) as one flat vector."""
    return torch.cat([tensors[name].flatten(lead) for name, _ in shapes], dim=-1)


def conv_features(x: torch.Tensor, params: dict[str, torch.Tensor], spec: CNNSpec) -> torch.Tensor:
    """The conv stack's flattened output, fc1's input: (B, C, H, W) -> (B, flat_features)."""
    for i, conv in enumerate(spec.convs, start=1):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=conv.padding)
        x = F.max_pool2d(F.leaky_relu(x, LEAKY_SLOPE), 2)
    return x.flatten(1)


def extract_features(x: torch.Tensor, params: dict[str, torch.Tensor], spec: CNNSpec) -> torch.Tensor:
    """Feature extractor f(x; theta) with the given tensors: (B, C, H, W) -> (B, hidden)."""
    return F.leaky_relu(F.linear(conv_features(x, params, spec), params["fc1.weight"], params["fc1.bias"]),
                        LEAKY_SLOPE)


def extract_features_batched(x: torch.Tensor, params: dict[str, torch.Tensor], spec: CNNSpec,
                             path: str | None = None) -> torch.Tensor:
    """All clients' feature extractors at once with the fused ops: (N, B, C, H, W) -> (N, B, hidden).

    ``params`` holds per-client tensors (N, *shape), e.g. ``split_theta(theta)``
    of a (N, P) theta; ``path`` picks the ops' path (see :mod:`hyperfl_fast.ops`).
    """
    for i, conv in enumerate(spec.convs, start=1):
        x = ops.batched_conv2d_leaky_pool(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], conv.padding,
                                          path=path)
    return ops.batched_linear(x.flatten(2), params["fc1.weight"], params["fc1.bias"], leaky=True, path=path)


class TargetCNN(nn.Module):
    """The plain target CNN as ordinary modules (used by ``local`` and ``fedavg``).

    Parameter names match :meth:`CNNSpec.feature_shapes` plus ``fc2.*`` for the
    classifier, so the tensors of a generated ``theta`` can be loaded into it
    by name (e.g. with ``torch.func.functional_call``).
    """

    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.spec = spec
        for i, conv in enumerate(spec.convs, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                                padding=conv.padding))
        self.fc1 = nn.Linear(spec.flat_features, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.num_classes)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        for i in range(1, len(self.spec.convs) + 1):
            x = self.pool(self.act(getattr(self, f"conv{i}")(x)))
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class HyperNetwork(nn.Module):
    """h(v; psi): embedding (E,) -> ReLU(Linear E->H) -> heads Linear H->P -> flat theta (P,).

    All per-tensor heads share the same hidden input, so together they are one
    ``Linear(H, P)``; :func:`split_theta` gives the per-layer views.  Works on a
    single embedding (E,) or a batch (N, E).
    """

    def __init__(self, embed_dim: int, hidden_dim: int, num_params: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, hidden_dim)
        self.heads = nn.Linear(hidden_dim, num_params)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.heads(F.relu(self.fc(embedding)))


class GeneratedCNN(nn.Module):
    """A HyperFL client's model: hypernetwork + private embedding + private classifier.

    ``hypernet`` is the only part that ever leaves the client (:meth:`upload`);
    ``embedding`` (E,) and ``classifier`` stay with the client for the whole run.
    """

    def __init__(self, spec: CNNSpec, hypernet: HyperNetwork, embedding: nn.Parameter, classifier: nn.Linear):
        super().__init__()
        self.spec = spec
        self.hypernet = hypernet
        self.embedding = embedding
        self.classifier = classifier

    def generate(self) -> torch.Tensor:
        """theta_i = h(v_i; psi), flat (P,)."""
        return self.hypernet(self.embedding)

    def forward(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``x`` (B, C, H, W); pass ``theta`` to reuse weights generated earlier."""
        if theta is None:
            theta = self.generate()
        return self.classifier(extract_features(x, split_theta(theta, self.spec), self.spec))

    def upload(self) -> dict[str, torch.Tensor]:
        """What the client sends to the server: copies of the hypernetwork's tensors, nothing else."""
        return {name: t.detach().clone() for name, t in self.hypernet.state_dict().items()}


def init_hyperfl(spec: CNNSpec, num_clients: int, embed_dim: int, hidden_dim: int, device: torch.device,
                 shared: bool = True):
    """Initial HyperFL state, drawn in a fixed order so every engine starts from the same tensors.

    Returns the global hypernetwork, every client's embedding v_i (E,) (N(0, 1),
    like ``nn.Embedding``) and every client's classifier (PyTorch's default init).
    ``shared=True`` (the authors' code, which deep-copies one model per client)
    draws one embedding and one classifier and gives every client its own copy
    of them; ``shared=False`` draws them independently per client.
    """
    hypernet = HyperNetwork(embed_dim, hidden_dim, spec.num_feature_params).to(device)
    draws = 1 if shared else num_clients
    embeddings = [torch.randn(embed_dim).to(device) for _ in range(draws)]
    classifiers = [nn.Linear(spec.hidden, spec.num_classes).to(device) for _ in range(draws)]
    if shared:
        embeddings = embeddings * num_clients
        classifiers = [copy.deepcopy(classifiers[0]) for _ in range(num_clients)]
    return hypernet, [nn.Parameter(v.clone()) for v in embeddings], classifiers


def init_target_cnns(spec: CNNSpec, count: int, device: torch.device, shared: bool = True) -> list[TargetCNN]:
    """``count`` target CNNs: copies of one draw (``shared``, as the authors' code) or independent draws."""
    if shared:
        first = TargetCNN(spec).to(device)
        return [first] + [copy.deepcopy(first) for _ in range(count - 1)]
    return [TargetCNN(spec).to(device) for _ in range(count)]


def init_private_classifiers(model: TargetCNN, num_clients: int, shared: bool = True) -> list[nn.Linear]:
    """Every client's private classifier for a shared-representation method: copies of ``model``'s own
    classifier (``shared``, as the authors' deep copies) or fresh draws."""
    if shared:
        return [copy.deepcopy(model.fc2) for _ in range(num_clients)]
    return [nn.Linear(model.spec.hidden, model.spec.num_classes).to(model.fc2.weight.device)
            for _ in range(num_clients)]
