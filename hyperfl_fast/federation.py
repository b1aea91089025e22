"""Pieces every federation engine shares: client data, randomness, sampling, aggregation.

How randomness is drawn (so that two engines given the same seed agree):
every random draw of a client's local training comes from a CPU
``torch.Generator`` seeded by :func:`make_generator` ``(seed, round, client, epoch)``;
an epoch first draws its shuffle (``torch.randperm``) and then, batch by batch,
its augmentation.  Client sampling uses ``(seed, round)``.  Model
initialisation uses ``torch.manual_seed(seed)`` once, before any model is made.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .config import Config, ConfigError
from .data import DATASET_SHAPES, ImageDataset, load_dataset, random_crop_flip
from .models import cnn_spec
from .partition import ClientSplit, overlap, partition


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of ``keys`` (e.g. seed, round, client, epoch)."""
    digest = hashlib.sha256(repr(tuple(int(k) for k in keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_clients(num_clients: int, frac: float, seed: int, round_idx: int) -> list[int]:
    """The round's clients: max(1, frac * n) of them, sorted by id."""
    m = max(1, int(frac * num_clients))
    chosen = torch.randperm(num_clients, generator=make_generator(seed, round_idx, -1))[:m]
    return sorted(chosen.tolist())


@dataclass
class ClientData:
    """One client's normalised train and test tensors, on the training device."""

    client_id: int
    train_x: torch.Tensor  # (n, C, H, W) float32
    train_y: torch.Tensor  # (n,) int64
    test_x: torch.Tensor  # (m, C, H, W) float32
    test_y: torch.Tensor  # (m,) int64
    augment: bool

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    def batches(self, batch_size: int, seed: int, round_idx: int, epoch: int) -> Iterator[tuple]:
        """One epoch of shuffled (and, for CIFAR-like data, augmented) training batches."""
        gen = make_generator(seed, round_idx, self.client_id, epoch)
        order = torch.randperm(self.num_train, generator=gen).to(self.train_y.device)
        for start in range(0, self.num_train, batch_size):
            idx = order[start:start + batch_size]
            x = self.train_x[idx]
            if self.augment:
                x = random_crop_flip(x, gen)
            yield x, self.train_y[idx]

    def poisson_batches(self, batch_size: int, seed: int, round_idx: int, epoch: int) -> Iterator[tuple]:
        """One epoch of Poisson-sampled DP-SGD batches (:func:`poisson_masks`); a batch may be empty."""
        gen, masks = poisson_masks(self.num_train, batch_size, seed, round_idx, self.client_id, epoch)
        for mask in masks:
            idx = mask.nonzero().flatten().to(self.train_y.device)
            x = self.train_x[idx]
            if self.augment:
                x = random_crop_flip(x, gen)
            yield x, self.train_y[idx]


def poisson_masks(num_train: int, batch_size: int, seed: int, round_idx: int, client: int,
                  epoch: int) -> tuple[torch.Generator, torch.Tensor]:
    """One epoch of Poisson sampling for a client: ceil(n / B) steps, each sample in a step's batch with
    probability min(B, n) / n.  Returns the epoch's generator (augmentation continues from it) and the
    (steps, n) membership mask, drawn first from it, so every engine draws the same batches."""
    gen = make_generator(seed, round_idx, client, epoch)
    steps, rate = -(-num_train // batch_size), min(batch_size, num_train) / num_train
    return gen, torch.rand(steps, num_train, generator=gen) < rate


def build_clients(dataset: ImageDataset, splits: list[ClientSplit], device: torch.device) -> list[ClientData]:
    """Materialise every client's split as normalised tensors on ``device``."""
    clients = []
    for cid, split in enumerate(splits):
        train, test = torch.from_numpy(split.train), torch.from_numpy(split.test)
        clients.append(ClientData(
            cid,
            dataset.normalize(dataset.train_images[train]).to(device),
            dataset.train_labels[train].to(device),
            dataset.normalize(dataset.test_images[test]).to(device),
            dataset.test_labels[test].to(device),
            dataset.augment,
        ))
    return clients


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             chunk: int = 1000) -> float:
    """Percentage of ``x`` that ``predict`` (images -> logits) classifies as ``y`` (a module is put in eval mode)."""
    if isinstance(predict, torch.nn.Module):
        predict.eval()
    correct = sum((predict(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum().item()
                  for i in range(0, len(y), chunk))
    return 100.0 * correct / len(y)


def weighted_average(uploads: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Server aggregation: the mean of the uploaded tensors weighted by ``weights`` (data sizes)."""
    total = float(sum(weights))
    return {name: sum(w / total * up[name] for up, w in zip(uploads, weights)) for name in uploads[0]}


@dataclass
class ClientResult:
    """What one client's local training in one round produced (figures only, for the log)."""

    client: int
    train_loss: float | None  # mean loss of the last local epoch (None: not reported, e.g. a Flower DP client's)
    local_acc: float | None  # test accuracy of the locally trained model
    global_acc: float  # test accuracy with the new global model (HyperFL: global hypernetwork)
    epsilon: float | None = None  # DP methods: the privacy spent so far (Opacus' RDP accountant, at --delta)


def load_partition(cfg: Config, log: Callable[[str], None] = print):
    """Load ``cfg.dataset`` and split it over ``cfg.clients`` clients: (dataset, splits, model spec).

    Deterministic in the settings, so every process (e.g. each Flower SuperNode) computes the same split.
    """
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    local_size = cfg.local_size or dataset.local_size
    test_size = cfg.test_size or dataset.test_size
    try:
        splits = partition(dataset.train_labels.numpy(), dataset.test_labels.numpy(), dataset.num_classes,
                           dataset.class_groups, cfg.clients, local_size, test_size, cfg.iid_share, cfg.iid,
                           cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"{cfg.dataset}: {exc}") from None
    shared = overlap(splits)
    if shared:
        log(f"note: {cfg.dataset}: {cfg.clients} clients x {local_size} samples: some classes ran out and started "
            f"over, as in the authors' partition, so {shared} of the clients' {cfg.clients * local_size} training "
            f"samples ({100 * shared / (cfg.clients * local_size):.1f}%) are also held by another client")
    if cfg.batch_size > local_size:
        log(f"warning: --batch-size {cfg.batch_size} exceeds a client's {local_size} training samples; "
            f"each epoch is one batch of {local_size}")
    return dataset, splits, model_spec(cfg, dataset)


def layout_spec(cfg: Config):
    """The run's model layout, known without its data or its backbone's weights (a Flower server needs only the
    tensors' shapes): the small CNN's spec, or a backbone spec without its frozen module."""
    in_channels, num_classes = DATASET_SHAPES[cfg.dataset]
    if cfg.backbone is None:
        return cnn_spec(in_channels, num_classes)
    from .backbones import BACKBONES, LPMSpec

    return LPMSpec(BACKBONES[cfg.backbone], num_classes, module=None, adapters=cfg.with_adapters)


def model_spec(cfg: Config, dataset: ImageDataset):
    """The run's model: the paper's small CNN for the dataset, or (``--backbone``) the frozen backbone, built
    with ``cfg.seed`` so that every process of a run holds the same one, and its adapters' layout."""
    if cfg.backbone is None:
        return cnn_spec(dataset.in_channels, dataset.num_classes)
    from .backbones import BackboneWeightsError, lpm_spec

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return lpm_spec(cfg.backbone, dataset.num_classes, cfg.torch_device(), cfg.backbone_weights,
                            cfg.with_adapters)
    except (BackboneWeightsError, ImportError) as exc:
        raise ConfigError(str(exc)) from None
