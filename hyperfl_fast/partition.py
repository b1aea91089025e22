"""The paper's non-IID client partition (and an IID one).

Each client gets ``local_size`` training samples: a share ``s`` of them is
spread evenly over all classes, the rest comes from the client's dominant
class group (groups are assigned round-robin).  Training samples are drawn
without replacement across clients, so clients' training sets are disjoint,
until a class runs out: then, as the authors' partition does (``label_used[y]
= 0`` in ``mnist_noniid_s``), the class starts over and hands out the same
samples again, so clients overlap (the 100-client settings; :func:`overlap`
counts it).
Each client's test split is drawn the same way from the test set, so it follows
the client's label distribution; test splits are disjoint within a client but
may overlap between clients (the test sets are too small for the paper's
scheme to give disjoint splits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClientSplit:
    """Indices into the dataset's train and test sets for one client."""

    train: np.ndarray  # (local_size,) int64
    test: np.ndarray  # (test_size,) int64


def even_split(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` bins as evenly as possible (first bins get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def class_counts(client: int, size: int, num_classes: int, groups, iid_share: float) -> np.ndarray:
    """How many samples of each class client ``client`` gets: (num_classes,) int."""
    counts = np.zeros(num_classes, dtype=np.int64)
    n_iid = int(round(iid_share * size))
    counts += even_split(n_iid, num_classes)
    group = groups[client % len(groups)]
    for cls, n in zip(group, even_split(size - n_iid, len(group))):
        counts[cls] += n
    return counts


def partition(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int, groups,
              num_clients: int, local_size: int, test_size: int, iid_share: float = 0.2,
              iid: bool = False, seed: int = 0) -> list[ClientSplit]:
    """Split a dataset over ``num_clients`` clients; deterministic for a given ``seed``.

    Raises ``ValueError`` naming the problem when the data cannot give every
    client its samples.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if iid and num_clients * local_size > len(train_labels):
        raise ValueError(f"{num_clients} clients x local_size {local_size} = {num_clients * local_size} training "
                         f"samples, but the dataset has only {len(train_labels)}; lower --clients or --local-size")
    if test_size > len(test_labels):
        raise ValueError(f"test size {test_size} per client exceeds the {len(test_labels)} test samples")
    rng = np.random.default_rng(seed)
    if iid:
        order = rng.permutation(len(train_labels))
        return [ClientSplit(np.sort(order[i * local_size:(i + 1) * local_size]),
                            np.sort(rng.choice(len(test_labels), test_size, replace=False)))
                for i in range(num_clients)]

    train_pools = [rng.permutation(np.flatnonzero(train_labels == c)) for c in range(num_classes)]
    test_pools = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    splits = []
    for client in range(num_clients):
        train_idx, test_idx = [], []
        train_counts = class_counts(client, local_size, num_classes, groups, iid_share)
        test_counts = class_counts(client, test_size, num_classes, groups, iid_share)
        for c in range(num_classes):
            if train_counts[c] > len(train_pools[c]):
                raise ValueError(f"class {c} has {len(train_pools[c])} training samples, fewer than the "
                                 f"{train_counts[c]} one client needs; lower --local-size")
            if taken[c] + train_counts[c] > len(train_pools[c]):
                taken[c] = 0  # the class ran out: it starts over (the authors' partition), clients overlap
            if test_counts[c] > len(test_pools[c]):
                raise ValueError(f"class {c} has {len(test_pools[c])} test samples, fewer than the "
                                 f"{test_counts[c]} a client's test split needs; lower --test-size")
            train_idx.append(train_pools[c][taken[c]:taken[c] + train_counts[c]])
            taken[c] += train_counts[c]
            test_idx.append(rng.choice(test_pools[c], test_counts[c], replace=False))
        splits.append(ClientSplit(np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))))
    return splits


def overlap(splits: list[ClientSplit]) -> int:
    """How many of the training samples the clients hold are held by another client too, counting every copy
    (0: the training sets are disjoint)."""
    _, copies = np.unique(np.concatenate([s.train for s in splits]), return_counts=True)
    return int(copies[copies > 1].sum())
